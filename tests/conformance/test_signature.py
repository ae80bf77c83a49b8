"""
The submission-set signature: made through an asynchronous signer, checked
here independently of L{cpsdmp.xds.signature.verify} (digests and signature
value recomputed in the test, and the whole signature verified by xmlsec1,
another implementation of XML-DSig and C14N), refused when anything is
altered, and carried in a TD2.1 that stays valid against the XDS.b schema.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from lxml import etree
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.xds.ebrim import AssociationType
from cpsdmp.xds.signature import (
    DS,
    MAX_SIGNING_TIME_SKEW,
    PURPOSE_SOURCE,
    SIGNATURE_CLASS,
    SIGNATURE_FORMAT,
    SignatureInvalid,
    SignatureRequestRefused,
    _skeleton,
    check_signature_request,
    document_uri,
    local_signer,
    sign_submission,
    to_be_signed,
    verify,
)
from cpsdmp.xds.transactions import new_submission, provide_and_register
from tests.conformance.material import XDSB_XSD, assert_valid, value_set
from tests.conformance.test_transactions import (
    ENDPOINTS,
    VIHF,
    cda_entries,
    inline_xop,
)
from tests.pki import self_signed
from tests.xdsvalues import DEFAULTS, PROFESSIONAL, SOFTWARE, STRUCTURE

NS = {"ds": DS}
KEY, CERTIFICATE = self_signed(rsa.generate_private_key(65537, 2048), "Dr LIBRE")


def submission():
    return new_submission(
        cda_entries()[:2], PROFESSIONAL, STRUCTURE, SOFTWARE, DEFAULTS
    )


def c14n(element: etree._Element) -> bytes:
    return etree.tostring(element, method="c14n", exclusive=True)


def xmlsec1(folder: Path, signed, certificate) -> tuple[int, str]:
    """
    Verify the signature of C{signed} with xmlsec1: the certificate in
    KeyInfo must chain to C{certificate}, and each manifest reference
    (C{urn:oid:<uniqueId>}) is mapped to a file holding that document's
    exact bytes, so that xmlsec1 digests them itself.

    @return: xmlsec1's exit status and its report.
    """
    program = shutil.which("xmlsec1")
    if program is None:
        raise AssertionError(
            "xmlsec1 is not installed: scripts/system-deps installs it "
            "(Debian package xmlsec1)"
        )
    (folder / "signer.pem").write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
    )
    (folder / "signature.xml").write_bytes(signed.documents[-1].data)
    command = [
        program,
        "--verify",
        "--trusted-pem",
        str(folder / "signer.pem"),
        # The manifest's urn:oid: references count as remote; each is
        # mapped to a local file, so nothing is fetched.
        "--enabled-reference-uris",
        "same-doc,remote",
    ]
    for index, document in enumerate(signed.documents[:-1]):
        path = folder / f"document-{index}"
        path.write_bytes(bytes(document.data))
        command += [f"--url-map:{document_uri(document.entry.uniqueId)}", str(path)]
    command.append(str(folder / "signature.xml"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


def references(report: str, kind: str) -> tuple[int, int]:
    # xmlsec1 reports "SignedInfo References (ok/all): 3/3" and the same for
    # Manifests.
    match = re.search(kind + r" References \(ok/all\): (\d+)/(\d+)", report)
    assert match is not None, report
    return int(match[1]), int(match[2])


class SignatureTests(SynchronousTestCase):
    def signed(self, signer=None, key=KEY, certificate=CERTIFICATE, **kw):
        return self.successResultOf(
            sign_submission(
                submission(),
                signer or local_signer(key),
                certificate,
                PROFESSIONAL,
                STRUCTURE,
                **kw,
            )
        )

    def test_independent_check(self) -> None:
        """
        The SignatureValue verifies over the exclusive C14N of SignedInfo
        with the certificate's key, every SignedInfo digest matches its
        target, and the manifest lists each document's SHA-256 by uniqueId.
        """
        signed = self.signed()
        data = signed.documents[-1].data
        root = etree.fromstring(data)
        signed_info = root.find("ds:SignedInfo", NS)
        KEY.public_key().verify(
            base64.b64decode(root.findtext("ds:SignatureValue", namespaces=NS)),
            c14n(signed_info),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
        for reference in signed_info.iterfind("ds:Reference", NS):
            target = root.xpath("//*[@Id=$i]", i=reference.get("URI")[1:])[0]
            self.assertEqual(
                base64.b64decode(reference.findtext("ds:DigestValue", namespaces=NS)),
                hashlib.sha256(c14n(target)).digest(),
            )
        listed = {
            r.get("URI"): base64.b64decode(r.findtext("ds:DigestValue", namespaces=NS))
            for r in root.iterfind("ds:Object/ds:Manifest/ds:Reference", NS)
        }
        self.assertEqual(
            listed,
            {
                "urn:oid:" + d.entry.uniqueId: hashlib.sha256(d.data).digest()
                for d in signed.documents[:-1]
            },
        )
        properties = {
            p.get("Id"): p.text
            for p in root.iterfind(
                "ds:Object/ds:SignatureProperties/ds:SignatureProperty", NS
            )
        }
        self.assertEqual(
            properties,
            {
                "purposeOfSignature": PURPOSE_SOURCE,
                "setId": signed.submission_set.uniqueId,
            },
        )
        self.assertEqual(
            root.xpath(
                "//*[local-name()='SigningCertificate']//ds:DigestValue/text()",
                namespaces=NS,
            ),
            [base64.b64encode(CERTIFICATE.fingerprint(hashes.SHA256())).decode()],
        )

    def test_xmlsec1(self) -> None:
        """
        xmlsec1 (libxmlsec1 over OpenSSL) verifies the signature made with
        an RSA and with an EC key: the SignatureValue with the KeyInfo
        certificate, the three SignedInfo references, and each manifest
        reference against the bytes of its document.
        """
        ec_key, ec_certificate = self_signed(ec.generate_private_key(ec.SECP256R1()))
        for key, certificate, algorithm in [
            (KEY, CERTIFICATE, "SHA256WithRSA"),
            (ec_key, ec_certificate, "SHA256WithECDSA"),
        ]:
            signed = self.signed(key=key, certificate=certificate, algorithm=algorithm)
            folder = Path(self.mktemp())
            folder.mkdir()
            status, report = xmlsec1(folder, signed, certificate)
            self.assertEqual(status, 0, report)
            self.assertIn("OK", report.splitlines())
            self.assertEqual(references(report, "SignedInfo"), (3, 3), report)
            count = len(signed.documents) - 1
            self.assertEqual(references(report, "Manifests"), (count, count), report)

    def test_xmlsec1_refuses(self) -> None:
        """
        xmlsec1 refuses a signature whose signed property was changed, and
        counts a manifest reference whose document changed as failed.
        """
        signed = self.signed()
        folder = Path(self.mktemp())
        folder.mkdir()
        data = signed.documents[-1].data
        signed.documents[-1].data = data.replace(
            b"<xades:SigningTime>", b"<xades:SigningTime>1"
        )
        status, report = xmlsec1(folder, signed, CERTIFICATE)
        self.assertIn("FAIL", report.splitlines(), report)

        signed.documents[-1].data = data
        signed.documents[0].data = bytes(signed.documents[0].data) + b" "
        status, report = xmlsec1(folder, signed, CERTIFICATE)
        count = len(signed.documents) - 1
        self.assertEqual(references(report, "Manifests"), (count - 1, count), report)

    def test_entry_and_associations(self) -> None:
        """
        The signature is a document of the submission with the DSG codes, a
        member of the set, and signs the set.
        """
        signed = self.signed()
        signature = signed.documents[-1]
        self.assertEqual(len(signed.documents), 3)
        self.assertEqual(signature.entry.classCode, SIGNATURE_CLASS)
        self.assertEqual(signature.entry.formatCode, SIGNATURE_FORMAT)
        self.assertEqual(signature.entry.hash, hashlib.sha1(signature.data).hexdigest())
        self.assertEqual(signature.entry.patientId, signed.submission_set.patientId)
        # Its type and its confidentiality (normal, hidden from the patient
        # and masked from professionals) are CI-SIS values.
        type_code = signature.entry.typeCode
        self.assertIn((type_code.code, type_code.scheme), value_set("JDV_J07"))
        self.assertEqual(
            {(c.code, c.scheme) for c in signature.entry.confidentialityCode}
            - value_set("JDV_J08"),
            set(),
        )
        kinds = {
            (a.associationType, a.sourceObject, a.targetObject)
            for a in signed.associations
        }
        set_id = signed.submission_set.entryUUID
        self.assertIn((AssociationType.signs, signature.entry.entryUUID, set_id), kinds)
        self.assertIn(
            (AssociationType.HasMember, set_id, signature.entry.entryUUID), kinds
        )

    def test_td21_valid(self) -> None:
        """
        A signed TD2.1 is still valid, with the signature as a binary part.
        """
        message = provide_and_register(ENDPOINTS, VIHF, self.signed())
        self.assertEqual(len(message.attachments), 3)
        assert_valid(self, XDSB_XSD, inline_xop(message))

    def test_tampering(self) -> None:
        """
        A changed document byte, a changed signed property or another
        document set fails verification, naming what differs.
        """
        signed = self.signed()
        data = bytes(signed.documents[-1].data)
        documents = {d.entry.uniqueId: d.data for d in signed.documents[:-1]}
        self.assertEqual(
            verify(data, documents).serial_number, CERTIFICATE.serial_number
        )

        first = signed.documents[0].entry.uniqueId
        altered = dict(documents, **{first: bytes(documents[first]) + b" "})
        error = self.assertRaises(SignatureInvalid, verify, data, altered)
        self.assertIn(first, str(error))

        moved = data.replace(b"<xades:SigningTime>", b"<xades:SigningTime>1")
        self.assertNotEqual(moved, data)
        self.assertRaises(SignatureInvalid, verify, moved, documents)

        fewer = dict(list(documents.items())[:1])
        self.assertRaises(SignatureInvalid, verify, data, fewer)

    def test_wrong_key(self) -> None:
        """
        A signer whose key is not the certificate's is caught before the
        signature is used.
        """
        other = rsa.generate_private_key(65537, 2048)
        failure = self.failureResultOf(
            sign_submission(
                submission(), local_signer(other), CERTIFICATE, PROFESSIONAL, STRUCTURE
            ),
            SignatureInvalid,
        )
        self.assertIn("SignatureValue", str(failure.value))

    def test_late_signer(self) -> None:
        """
        A signer that answers later (the card through the agent) is waited
        for; one that never answers times out.
        """
        pending: list[tuple[bytes, str, defer.Deferred[bytes]]] = []

        def later(data: bytes, algorithm: str) -> defer.Deferred[bytes]:
            d: defer.Deferred[bytes] = defer.Deferred()
            pending.append((data, algorithm, d))
            return d

        clock = task.Clock()
        result = sign_submission(
            submission(), later, CERTIFICATE, PROFESSIONAL, STRUCTURE, clock=clock
        )
        self.assertNoResult(result)
        data, algorithm, waiting = pending[0]
        self.assertEqual(algorithm, "SHA256WithRSA")
        waiting.callback(
            KEY.sign(to_be_signed(data), padding.PKCS1v15(), hashes.SHA256())
        )
        self.assertEqual(len(self.successResultOf(result).documents), 3)

        never = sign_submission(
            submission(),
            later,
            CERTIFICATE,
            PROFESSIONAL,
            STRUCTURE,
            clock=clock,
            timeout=30,
        )
        clock.advance(31)
        self.failureResultOf(never, defer.TimeoutError)

    def test_ecdsa(self) -> None:
        """
        An EC key's DER signature is stored as r||s and verifies.
        """
        key, certificate = self_signed(ec.generate_private_key(ec.SECP256R1()))
        signed = self.signed(
            key=key, certificate=certificate, algorithm="SHA256WithECDSA"
        )
        root = etree.fromstring(signed.documents[-1].data)
        self.assertEqual(
            len(base64.b64decode(root.findtext("ds:SignatureValue", namespaces=NS))), 64
        )


def signature_request(documents=None, **kw) -> tuple[bytes, object]:
    """
    @return: the request L{sign_submission} hands its signer, and the
        submission it signs.
    """
    asked: list[bytes] = []

    def signer(request: bytes, algorithm: str) -> defer.Deferred[bytes]:
        asked.append(request)
        return local_signer(KEY)(request, algorithm)

    signed = submission() if documents is None else documents
    sign_submission(signed, signer, CERTIFICATE, PROFESSIONAL, STRUCTURE, **kw)
    return asked[0], signed


def edited(request: bytes, change) -> bytes:
    """
    @return: C{request} after C{change} had its tree.
    """
    root = etree.fromstring(request)
    change(root)
    return etree.tostring(root)


REFERENCES = ("#IHEManifest", "#SignatureProperties", "#SignedProperties")


def redigest(root, uri: str) -> None:
    """
    Recompute the SignedInfo digest of C{uri} after an edit, as someone
    building a request of his own would.
    """
    target = root.xpath("//*[@Id=$i]", i=uri[1:])[0]
    reference = root.find(f"ds:SignedInfo/ds:Reference[@URI='{uri}']", NS)
    reference.find("ds:DigestValue", NS).text = base64.b64encode(
        hashlib.sha256(c14n(target)).digest()
    ).decode()


class SignatureRequestTests(SynchronousTestCase):
    """
    What the signer is handed, as the agent checks it before the card's
    signature key signs.
    """

    def setUp(self) -> None:
        self.request, self.submission = signature_request()

    def refused(self, request: bytes, why: str, **kw) -> None:
        kw.setdefault("algorithm", "SHA256WithRSA")
        kw.setdefault("certificate", CERTIFICATE)
        with self.assertRaises(SignatureRequestRefused) as raised:
            check_signature_request(request, **kw)
        self.assertIn(why, str(raised.exception))

    def test_genuine(self) -> None:
        """
        The request of a real submission passes, and says what it is about:
        the set's uniqueId, each document's uniqueId and SHA-256; what is
        signed is its SignedInfo's exclusive C14N.
        """
        checked = check_signature_request(self.request, "SHA256WithRSA", CERTIFICATE)
        self.assertEqual(checked.set_id, self.submission.submission_set.uniqueId)
        self.assertEqual(
            checked.documents,
            tuple(
                (d.entry.uniqueId, hashlib.sha256(d.data).digest())
                for d in self.submission.documents[:2]
            ),
        )
        self.assertEqual(checked.to_be_signed, to_be_signed(self.request))
        root = etree.fromstring(self.request)
        self.assertEqual(checked.to_be_signed, c14n(root.find("ds:SignedInfo", NS)))

    def test_own_manifest(self) -> None:
        """
        A request whose manifest is one its maker wrote, about documents of
        his own, the SignedInfo's digest recomputed to match: the manifest
        is still the project's shape, so it passes, and what it is about is
        on record; with the SignedInfo digest left as it was, it is refused.
        """
        forged = hashlib.sha256(b"a document of mine").digest()

        def own_document(root) -> None:
            manifest = root.find("ds:Object/ds:Manifest", NS)
            manifest[0].set("URI", "urn:oid:1.2.3.4")
            manifest[0].find("ds:DigestValue", NS).text = base64.b64encode(
                forged
            ).decode()

        stale = edited(self.request, own_document)
        self.refused(
            stale, "the digest of #IHEManifest does not match in the SignedInfo"
        )

        def own_and_redigested(root) -> None:
            own_document(root)
            redigest(root, "#IHEManifest")

        checked = check_signature_request(
            edited(self.request, own_and_redigested), "SHA256WithRSA", CERTIFICATE
        )
        self.assertEqual(checked.documents[0], ("1.2.3.4", forged))

    def test_not_the_projects_shape(self) -> None:
        """
        Whatever the project's signer does not make is refused, each
        SignedInfo digest recomputed so that only the shape is at fault.
        """

        def with_digests(change):
            def apply(root) -> None:
                change(root)
                for uri in (
                    "#IHEManifest",
                    "#SignatureProperties",
                    "#SignedProperties",
                ):
                    redigest(root, uri)

            return edited(self.request, apply)

        manifest = "ds:Object/ds:Manifest"
        for change, why in [
            (
                lambda r: r.find(manifest, NS).append(
                    etree.fromstring(f'<ds:Object xmlns:ds="{DS}">x</ds:Object>')
                ),
                "the manifest lists something else than documents",
            ),
            (
                lambda r: r.find(manifest, NS)[0].set("URI", "http://evil/"),
                "the manifest lists something else than documents",
            ),
            (
                lambda r: r.find(manifest, NS).append(
                    etree.fromstring(etree.tostring(r.find(manifest, NS)[0]))
                ),
                "lists a document twice",
            ),
            (
                lambda r: [
                    r.find(manifest, NS).remove(e) for e in list(r.find(manifest, NS))
                ],
                "the manifest lists no document",
            ),
            (
                lambda r: r.find(manifest, NS)[0].set("Type", "x"),
                "its Manifest is not what the project's signer makes",
            ),
            (
                lambda r: setattr(
                    r.find("ds:Object/ds:SignatureProperties/ds:SignatureProperty", NS),
                    "text",
                    "for fun",
                ),
                "its SignatureProperties is not",
            ),
            (
                lambda r: setattr(
                    r.find(
                        "ds:Object/ds:SignatureProperties/ds:SignatureProperty[@Id='setId']",
                        NS,
                    ),
                    "text",
                    "not an OID",
                ),
                "name no submission set uniqueId",
            ),
            (
                lambda r: r.append(etree.fromstring(f'<ds:Object xmlns:ds="{DS}"/>')),
                "other elements or attributes",
            ),
            (lambda r: r.set("Id", "mine"), "the signature's Id"),
        ]:
            self.refused(with_digests(change), why)

    def test_unique_ids(self) -> None:
        """
        The manifest lists documents by uniqueId, and the signature
        properties name the set by its uniqueId, as XDS writes them: a
        document's is an OID of at most 64 characters, or the root^extension
        of a CDA id (its extension at most 16 characters); the set's is an
        OID of at most 64 characters. Anything else is refused, though the
        request is otherwise exactly what the project's signer would make of
        it.
        """
        digest = hashlib.sha256(b"document").digest()
        moment = datetime.now(UTC)

        def made(documents: list[str], set_id: str = "2.25.1") -> bytes:
            root = _skeleton(
                [(unique_id, digest) for unique_id in documents],
                set_id,
                CERTIFICATE,
                (),
                "SHA256WithRSA",
                moment,
                "sig-00000000-0000-4000-8000-000000000000",
            )
            return etree.tostring(root, encoding="UTF-8", xml_declaration=True)

        oid_64 = "1.2." + "3" * 60
        for good in (
            ["1.2.250.1.213.1.1.1.55.2024.9.1"],
            [oid_64],
            ["1.2.3^a-b_c"],
        ):
            checked = check_signature_request(made(good), "SHA256WithRSA", CERTIFICATE)
            self.assertEqual([u for u, _ in checked.documents], good)
        self.assertEqual(
            check_signature_request(
                made(["1.2.3"], oid_64), "SHA256WithRSA", CERTIFICATE
            ).set_id,
            oid_64,
        )
        for bad in [
            "not an oid <>&",
            "1.2." + "3" * 61,
            "1.2.3^" + "x" * 17,
            "1.2.3^",
            "1.2.3^a^b",
            "01.2.3",
            "1.2.3.",
            "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab",
        ]:
            self.refused(
                made(["1.2.3", bad]),
                "the manifest lists something else than documents by uniqueId",
            )
        for bad in ["1.2." + "3" * 61, "1.2.3^4", "not an oid"]:
            self.refused(made(["1.2.3"], bad), "name no submission set uniqueId")

    def test_signing_certificate(self) -> None:
        """
        The signed properties name the card's signature certificate: a
        request made for another certificate is refused.
        """
        _, other = self_signed(rsa.generate_private_key(65537, 2048), "Dr AUTRE")
        self.refused(
            self.request,
            "the signing certificate in the signed properties is not the card's",
            certificate=other,
        )

    def test_signing_time(self) -> None:
        """
        The signing time is within a quarter of an hour of the checker's
        clock.
        """
        moment = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
        request, _ = signature_request(now=moment)
        check_signature_request(
            request, "SHA256WithRSA", CERTIFICATE, now=moment + MAX_SIGNING_TIME_SKEW
        )
        self.refused(
            request,
            "the signing time 2026-03-01T12:00:00Z is more than 15 minutes from now",
            now=moment + MAX_SIGNING_TIME_SKEW + timedelta(seconds=1),
        )
        self.refused(request, "more than 15 minutes", now=moment - timedelta(hours=1))

    def test_malformed_references(self) -> None:
        """
        A SignedInfo reference without its DigestMethod, or with a digest
        that is not base64, is refused by name, never an error.
        """
        info = "ds:SignedInfo/ds:Reference"

        def no_method(root) -> None:
            reference = root.find(info, NS)
            reference.remove(reference.find("ds:DigestMethod", NS))

        def not_base64(root) -> None:
            root.find(info, NS).find("ds:DigestValue", NS).text = "x"

        self.refused(edited(self.request, no_method), "does not use SHA-256")
        self.refused(edited(self.request, not_base64), "has no base64 digest")

    def test_not_a_request(self) -> None:
        self.refused(b"hello", "not a submission-set signature")
        self.refused(b"<a/>", "not an XML-DSig Signature")
        self.refused(b"<!DOCTYPE a><a/>", "not a submission-set signature")
        self.refused(
            self.request, "the SignatureMethod is not", algorithm="SHA256WithECDSA"
        )
        self.refused(
            self.request,
            "SHA512WithRSA is not a submission-set",
            algorithm="SHA512WithRSA",
        )
