"""
What the builders of DMP messages need to know besides the document: who
acts (the L{Professional}, as the agent reads them from the CPS card), for
which structure (L{Structure}, from configuration), with which software
(L{Software}, the identity the DMP homologated), and the defaults that a
document may leave out (L{SubmissionDefaults}).

The facade fills these from the agent's C{GET /cps/card} answer and from its
configuration file; nothing here reads a card or a file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cpsdmp.xds.ebrim import (
    IDNPS_OID,
    INS_OID_PRODUCTION,
    CodedValue,
    MetadataError,
    Organization,
    Person,
)

#: TRE_G15 professions, TRE_R38 specialties (the card's codes).
PROFESSION_SYSTEM = "1.2.250.1.71.1.2.7"
SPECIALTY_SYSTEM = "1.2.250.1.71.4.2.5"
#: XDS authorSpecialty codes ("G15_10/SM26"), JDV_J01.
AUTHOR_SPECIALTY_SYSTEM = "1.2.250.1.213.1.1.4.5"
#: Secteur d'activité (also the XDS healthcareFacilityTypeCode system).
ACTIVITY_SECTOR_SYSTEM = "1.2.250.1.71.4.2.4"
#: XDS practiceSettingCode, JDV_J04.
PRACTICE_SETTING_SYSTEM = "1.2.250.1.213.1.1.4.9"


@dataclass(frozen=True)
class Professional:
    """
    The health professional holding the CPS card.

    @ivar identifier: the national identifier IDNPS as on the card: C{8}
        followed by the RPPS number, or C{0} followed by the ADELI number.
    @ivar profession: TRE_G15 code (C{"10"} for a physician) and its label.
    @ivar specialty: TRE_R38 code (C{"SM26"}) and its label, if any.
    """

    identifier: str
    family: str
    given: str
    profession: CodedValue
    specialty: CodedValue | None = None
    subject_name: str = ""

    def __post_init__(self) -> None:
        if (
            not self.identifier
            or self.identifier[0] not in "08"
            or (not self.identifier[1:].isalnum())
        ):
            raise MetadataError(
                f"professional identifier {self.identifier!r} is not an IDNPS "
                "(8 + RPPS or 0 + ADELI)"
            )

    def person(self) -> Person:
        return Person(self.identifier, self.family, self.given, IDNPS_OID, "IDNPS")

    def author_specialty(self) -> CodedValue:
        """
        @return: the XDS authorSpecialty (C{G15_10/SM26}) of this professional.
        """
        code = f"G15_{self.profession.code}"
        display = self.profession.display
        if self.specialty is not None:
            code += f"/{self.specialty.code}"
            display = f"{display} - {self.specialty.display}"
        return CodedValue(code, AUTHOR_SPECIALTY_SYSTEM, display)

    def roles(self) -> list[CodedValue]:
        """
        @return: the VIHF roles: the profession, then the specialty.
        """
        roles = [
            CodedValue(self.profession.code, PROFESSION_SYSTEM, self.profession.display)
        ]
        if self.specialty is not None:
            roles.append(
                CodedValue(
                    self.specialty.code, SPECIALTY_SYSTEM, self.specialty.display
                )
            )
        return roles


class StructureIdentifier(enum.Enum):
    """
    Kinds of structure identifiers and the IDNST prefix of each.
    """

    FINESS = "1"
    SIRET = "3"
    RPPS_PRACTICE = "4"


@dataclass(frozen=True)
class Structure:
    """
    The health structure the professional works for.

    @ivar activity_sector: the "secteur d'activité" (C{SA07} cabinet
        individuel...), sent in the VIHF and the default
        healthcareFacilityTypeCode.
    @ivar practice_setting: the default practiceSettingCode (JDV_J04).
    """

    name: str
    kind: StructureIdentifier
    number: str
    activity_sector: CodedValue
    practice_setting: CodedValue

    @property
    def idnst(self) -> str:
        """
        The national structure identifier: the kind's prefix and the number,
        the VIHF's C{Identifiant_Structure}.
        """
        return self.kind.value + self.number

    def organization(self) -> Organization:
        return Organization(self.name, self.idnst)


@dataclass(frozen=True)
class Software:
    """
    The software (LPS) as the DMP homologated it.

    @ivar source_oid: the OID naming this software installation, used as
        the submission set's sourceId.
    """

    name: str
    version: str
    homologation_id: str
    source_oid: str
    instance_id: str = ""


@dataclass(frozen=True)
class SubmissionDefaults:
    """
    Values a submission needs that the CDA does not always carry.
    """

    ins_authority: str = INS_OID_PRODUCTION
    content_type: CodedValue | None = None
    confidentiality: tuple[CodedValue, ...] = field(default_factory=tuple)
