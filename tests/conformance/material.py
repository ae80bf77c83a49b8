"""
Access to the public DMP material for the conformance tests: example CDAs,
official example messages, XSDs. The material is not shipped with the
project; a missing folder is an error that says where it was looked for.
"""

from __future__ import annotations

import functools
from pathlib import Path

from lxml import etree

from cpsdmp._fixtures import fixtures_dir, fixtures_missing


def material() -> Path:
    folder = fixtures_dir()
    if folder is None:
        raise RuntimeError(
            f"the public DMP material was not found: {fixtures_missing()}"
        )
    return folder


def example_cdas() -> list[Path]:
    return sorted((material() / "ans-testcontenucda-3-0" / "ExemplesCDA").glob("*.xml"))


def example_message(name: str) -> bytes:
    return (material() / "gie-sv-dmp-package" / "exemples-messages" / name).read_bytes()


@functools.cache
def schema(relative: str) -> etree.XMLSchema:
    """
    @param relative: the XSD's path inside the material folder.
    """
    path = material() / relative
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    return etree.XMLSchema(etree.parse(str(path), parser))


RIM_XSD = "gie-sv-dmp-package/schema/ebRS/rim.xsd"
LCM_XSD = "gie-sv-dmp-package/schema/ebRS/lcm.xsd"
QUERY_XSD = "gie-sv-dmp-package/schema/ebRS/query.xsd"
RS_XSD = "gie-sv-dmp-package/schema/ebRS/rs.xsd"
XDSB_XSD = "gie-sv-dmp-package/schema/IHE/XDS.b_DocumentRepository.xsd"
CDA_XSD = "ans-testcontenucda-3-0/infrastructure/cda/CDA_extended.xsd"


def assert_valid(case, xsd: str, element: etree._Element) -> None:
    """
    Fail C{case} with the schema's own messages if C{element} is not valid.
    """
    validator = schema(xsd)
    document = etree.fromstring(etree.tostring(element))
    if not validator.validate(document):
        case.fail(
            f"not valid against {xsd}:\n"
            + "\n".join(str(e) for e in validator.error_log)
        )


@functools.cache
def value_set(name: str) -> frozenset[tuple[str, str]]:
    """
    @param name: the start of a value set's file name in the ANS material's
        jeuxDeValeurs folder (C{"JDV_J07"}).
    @return: the (code, codeSystem) pairs the value set lists.
    """
    folder = material() / "ans-testcontenucda-3-0" / "jeuxDeValeurs"
    (path,) = folder.glob(f"{name}_*.xml")
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    tree = etree.parse(str(path), parser)
    return frozenset(
        (concept.get("code"), concept.get("codeSystem"))
        for concept in tree.iter("{urn:ihe:iti:svs:2008}Concept")
    )
