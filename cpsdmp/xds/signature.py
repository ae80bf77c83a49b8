"""
The submission-set signature the DMP asks for (CI-SIS, after IHE DSG): a
detached XAdES signature whose C{ds:Manifest} lists every document of the
submission by uniqueId with the digest of its exact bytes, stating the
submission set's uniqueId and the purpose of signature; it travels as one
more document of the submission, linked to the set by a C{signs}
association.

The signature value is made by an asynchronous L{Signer}: the agent's
C{/cps/sign/for/signature/{algorithm}} endpoint (the card's signature key)
or a local key. The signer is handed the whole signature without its value
(the I{signature request}), not only the SignedInfo it signs, so that it can
check what the SignedInfo's references cover: the agent does, with
L{check_signature_request}, before the card signs. Canonicalisation is
lxml's exclusive C14N. What we produce is verified before it is used
(L{verify}).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from lxml import etree
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cpsdmp.protocols.safexml import XmlRefused, parse_xml
from cpsdmp.xds.context import Professional, Structure
from cpsdmp.xds.ebrim import (
    MAX_OID,
    Association,
    AssociationType,
    CodedValue,
    DocumentEntry,
    DocumentHash,
    MetadataError,
    new_entry_uuid,
    uuid_oid,
    xds_time,
)
from cpsdmp.xds.transactions import (
    INVISIBLE_PATIENT,
    MASQUE_PS,
    Submission,
    SubmittedDocument,
    author_of,
)
from cpsdmp.xds.values import MAX_EXTENSION, is_unique_id

_log = Logger()

DS = "http://www.w3.org/2000/09/xmldsig#"
XADES = "http://uri.etsi.org/01903/v1.3.2#"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
SHA256 = "http://www.w3.org/2001/04/xmlenc#sha256"
MANIFEST_TYPE = "http://www.w3.org/2000/09/xmldsig#Manifest"
SIGNED_PROPERTIES_TYPE = "http://uri.etsi.org/01903#SignedProperties"

#: Purpose of signature (ISO 17090 / ASTM E1762): the author, "Source".
PURPOSE_SOURCE = "1.2.840.10065.1.12.1.14"

#: Signature algorithms by the name the agent's endpoint takes.
ALGORITHMS = {
    "SHA256WithRSA": "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256",
    "SHA256WithECDSA": "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256",
}

#: The signature's own DocumentEntry codes (IHE DSG).
SIGNATURE_CLASS = CodedValue(
    "urn:oid:1.3.6.1.4.1.19376.1.2.1.1.1", "URN", "Digital Signature"
)
SIGNATURE_TYPE = CodedValue("E1762", "ASTM", "Full Document")
SIGNATURE_FORMAT = CodedValue(
    "http://www.w3.org/2000/09/xmldsig#", "URN", "Default Signature Style"
)
SIGNATURE_EVENT = CodedValue(PURPOSE_SOURCE, "1.2.840.10065.1.12", "Source")
NORMAL = CodedValue("N", "2.16.840.1.113883.5.25", "Normal")

#: sign(request, algorithm) -> Deferred firing with the signature bytes (for
#: ECDSA, DER or raw r||s) over L{to_be_signed}(request): C{request} is the
#: signature without its value, as L{sign_submission} makes it.
Signer = Callable[[bytes, str], "Deferred[bytes]"]

#: How far a request's signing time may be from the checker's clock: the
#: facade that builds it and the workstation that signs it are different
#: machines.
MAX_SIGNING_TIME_SKEW = timedelta(minutes=15)

_SIGNATURE_ID = re.compile(
    r"sig-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
)


class SignatureInvalid(Exception):
    """
    A submission-set signature does not verify; the message says which part.
    """


class SignatureRequestRefused(Exception):
    """
    A signature request is not one L{sign_submission} makes for the given
    certificate; the message says what differs.
    """


@dataclass(frozen=True)
class SignatureRequest:
    """
    What a checked signature request has the signer sign, and what that
    signature is about: the submission set's uniqueId and each document's
    manifest reference with the SHA-256 of its bytes.
    """

    to_be_signed: bytes
    set_id: str
    documents: tuple[tuple[str, bytes], ...]
    signing_time: datetime


def to_be_signed(request: bytes) -> bytes:
    """
    @return: what a signer signs for C{request}: the exclusive C14N of its
        SignedInfo.
    @raise SignatureRequestRefused: when C{request} is not an XML signature
        with a SignedInfo.
    """
    root = _parse_request(request)
    signed_info = root.find(f"{{{DS}}}SignedInfo")
    if signed_info is None:
        raise SignatureRequestRefused("the signature has no SignedInfo")
    return _c14n(signed_info)


def local_signer(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> Signer:
    """
    @return: a L{Signer} over a key held in this process.
    """

    def sign(request: bytes, algorithm: str) -> Deferred[bytes]:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unsupported signature algorithm {algorithm}")
        data = to_be_signed(request)
        if isinstance(key, rsa.RSAPrivateKey):
            value = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        else:
            value = key.sign(data, ec.ECDSA(hashes.SHA256()))
        return succeed(value)

    return sign


def _c14n(element: etree._Element) -> bytes:
    data: bytes = etree.tostring(
        element, method="c14n", exclusive=True, with_comments=False
    )
    return data


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _digest_reference(
    parent: etree._Element,
    uri: str,
    digest: bytes,
    *,
    kind: str | None = None,
    transform: bool = False,
) -> None:
    reference = etree.SubElement(parent, f"{{{DS}}}Reference", URI=uri)
    if kind:
        reference.set("Type", kind)
    if transform:
        transforms = etree.SubElement(reference, f"{{{DS}}}Transforms")
        etree.SubElement(transforms, f"{{{DS}}}Transform", Algorithm=EXC_C14N)
    etree.SubElement(reference, f"{{{DS}}}DigestMethod", Algorithm=SHA256)
    etree.SubElement(reference, f"{{{DS}}}DigestValue").text = _b64(digest)


def document_uri(unique_id: str) -> str:
    """
    @return: the Reference URI naming a document by its uniqueId.
    """
    return "urn:oid:" + quote(unique_id, safe=".")


def _skeleton(
    documents: Sequence[tuple[str, bytes]],
    set_id: str,
    certificate: x509.Certificate,
    chain: Sequence[x509.Certificate],
    algorithm: str,
    signing_time: datetime,
    signature_id: str,
) -> etree._Element:
    """
    @param documents: each document's uniqueId and the SHA-256 of its bytes.
    @return: the signature without its value: SignedInfo refers to the
        manifest, the signature properties and the XAdES signed
        properties, all in ds:Objects of the signature.
    """
    root = etree.Element(f"{{{DS}}}Signature", Id=signature_id, nsmap={"ds": DS})
    signed_info = etree.SubElement(root, f"{{{DS}}}SignedInfo")
    etree.SubElement(signed_info, f"{{{DS}}}CanonicalizationMethod", Algorithm=EXC_C14N)
    etree.SubElement(
        signed_info, f"{{{DS}}}SignatureMethod", Algorithm=ALGORITHMS[algorithm]
    )
    etree.SubElement(root, f"{{{DS}}}SignatureValue")
    key_info = etree.SubElement(root, f"{{{DS}}}KeyInfo")
    x509_data = etree.SubElement(key_info, f"{{{DS}}}X509Data")
    for cert in [certificate, *chain]:
        etree.SubElement(x509_data, f"{{{DS}}}X509Certificate").text = _b64(
            cert.public_bytes(serialization.Encoding.DER)
        )

    # The manifest: each document by uniqueId with the SHA-256 of its bytes.
    manifest_object = etree.SubElement(root, f"{{{DS}}}Object")
    manifest = etree.SubElement(manifest_object, f"{{{DS}}}Manifest", Id="IHEManifest")
    for unique_id, digest in documents:
        _digest_reference(manifest, document_uri(unique_id), digest)

    # What is signed and why: purpose of signature and the submission set.
    properties_object = etree.SubElement(root, f"{{{DS}}}Object")
    properties = etree.SubElement(
        properties_object, f"{{{DS}}}SignatureProperties", Id="SignatureProperties"
    )
    for name, value in [
        ("purposeOfSignature", PURPOSE_SOURCE),
        ("setId", set_id),
    ]:
        prop = etree.SubElement(
            properties, f"{{{DS}}}SignatureProperty", Id=name, Target=f"#{signature_id}"
        )
        prop.text = value

    # XAdES: signing time, signing certificate, implied policy.
    xades_object = etree.SubElement(root, f"{{{DS}}}Object")
    qualifying = etree.SubElement(
        xades_object,
        f"{{{XADES}}}QualifyingProperties",
        Target=f"#{signature_id}",
        nsmap={"xades": XADES},
    )
    signed = etree.SubElement(
        qualifying, f"{{{XADES}}}SignedProperties", Id="SignedProperties"
    )
    signature_properties = etree.SubElement(
        signed, f"{{{XADES}}}SignedSignatureProperties"
    )
    etree.SubElement(
        signature_properties, f"{{{XADES}}}SigningTime"
    ).text = signing_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    signing_certificate = etree.SubElement(
        signature_properties, f"{{{XADES}}}SigningCertificate"
    )
    cert = etree.SubElement(signing_certificate, f"{{{XADES}}}Cert")
    cert_digest = etree.SubElement(cert, f"{{{XADES}}}CertDigest")
    etree.SubElement(cert_digest, f"{{{DS}}}DigestMethod", Algorithm=SHA256)
    etree.SubElement(cert_digest, f"{{{DS}}}DigestValue").text = _b64(
        certificate.fingerprint(hashes.SHA256())
    )
    issuer_serial = etree.SubElement(cert, f"{{{XADES}}}IssuerSerial")
    etree.SubElement(
        issuer_serial, f"{{{DS}}}X509IssuerName"
    ).text = certificate.issuer.rfc4514_string()
    etree.SubElement(issuer_serial, f"{{{DS}}}X509SerialNumber").text = str(
        certificate.serial_number
    )
    policy = etree.SubElement(
        signature_properties, f"{{{XADES}}}SignaturePolicyIdentifier"
    )
    etree.SubElement(policy, f"{{{XADES}}}SignaturePolicyImplied")

    for target, kind in [
        (manifest, MANIFEST_TYPE),
        (properties, None),
        (signed, SIGNED_PROPERTIES_TYPE),
    ]:
        _digest_reference(
            signed_info,
            f"#{target.get('Id')}",
            hashlib.sha256(_c14n(target)).digest(),
            kind=kind,
            transform=True,
        )
    return root


def _raw_ecdsa(signature: bytes, key: ec.EllipticCurvePublicKey) -> bytes:
    # XML-DSig wants r||s; a DER-encoded ECDSA signature is converted.
    size = (key.curve.key_size + 7) // 8
    if len(signature) == 2 * size:
        return signature
    r, s = decode_dss_signature(signature)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def sign_submission(
    submission: Submission,
    signer: Signer,
    certificate: x509.Certificate,
    professional: Professional,
    structure: Structure,
    *,
    chain: Sequence[x509.Certificate] = (),
    algorithm: str = "SHA256WithRSA",
    clock: IReactorTime | None = None,
    timeout: float = 60.0,
    now: datetime | None = None,
) -> Deferred[Submission]:
    """
    Sign C{submission} and add the signature to it as a document with its
    own DocumentEntry, a HasMember and a C{signs} association.

    @param signer: makes the signature value over the canonical SignedInfo
        of the signature request it is handed.
    @param clock: when given, the signer gets C{timeout} seconds.
    @return: a Deferred that fires with the same L{Submission}, signed, or
        fails with L{SignatureInvalid} if the signer's value does not verify
        with C{certificate}.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unsupported signature algorithm {algorithm}")
    if any(d.entry.formatCode == SIGNATURE_FORMAT for d in submission.documents):
        raise MetadataError("this submission is already signed")
    moment = now or datetime.now(UTC)
    root = _skeleton(
        [
            (d.entry.uniqueId, hashlib.sha256(d.data).digest())
            for d in submission.documents
        ],
        submission.submission_set.uniqueId,
        certificate,
        chain,
        algorithm,
        moment,
        f"sig-{uuid.uuid4()}",
    )
    request: bytes = etree.tostring(root, encoding="UTF-8", xml_declaration=True)

    started = datetime.now(UTC)
    _log.info("submission-set signature asked ({algorithm})", algorithm=algorithm)
    waiting: Deferred[bytes] = maybeDeferred(signer, request, algorithm)
    if clock is not None:
        waiting.addTimeout(timeout, clock)

    def finish(value: bytes) -> Submission:
        _log.info(
            "submission-set signature returned in {seconds:.3f}s",
            seconds=(datetime.now(UTC) - started).total_seconds(),
        )
        public = certificate.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            value = _raw_ecdsa(value, public)
        root.find(f"{{{DS}}}SignatureValue").text = _b64(value)
        data: bytes = etree.tostring(root, encoding="UTF-8", xml_declaration=True)
        verify(data, {d.entry.uniqueId: d.data for d in submission.documents})
        _attach(submission, data, professional, structure, moment)
        return submission

    return waiting.addCallback(finish)


