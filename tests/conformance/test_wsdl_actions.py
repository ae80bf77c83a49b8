"""
The SOAP actions we send are the ones the DMP's WSDLs declare, for the
input of the operation each transaction performs.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.protocols.safexml import parse_xml
from cpsdmp.xds.transactions import (
    ACTION_EXISTENCE,
    ACTION_PROVIDE_AND_REGISTER,
    ACTION_RETRIEVE,
    ACTION_STORED_QUERY,
    ACTION_UPDATE,
)
from tests.conformance.material import material

WSDL = "http://schemas.xmlsoap.org/wsdl/"
WSAW = "http://www.w3.org/2006/05/addressing/wsdl"


def input_actions(name: str) -> dict[str, str]:
    # operation name -> wsaw:Action of its input, from the portType.
    path = material() / "gie-sv-dmp-package/wsdl" / name
    root = parse_xml(path.read_bytes(), what=name)
    actions = {}
    for operation in root.iterfind(f"{{{WSDL}}}portType/{{{WSDL}}}operation"):
        message = operation.find(f"{{{WSDL}}}input")
        actions[operation.get("name")] = message.get(f"{{{WSAW}}}Action")
    return actions


class WsdlActionTests(SynchronousTestCase):
    def test_actions(self) -> None:
        """
        Each transaction's action is its WSDL operation's input action.
        """
        repository = input_actions("XDS.b_DocumentRepository.wsdl")
        registry = input_actions("XDS.b_DocumentRegistry.wsdl")
        patients = input_actions("GestionDossierPatientPartage.wsdl")
        self.assertIn(ACTION_PROVIDE_AND_REGISTER, repository.values())
        self.assertIn(ACTION_RETRIEVE, repository.values())
        self.assertIn(ACTION_STORED_QUERY, registry.values())
        self.assertIn(ACTION_UPDATE, registry.values())
        self.assertIn(ACTION_EXISTENCE, patients.values())
