"""
The SOAP actions we send are the ones the DMP's WSDLs declare for the
operation each transaction performs (its input's wsaw:Action and its SOAP
1.2 binding's soapAction), and the actions of the answers the local DMP
gives are that operation's output actions; the official example messages
carry the same.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.protocols.safexml import parse_xml
from cpsdmp.protocols.soap import read_message
from cpsdmp.xds.answers import (
    ACTION_EXISTENCE_ANSWER,
    ACTION_PROVIDE_AND_REGISTER_ANSWER,
    ACTION_RETRIEVE_ANSWER,
    ACTION_STORED_QUERY_ANSWER,
    ACTION_UPDATE_ANSWER,
)
from cpsdmp.xds.transactions import (
    ACTION_EXISTENCE,
    ACTION_PROVIDE_AND_REGISTER,
    ACTION_RETRIEVE,
    ACTION_STORED_QUERY,
    ACTION_UPDATE,
)
from tests.conformance.material import example_message, material

WSDL = "http://schemas.xmlsoap.org/wsdl/"
WSAW = "http://www.w3.org/2006/05/addressing/wsdl"
SOAP12_BINDING = "http://schemas.xmlsoap.org/wsdl/soap12/"

#: Transaction -> (WSDL, operation, our request action, our answer action).
OPERATIONS = {
    "TD0.2": (
        "GestionDossierPatientPartage.wsdl",
        "PatientGetDemographics_PRPA_IN201307UV02",
        ACTION_EXISTENCE,
        ACTION_EXISTENCE_ANSWER,
    ),
    "TD2.1": (
        "XDS.b_DocumentRepository.wsdl",
        "DocumentRepository_ProvideAndRegisterDocumentSet-b",
        ACTION_PROVIDE_AND_REGISTER,
        ACTION_PROVIDE_AND_REGISTER_ANSWER,
    ),
    "TD3.1": (
        "XDS.b_DocumentRegistry.wsdl",
        "DocumentRegistry_RegistryStoredQuery",
        ACTION_STORED_QUERY,
        ACTION_STORED_QUERY_ANSWER,
    ),
    "TD3.2": (
        "XDS.b_DocumentRepository.wsdl",
        "DocumentRepository_RetrieveDocumentSet",
        ACTION_RETRIEVE,
        ACTION_RETRIEVE_ANSWER,
    ),
    "TD3.3": (
        "XDS.b_DocumentRegistry.wsdl",
        "DocumentRegistry_UpdateDocumentSet",
        ACTION_UPDATE,
        ACTION_UPDATE_ANSWER,
    ),
}


def declared(name: str, operation: str) -> tuple[str, str, str]:
    """
    @return: the input and output wsaw:Action of C{operation} in the port
        type, and the soapAction of its SOAP 1.2 binding.
    """
    path = material() / "gie-sv-dmp-package/wsdl" / name
    root = parse_xml(path.read_bytes(), what=name)
    (in_port_type,) = root.xpath(
        "w:portType/w:operation[@name=$n]", n=operation, namespaces={"w": WSDL}
    )
    (in_binding,) = root.xpath(
        "w:binding/w:operation[@name=$n]/s:operation",
        n=operation,
        namespaces={"w": WSDL, "s": SOAP12_BINDING},
    )
    return (
        in_port_type.find(f"{{{WSDL}}}input").get(f"{{{WSAW}}}Action"),
        in_port_type.find(f"{{{WSDL}}}output").get(f"{{{WSAW}}}Action"),
        in_binding.get("soapAction"),
    )


class WsdlActionTests(SynchronousTestCase):
    def test_actions(self) -> None:
        """
        Each transaction's request action is its WSDL operation's input
        action and soapAction; its answer's action is the output action.
        """
        for transaction, (name, operation, request, answer) in OPERATIONS.items():
            input_action, output_action, soap_action = declared(name, operation)
            self.assertEqual(request, input_action, transaction)
            self.assertEqual(request, soap_action, transaction)
            self.assertEqual(answer, output_action, transaction)

    def test_official_examples(self) -> None:
        """
        The official example messages carry the same actions as ours, for
        the requests and for the answers.
        """
        for name, action in [
            ("td0.2_request.xml", ACTION_EXISTENCE),
            ("td0.2_response.xml", ACTION_EXISTENCE_ANSWER),
            ("td2.1_response.xml", ACTION_PROVIDE_AND_REGISTER_ANSWER),
            ("td3.1_request.xml", ACTION_STORED_QUERY),
            ("td3.2_request.xml", ACTION_RETRIEVE),
            ("td3.3c_request.xml", ACTION_UPDATE),
            ("td3.3c_response.xml", ACTION_UPDATE_ANSWER),
            ("td3.3d_request.xml", ACTION_UPDATE),
            ("td3.3d_response.xml", ACTION_UPDATE_ANSWER),
        ]:
            message = read_message("application/soap+xml", example_message(name))
            self.assertEqual(message.addressing("Action"), action, name)
