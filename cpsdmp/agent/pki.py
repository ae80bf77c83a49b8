"""
A test certificate hierarchy shaped like IGC-Santé: a root, an intermediate
that issues the professionals' card certificates, one that issues server
certificates, and the leaves a local DMP and a test CPS card need.

Nothing here is trusted anywhere but in a developer's own test setup: every
name carries "TEST", as the real test hierarchy's names do.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
)

_DAY = datetime.timedelta(days=1)


def _name(common_name: str, organizational_unit: str = "IGC-SANTE TEST") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ASIP-SANTE"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, organizational_unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@dataclass(frozen=True)
class Authority:
    """
    A certificate authority of the test hierarchy: its key and certificate.
    """

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    def issue(
        self,
        subject: x509.Name,
        public_key: CertificatePublicKeyTypes,
        *,
        days: int,
        extensions: list[tuple[x509.ExtensionType, bool]],
        now: datetime.datetime | None = None,
    ) -> x509.Certificate:
        """
        @return: a certificate for C{public_key} signed by this authority.
        """
        return _build(
            subject,
            public_key,
            self.certificate.subject,
            self.key,
            self.key.public_key(),
            days=days,
            extensions=extensions,
            now=now,
        )


def _build(
    subject: x509.Name,
    public_key: CertificatePublicKeyTypes,
    issuer: x509.Name,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    issuer_public_key: rsa.RSAPublicKey,
    *,
    days: int,
    extensions: list[tuple[x509.ExtensionType, bool]],
    now: datetime.datetime | None,
) -> x509.Certificate:
    start = (now or datetime.datetime.now(datetime.UTC)) - _DAY
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + days * _DAY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key),
            False,
        )
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _ca_extensions(path_length: int | None) -> list[tuple[x509.ExtensionType, bool]]:
    return [
        (x509.BasicConstraints(ca=True, path_length=path_length), True),
        (
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        ),
    ]


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_root() -> Authority:
    """
    @return: a new self-signed root, "TEST AC RACINE IGC-SANTE ELEMENTAIRE".
    """
    key = _new_key()
    name = _name("TEST AC RACINE IGC-SANTE ELEMENTAIRE")
    certificate = _build(
        name,
        key.public_key(),
        name,
        key,
        key.public_key(),
        days=3650,
        extensions=_ca_extensions(None),
        now=None,
    )
    return Authority(key, certificate)


def make_intermediate(root: Authority, common_name: str) -> Authority:
    """
    @return: a new intermediate authority under C{root}.
    """
    key = _new_key()
    certificate = root.issue(
        _name(common_name),
        key.public_key(),
        days=1825,
        extensions=_ca_extensions(0),
    )
    return Authority(key, certificate)


def _leaf_key_usage(*, signature: bool, non_repudiation: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signature,
        content_commitment=non_repudiation,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def server_certificate(
    authority: Authority,
    public_key: CertificatePublicKeyTypes,
    dns_names: list[str],
    ip_addresses: list[str],
) -> x509.Certificate:
    """
    @return: a TLS server certificate for the given names, as a DMP server
        certificate would be, with every name in its subjectAltName.
    """
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CPSDMP SANDBOX"),
            x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0]),
        ]
    )
    return authority.issue(
        subject,
        public_key,
        days=825,
        extensions=[
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (_leaf_key_usage(signature=True, non_repudiation=False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (x509.SubjectAlternativeName(alt_names), False),
        ],
    )


@dataclass(frozen=True)
class Professional:
    """
    The card holder: a national identifier ("8" followed by the RPPS number,
    as on a CPS card), a name and a profession.
    """

    id: str
    given_name: str
    family_name: str
    profession: str
    profession_code: str
    specialty: str
    organization: str

    @property
    def name(self) -> str:
        return f"{self.given_name} {self.family_name}"

    def subject(self, usage: str) -> x509.Name:
        """
        @param usage: C{"authentication"} or C{"signature"}, kept in the
            subject's OU so that the two certificates differ by name.
        """
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.organization),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, usage),
                x509.NameAttribute(NameOID.TITLE, self.profession),
                x509.NameAttribute(NameOID.SURNAME, self.family_name),
                x509.NameAttribute(NameOID.GIVEN_NAME, self.given_name),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{self.id}/{self.name}"),
            ]
        )


def card_certificate(
    authority: Authority,
    public_key: CertificatePublicKeyTypes,
    professional: Professional,
    usage: str,
) -> x509.Certificate:
    """
    @param usage: C{"authentication"} (TLS client authentication) or
        C{"signature"} (non-repudiation, for document signatures).
    @return: the card certificate of C{professional} for that usage.
    """
    if usage == "authentication":
        key_usage = _leaf_key_usage(signature=True, non_repudiation=False)
        extended = [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)]
    elif usage == "signature":
        key_usage = _leaf_key_usage(signature=False, non_repudiation=True)
        extended = []
    else:
        raise ValueError(f"unknown card certificate usage {usage!r}")
    return authority.issue(
        professional.subject(usage),
        public_key,
        days=1095,
        extensions=[
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (key_usage, True),
            *extended,
        ],
    )


def verify_card_chain(
    chain: list[x509.Certificate], roots: list[x509.Certificate]
) -> list[x509.Certificate]:
    """
    Validate a card's certificate chain, leaf first, as a TLS client chain
    under C{roots}. CPS certificates carry no subjectAltName, which the Web
    PKI defaults ask of a client certificate; every other default applies.

    @return: the validated path, leaf to root.
    @raise cryptography.x509.verification.VerificationError: when it does
        not validate.
    """
    ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    verifier = (
        PolicyBuilder()
        .store(Store(roots))
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy
        )
        .build_client_verifier()
    )
    return verifier.verify(chain[0], chain[1:]).chain
