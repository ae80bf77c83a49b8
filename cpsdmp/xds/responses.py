"""
Reading the DMP's answers: the ebRS RegistryResponse (and the query and
retrieve answers that embed one), with each RegistryError as a typed value,
and the HL7 v3 acknowledgement of the patient-management transactions.

A submission is only done on C{Success}: L{raise_for_status} turns a
C{PartialSuccess} or a C{Failure} into an exception that carries every
error the DMP gave, code and context included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree
from twisted.logger import Logger

from cpsdmp.xds.ebrim import RS

SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
PARTIAL_SUCCESS = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"
FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"

_log = Logger()
SEVERITY_ERROR = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"
SEVERITY_WARNING = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Warning"


class DmpError(Exception):
    """
    The DMP refused or could not carry out a request.
    """


class UnexpectedAnswer(DmpError):
    """
    The DMP's answer does not have the expected shape.
    """


@dataclass(frozen=True)
class RegistryError:
    """
    One C{rs:RegistryError}: the DMP's code (C{XDSRegistryError},
    C{DMPxxxx}...), its message, severity and location.
    """

    code: str
    context: str
    severity: str
    location: str = ""

    @property
    def is_error(self) -> bool:
        return self.severity != SEVERITY_WARNING

    def __str__(self) -> str:
        """
        The error in words. Its location is where XDS says the error is,
        often the id of the object concerned, which the context may
        already name: it is added only when the context does not say it.
        """
        kind = "warning" if not self.is_error else "error"
        where = ""
        if self.location and self.location not in self.context:
            where = f" (location {self.location})"
        return f"{kind} {self.code}: {self.context}{where}"


@dataclass
class RegistryResult:
    """
    The status of a RegistryResponse and its errors and warnings.
    """

    status: str
    errors: list[RegistryError] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.status == SUCCESS

    @property
    def warnings(self) -> list[RegistryError]:
        return [e for e in self.errors if not e.is_error]


class RegistryFailure(DmpError):
    """
    The DMP answered C{Failure}.

    @ivar errors: every RegistryError of the answer.
    """

    def __init__(self, result: RegistryResult) -> None:
        self.result = result
        self.errors = result.errors
        summary = "; ".join(str(e) for e in result.errors) or "no error detail"
        super().__init__(f"the DMP refused the request ({self.label}): {summary}")

    label = "failure"

    @property
    def code(self) -> str | None:
        """
        The first error's code, the one to show a professional.
        """
        return self.errors[0].code if self.errors else None


class PartialSuccess(RegistryFailure):
    """
    The DMP answered C{PartialSuccess}: some of the request was not done.
    """

    label = "partial success"


def registry_result(element: etree._Element) -> RegistryResult:
    """
    Read the status and errors of a C{rs:RegistryResponse} or of an element
    with the same shape (C{query:AdhocQueryResponse}).

    @raise UnexpectedAnswer: no status.
    """
    status = element.get("status")
    if not status:
        raise UnexpectedAnswer(f"{etree.QName(element).localname} without status")
    errors = [
        RegistryError(
            code=error.get("errorCode", ""),
            context=error.get("codeContext", "") or (error.text or "").strip(),
            severity=error.get("severity", SEVERITY_ERROR),
            location=error.get("location", ""),
        )
        for error in element.iterfind(
            f"{{{RS}}}RegistryErrorList/{{{RS}}}RegistryError"
        )
    ]
    return RegistryResult(status, errors)


def raise_for_status(result: RegistryResult) -> RegistryResult:
    """
    @return: C{result} when it is a success.
    @raise PartialSuccess: on C{PartialSuccess}.
    @raise RegistryFailure: on C{Failure} or any other status.
    """
    _log.info(
        "DMP answer {status} {codes}",
        status=result.status.rsplit(":", 1)[-1],
        codes=",".join(e.code for e in result.errors) or "-",
    )
    if result.status == SUCCESS:
        return result
    if result.status == PARTIAL_SUCCESS:
        raise PartialSuccess(result)
    raise RegistryFailure(result)


def find_registry_response(body: etree._Element) -> etree._Element:
    """
    @return: the C{rs:RegistryResponse} that is, or is in, C{body}.
    @raise UnexpectedAnswer: there is none.
    """
    if body.tag == f"{{{RS}}}RegistryResponse":
        return body
    found = body.find(f"{{{RS}}}RegistryResponse")
    if found is None:
        raise UnexpectedAnswer(
            f"expected a RegistryResponse, got {etree.QName(body).localname}"
        )
    return found
