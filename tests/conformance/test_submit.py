"""
L{cpsdmp.xds.submit.prepare_td21}: an ANS example CDA becomes a signed TD2.1
whose parts the DMP would read back to the CDA, the signature verifying
against the CDA's bytes.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.protocols.soap import read_message
from cpsdmp.xds.cda import CdaError
from cpsdmp.xds.ebrim import XDSB
from cpsdmp.xds.signature import SIGNATURE_FORMAT, local_signer, verify
from cpsdmp.xds.submit import SigningIdentity, prepare_td21
from cpsdmp.xds.transactions import ACTION_PROVIDE_AND_REGISTER
from tests.conformance.material import XDSB_XSD, assert_valid, example_cdas
from tests.conformance.test_transactions import ENDPOINTS, inline_xop
from tests.pki import self_signed
from tests.xdsvalues import DEFAULTS, PROFESSIONAL, SOFTWARE, STRUCTURE

KEY, CERTIFICATE = self_signed(rsa.generate_private_key(65537, 2048))


def prepare(documents, **kw):
    return prepare_td21(
        documents,
        professional=PROFESSIONAL,
        structure=STRUCTURE,
        software=SOFTWARE,
        defaults=DEFAULTS,
        endpoints=ENDPOINTS,
        issuer=PROFESSIONAL.subject_name,
        **kw,
    )


class PrepareTests(SynchronousTestCase):
    def test_signed(self) -> None:
        """
        One CDA gives a valid TD2.1 with two parts: the CDA, exact, and the
        signature that verifies against it.
        """
        cda = next(p for p in example_cdas() if p.name.startswith("BIO")).read_bytes()
        prepared = self.successResultOf(
            prepare([cda], signing=SigningIdentity(local_signer(KEY), CERTIFICATE))
        )
        message = prepared.message
        self.assertEqual(message.action, ACTION_PROVIDE_AND_REGISTER)
        assert_valid(self, XDSB_XSD, inline_xop(message))
        response = read_message(message.content_type, message.body())
        parts = [
            bytes(response.binary(h)) for h in response.body.iter(f"{{{XDSB}}}Document")
        ]
        self.assertEqual(parts[0], cda)
        documents = prepared.submission.documents
        self.assertEqual(documents[1].entry.formatCode, SIGNATURE_FORMAT)
        verify(parts[1], {documents[0].entry.uniqueId: cda}, CERTIFICATE)

    def test_unsigned_and_errors(self) -> None:
        """
        Without signing identity the submission holds the documents only; a
        document the DMP cannot take is refused before anything is built.
        """
        cda = next(
            p for p in example_cdas() if p.name.startswith("VAC-NOTE")
        ).read_bytes()
        prepared = self.successResultOf(prepare([cda], signing=None))
        self.assertEqual(len(prepared.submission.documents), 1)
        self.assertRaises(CdaError, prepare, [b"<a/>"], signing=None)
        self.assertRaises(ValueError, prepare, [cda], signing=None, overrides=[{}, {}])
