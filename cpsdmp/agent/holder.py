"""
Who a CPS card belongs to, read from its authentication certificate: what
the agent describes in C{/cps/card}, and what the facade takes for the VIHF
from the certificate the DMP itself validates.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Holder:
    """
    Who the card belongs to, as its authentication certificate says.
    """

    id: str
    name: str
    profession: str


def holder_from_certificate(certificate: x509.Certificate) -> Holder:
    """
    Read the holder's identifier (RPPS-style), name and profession from a
    card certificate's subject.
    """
    subject = certificate.subject

    def first(oid: x509.ObjectIdentifier) -> str:
        values = subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else ""

    common_name = first(NameOID.COMMON_NAME)
    identifier = first(NameOID.SERIAL_NUMBER)
    head, _, tail = common_name.partition("/")
    if not identifier and head.strip().isdigit():
        identifier = head.strip()
    name = " ".join(
        part for part in (first(NameOID.GIVEN_NAME), first(NameOID.SURNAME)) if part
    )
    if not name:
        name = tail.strip() if tail else common_name
    profession = first(NameOID.TITLE) or first(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return Holder(id=identifier, name=name, profession=profession)