def _attach(
    submission: Submission,
    data: bytes,
    professional: Professional,
    structure: Structure,
    moment: datetime,
) -> None:
    first = submission.documents[0].entry
    digest = DocumentHash.of(data)
    when = xds_time(moment)
    entry = DocumentEntry(
        entryUUID=new_entry_uuid(),
        uniqueId=uuid_oid(),
        patientId=submission.submission_set.patientId,
        mimeType="text/xml",
        classCode=SIGNATURE_CLASS,
        typeCode=SIGNATURE_TYPE,
        formatCode=SIGNATURE_FORMAT,
        confidentialityCode=[NORMAL, INVISIBLE_PATIENT, MASQUE_PS],
        healthcareFacilityTypeCode=first.healthcareFacilityTypeCode,
        practiceSettingCode=first.practiceSettingCode,
        creationTime=when,
        languageCode="art",
        title="Source",
        authors=[author_of(professional, structure)],
        hash=digest.sha1,
        size=digest.size,
        serviceStartTime=when,
        serviceStopTime=when,
        legalAuthenticator=professional.person(),
        eventCodeList=[SIGNATURE_EVENT],
    )
    set_id = submission.submission_set.entryUUID
    submission.documents.append(SubmittedDocument(entry, data))
    submission.associations.append(Association.has_member(set_id, entry.entryUUID))
    submission.associations.append(
        Association(AssociationType.signs, entry.entryUUID, set_id)
    )


