"""
Building a TD2.1 for a 100 MB document, signing it and writing it out costs
little more memory than the document itself: it is never base64-encoded
nor copied whole. Measured in a fresh process with getrusage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, resource, sys
from cryptography.hazmat.primitives.asymmetric import rsa
from cpsdmp.xds.cda import document_entry
from cpsdmp.xds.signature import local_signer, sign_submission
from cpsdmp.xds.transactions import DmpEndpoints, new_submission, provide_and_register
from cpsdmp.xds.vihf import VihfRequest
from tests.pki import self_signed
from tests.xdsvalues import DEFAULTS, PROFESSIONAL, SOFTWARE, STRUCTURE

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

key, certificate = self_signed(rsa.generate_private_key(65537, 2048))
before = peak()
with open(sys.argv[1], "rb") as f:
    data = f.read()
entry = document_entry(data, STRUCTURE)
submission = new_submission(
    [(entry, data)], PROFESSIONAL, STRUCTURE, SOFTWARE, DEFAULTS
)
done = []
sign_submission(submission, local_signer(key), certificate, PROFESSIONAL,
                STRUCTURE).addCallback(done.append)
vihf = VihfRequest(PROFESSIONAL, STRUCTURE, SOFTWARE, "CN=x", entry.patientId)
message = provide_and_register(DmpEndpoints("https://x/"), vihf, submission)
written = 0
with open(os.devnull, "wb") as sink:
    for part in message.parts():
        sink.write(part)
        written += len(part)
print(json.dumps({"before": before, "after": peak(), "document": len(data),
                  "written": written, "signed": bool(done)}))
"""


class LargeSubmissionTests(SynchronousTestCase):
    def test_hundred_megabytes(self) -> None:
        """
        Peak RSS grows by less than 1.5 times the document while building,
        signing and writing out its TD2.1 (the document itself is 1x).
        """
        size = 100 * 1024 * 1024
        with tempfile.NamedTemporaryFile(delete=False, suffix=".xml") as f:
            f.write(
                b'<ClinicalDocument xmlns="urn:hl7-org:v3">'
                b'<templateId root="1.2.250.1.213.1.1.1.55"/>'
                b'<id root="1.2.3.4"/>'
                b'<code code="11502-2" codeSystem="2.16.840.1.113883.6.1"/>'
                b"<title>CR</title>"
                b'<effectiveTime value="20240102103000+0100"/>'
                b'<confidentialityCode code="N" codeSystem="2.16.840.1.113883.5.25"/>'
                b'<languageCode code="fr-FR"/>'
                b'<recordTarget><patientRole><id root="1.2.250.1.213.1.4.10" '
                b'extension="279035121518989"/></patientRole></recordTarget>'
                b'<author><assignedAuthor><id root="1.2.250.1.71.4.2.1" '
                b'extension="899900063480"/></assignedAuthor></author>'
                b"<legalAuthenticator><time/><signatureCode/><assignedEntity>"
                b'<id root="1.2.250.1.71.4.2.1" extension="899900063480"/>'
                b"</assignedEntity></legalAuthenticator>"
                b'<documentationOf><serviceEvent><effectiveTime><low value="20240102"/>'
                b"</effectiveTime></serviceEvent></documentationOf>"
                b'<component><nonXMLBody><text mediaType="application/pdf" '
                b'representation="B64">'
            )
            block = b"JVBERi0x" * (1024 * 1024 // 8)
            for _ in range(size // len(block)):
                f.write(block)
            f.write(b"</text></nonXMLBody></component></ClinicalDocument>")
        self.addCleanup(os.unlink, f.name)
        output = subprocess.run(
            [sys.executable, "-c", CHILD, f.name],
            capture_output=True,
            check=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT},
        ).stdout
        figures = json.loads(output)
        self.assertTrue(figures["signed"])
        self.assertGreater(figures["written"], figures["document"])
        growth = figures["after"] - figures["before"]
        self.assertLess(
            growth, 1.5 * figures["document"], f"peak RSS grew by {growth} bytes"
        )
