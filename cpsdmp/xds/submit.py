"""
From CDA documents to a signed TD2.1 request in one call, as the facade
uses it: derive each document's metadata, gather them in a submission set
authored by the card holder, sign the set through the given signer, and
wrap it all in the SOAP/MTOM request with the VIHF.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from cpsdmp.xds.cda import document_entry
from cpsdmp.xds.context import Professional, Software, Structure, SubmissionDefaults
from cpsdmp.xds.ebrim import MetadataError
from cpsdmp.xds.signature import Signer, sign_submission
from cpsdmp.xds.transactions import (
    DmpEndpoints,
    OutgoingMessage,
    Submission,
    new_submission,
    provide_and_register,
)
from cpsdmp.xds.vihf import NORMAL_ACCESS, VihfRequest


@dataclass
class PreparedSubmission:
    """
    A TD2.1 ready to send, and the submission it carries (to report the
    uniqueIds and entryUUIDs once the DMP answered).
    """

    submission: Submission
    message: OutgoingMessage


@dataclass(frozen=True)
class SigningIdentity:
    """
    How the submission set is signed: the signer, its certificate (the
    card's signature certificate) and chain, and the algorithm name the
    signer takes.
    """

    signer: Signer
    certificate: x509.Certificate
    chain: Sequence[x509.Certificate] = ()
    algorithm: str = "SHA256WithRSA"


def prepare_td21(
    documents: Sequence[bytes],
    *,
    professional: Professional,
    structure: Structure,
    software: Software,
    defaults: SubmissionDefaults,
    endpoints: DmpEndpoints,
    issuer: str,
    signing: SigningIdentity | None,
    overrides: Sequence[dict[str, object]] | None = None,
    clock: IReactorTime | None = None,
) -> Deferred[PreparedSubmission]:
    """
    @param documents: the CDA documents, exact bytes, about one patient.
    @param issuer: the subject DN of the card's authentication certificate,
        for the VIHF.
    @param signing: how to sign the submission set; C{None} leaves it
        unsigned (for a DMP that does not ask for it, or tests).
    @param overrides: per document, XDS attribute values that win over the
        CDA's.
    @return: a Deferred that fires with the L{PreparedSubmission}.
    @raise CdaError: a document lacks a mandatory element (synchronously).
    """
    if overrides is not None and len(overrides) != len(documents):
        raise MetadataError("one overrides mapping per document, or none")
    entries = [
        (
            document_entry(
                data, structure, defaults, overrides[i] if overrides else None
            ),
            data,
        )
        for i, data in enumerate(documents)
    ]
    submission = new_submission(entries, professional, structure, software, defaults)
    vihf = VihfRequest(
        professional,
        structure,
        software,
        issuer=issuer,
        patient=submission.submission_set.patientId,
        purpose_of_use=NORMAL_ACCESS,
    )

    def wrap(signed: Submission) -> PreparedSubmission:
        return PreparedSubmission(signed, provide_and_register(endpoints, vihf, signed))

    if signing is None:
        return succeed(wrap(submission))
    return sign_submission(
        submission,
        signing.signer,
        signing.certificate,
        professional,
        structure,
        chain=signing.chain,
        algorithm=signing.algorithm,
        clock=clock,
    ).addCallback(wrap)