def _parse_request(request: bytes) -> etree._Element:
    try:
        root = parse_xml(request, what="signature request")
    except XmlRefused as e:
        raise SignatureRequestRefused(f"not a submission-set signature: {e}") from None
    if root.tag != f"{{{DS}}}Signature":
        raise SignatureRequestRefused("not an XML-DSig Signature")
    return root


def check_signature_request(
    request: bytes,
    algorithm: str,
    certificate: x509.Certificate,
    now: datetime | None = None,
) -> SignatureRequest:
    """
    Check that C{request} is a signature request as L{sign_submission}
    makes it for C{certificate} and C{algorithm}: every
    SignedInfo reference's digest recomputed from the element it names; a
    manifest of documents by uniqueId with SHA-256 digests; the submission
    set's uniqueId and the purpose in the signature properties; the signed
    properties naming C{certificate}, with a signing time within
    L{MAX_SIGNING_TIME_SKEW} of C{now}; and the whole, rebuilt by this
    module from what it says, identical to it: nothing else rides in it.
    The KeyInfo, which no reference covers and the signer does not sign,
    is not checked.

    @return: what it has signed, and what that signature is about.
    @raise SignatureRequestRefused: saying what is not so.
    """
    refused = SignatureRequestRefused
    root = _parse_request(request)
    method = ALGORITHMS.get(algorithm)
    if method is None:
        raise refused(
            f"{algorithm} is not a submission-set signature algorithm "
            f"({', '.join(ALGORITHMS)})"
        )
    ns = {"ds": DS, "xades": XADES}
    signed_info = root.find("ds:SignedInfo", ns)
    if signed_info is None:
        raise refused("the signature has no SignedInfo")
    found = signed_info.find("ds:SignatureMethod", ns)
    if found is None or found.get("Algorithm") != method:
        raise refused(f"the SignatureMethod is not {method} ({algorithm})")

    # Every digest of the SignedInfo, recomputed from what it names.
    for reference in signed_info.iterfind("ds:Reference", ns):
        uri = reference.get("URI", "")
        targets = root.xpath("//*[@Id=$id]", id=uri[1:])
        if not uri.startswith("#") or len(targets) != 1:
            raise refused(f"the SignedInfo's reference {uri!r} names no single element")
        try:
            _check_digest(reference, _c14n(targets[0]), uri)
        except SignatureInvalid as e:
            raise refused(f"{e} in the SignedInfo") from None

    # What the signature is about: documents, submission set, time, signer.
    documents = _manifest(root.find("ds:Object/ds:Manifest", ns))
    set_id = root.findtext(
        "ds:Object/ds:SignatureProperties/ds:SignatureProperty[@Id='setId']",
        namespaces=ns,
    )
    if not set_id or not is_unique_id(set_id, document=False):
        raise refused(
            "the signature properties name no submission set uniqueId (an OID "
            f"of at most {MAX_OID} characters)"
        )
    signing_time = _signing_time(root, now or datetime.now(UTC))
    cert_digest = root.findtext(
        ".//xades:SigningCertificate//ds:DigestValue", namespaces=ns
    )
    if cert_digest != _b64(certificate.fingerprint(hashes.SHA256())):
        raise refused(
            "the signing certificate in the signed properties is not the card's "
            "signature certificate"
        )
    signature_id = root.get("Id", "")
    if not _SIGNATURE_ID.fullmatch(signature_id):
        raise refused("the signature's Id is not one the project's signer makes")

    # The whole request, as this module makes it from the same facts. Its
    # KeyInfo, which no reference covers, is taken as it is.
    expected = _skeleton(
        documents, set_id, certificate, (), algorithm, signing_time, signature_id
    )
    key_info = root.find("ds:KeyInfo", ns)
    if key_info is not None:
        expected.replace(expected.find("ds:KeyInfo", ns), copy.deepcopy(key_info))
    # The objects first: a SignedInfo differs whenever one of them does.
    parts = sorted(
        zip(expected, root, strict=False),
        key=lambda p: p[0] is not None and etree.QName(p[0]).localname == "SignedInfo",
    )
    for mine, theirs in parts:
        if _c14n(mine) != _c14n(theirs):
            raise refused(
                f"its {_part_name(mine)} is not what the project's signer "
                "makes for these documents, this submission set and this card"
            )
    if _c14n(expected) != _c14n(root):
        raise refused(
            "it is not what the project's signer makes for these documents, this "
            "submission set and this card (other elements or attributes)"
        )
    return SignatureRequest(_c14n(signed_info), set_id, tuple(documents), signing_time)


