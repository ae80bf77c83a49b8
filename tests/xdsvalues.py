"""
A professional, a structure and a software identity for tests, shaped like
the ones in the official DMP examples.
"""

from __future__ import annotations

from cpsdmp.xds.context import (
    Professional,
    Software,
    Structure,
    StructureIdentifier,
    SubmissionDefaults,
)
from cpsdmp.xds.ebrim import INS_OID_TEST, CodedValue, PatientId

PROFESSIONAL = Professional(
    identifier="899900063480",
    family="LIBRE",
    given="MAX",
    profession=CodedValue("10", "1.2.250.1.71.1.2.7", "Médecin"),
    specialty=CodedValue(
        "SM26", "1.2.250.1.71.4.2.5", "Qualifié en Médecine Générale (SM)"
    ),
    subject_name="CN=899900063480+SN=LIBRE+GN=MAX,OU=Médecin,O=TEST,C=FR",
)
STRUCTURE = Structure(
    name="CABINET DR LIBRE",
    kind=StructureIdentifier.RPPS_PRACTICE,
    number="99900063480001",
    activity_sector=CodedValue("SA07", "1.2.250.1.71.4.2.4", "Cabinet individuel"),
    practice_setting=CodedValue("AMBULATOIRE", "1.2.250.1.213.1.1.4.9", "Ambulatoire"),
)
SOFTWARE = Software(
    name="cpsdmp tests",
    version="1.0",
    homologation_id="NumAutorisation",
    source_oid="1.2.250.1.999.1.1.7898",
    instance_id="01.01.01.01",
)
DEFAULTS = SubmissionDefaults(
    ins_authority=INS_OID_TEST,
    content_type=CodedValue("04", "1.2.250.1.213.2.2", "Hospitalisation de jour"),
)
PATIENT = PatientId("207058575627097", INS_OID_TEST)