def _part_name(element: etree._Element) -> str:
    """
    @return: the local name of a part of the signature, or of what a
        ds:Object holds.
    """
    if etree.QName(element).localname == "Object" and len(element):
        element = element[0]
    return str(etree.QName(element).localname)


def _manifest(manifest: etree._Element | None) -> list[tuple[str, bytes]]:
    """
    @return: the uniqueId and SHA-256 of each document the manifest lists.
    """
    refused = SignatureRequestRefused
    if manifest is None:
        raise refused("the signature has no IHE manifest")
    documents: list[tuple[str, bytes]] = []
    for reference in manifest:
        uri = reference.get("URI", "") if reference.tag == f"{{{DS}}}Reference" else ""
        unique_id = unquote(uri.removeprefix("urn:oid:"))
        if (
            not uri.startswith("urn:oid:")
            or document_uri(unique_id) != uri
            or not is_unique_id(unique_id, document=True)
        ):
            raise refused(
                "the manifest lists something else than documents by uniqueId "
                f"(an OID of at most {MAX_OID} characters, or OID^extension with "
                f"an extension of at most {MAX_EXTENSION}): {uri[:80]!r}"
            )
        try:
            digest = base64.b64decode(
                reference.findtext(f"{{{DS}}}DigestValue") or "", validate=True
            )
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise refused(f"the manifest's reference {uri} has no SHA-256 digest")
        documents.append((unique_id, digest))
    if not documents:
        raise refused("the manifest lists no document")
    if len({u for u, _ in documents}) != len(documents):
        raise refused("the manifest lists a document twice")
    return documents


def _signing_time(root: etree._Element, now: datetime) -> datetime:
    text = root.findtext(
        f".//{{{XADES}}}SignedSignatureProperties/{{{XADES}}}SigningTime"
    )
    try:
        moment = datetime.strptime(text or "", "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise SignatureRequestRefused(
            "the signed properties have no signing time (YYYY-MM-DDThh:mm:ssZ)"
        ) from None
    if abs(now - moment) > MAX_SIGNING_TIME_SKEW:
        raise SignatureRequestRefused(
            f"the signing time {text} is more than "
            f"{MAX_SIGNING_TIME_SKEW.total_seconds() / 60:g} minutes from now "
            f"({now.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ})"
        )
    return moment


def verify(
    data: bytes,
    documents: dict[str, bytes | memoryview],
    certificate: x509.Certificate | None = None,
) -> x509.Certificate:
    """
    Check a submission-set signature: the SignatureValue over the exclusive
    C14N of SignedInfo, each SignedInfo reference's digest, and each
    manifest reference against the documents' bytes.

    @param documents: uniqueId -> exact bytes of every signed document.
    @param certificate: the expected signer; by default the first
        certificate of KeyInfo.
    @return: the signer's certificate.
    @raise SignatureInvalid: naming what does not match.
    """
    root = parse_xml(data, what="submission-set signature")
    ns = {"ds": DS}
    if root.tag != f"{{{DS}}}Signature":
        raise SignatureInvalid("not an XML signature")
    if certificate is None:
        encoded = root.findtext(
            "ds:KeyInfo/ds:X509Data/ds:X509Certificate", namespaces=ns
        )
        if not encoded:
            raise SignatureInvalid("no signer certificate in KeyInfo")
        certificate = x509.load_der_x509_certificate(base64.b64decode(encoded))

    signed_info = root.find("ds:SignedInfo", ns)
    method = signed_info.find("ds:SignatureMethod", ns).get("Algorithm")
    value = base64.b64decode(root.findtext("ds:SignatureValue", namespaces=ns) or "")
    public = certificate.public_key()
    try:
        if (
            isinstance(public, rsa.RSAPublicKey)
            and method == ALGORITHMS["SHA256WithRSA"]
        ):
            public.verify(
                value, _c14n(signed_info), padding.PKCS1v15(), hashes.SHA256()
            )
        elif (
            isinstance(public, ec.EllipticCurvePublicKey)
            and method == ALGORITHMS["SHA256WithECDSA"]
        ):
            size = len(value) // 2
            der = encode_dss_signature(
                int.from_bytes(value[:size], "big"), int.from_bytes(value[size:], "big")
            )
            public.verify(der, _c14n(signed_info), ec.ECDSA(hashes.SHA256()))
        else:
            raise SignatureInvalid(f"signature method {method} does not fit the key")
    except InvalidSignature:
        raise SignatureInvalid("the SignatureValue does not verify") from None

    for reference in signed_info.iterfind("ds:Reference", ns):
        uri = reference.get("URI", "")
        targets = root.xpath("//*[@Id=$id]", id=uri[1:])
        if not uri.startswith("#") or len(targets) != 1:
            raise SignatureInvalid(f"reference {uri} names no single element")
        _check_digest(reference, _c14n(targets[0]), uri)

    manifest = root.find("ds:Object/ds:Manifest", ns)
    if manifest is None:
        raise SignatureInvalid("no IHE manifest")
    listed = {}
    for reference in manifest.iterfind("ds:Reference", ns):
        listed[reference.get("URI", "")] = reference
    expected = {document_uri(u): d for u, d in documents.items()}
    missing = set(listed) ^ set(expected)
    if missing:
        raise SignatureInvalid(
            f"the manifest and the submission differ on {', '.join(sorted(missing))}"
        )
    for uri, reference in listed.items():
        _check_digest(reference, expected[uri], uri)
    return certificate


def _check_digest(
    reference: etree._Element, data: bytes | memoryview, name: str
) -> None:
    ns = {"ds": DS}
    method = reference.find("ds:DigestMethod", ns)
    if method is None or method.get("Algorithm") != SHA256:
        raise SignatureInvalid(f"reference {name} does not use SHA-256")
    try:
        expected = base64.b64decode(
            reference.findtext("ds:DigestValue", namespaces=ns) or "", validate=True
        )
    except ValueError:
        raise SignatureInvalid(f"reference {name} has no base64 digest") from None
    if hashlib.sha256(data).digest() != expected:
        raise SignatureInvalid(f"the digest of {name} does not match")
