"""
The `twist` plugins of cpsdmp. This folder has no __init__.py on purpose:
Twisted gathers every `twisted/plugins` directory on sys.path.
"""

from twisted.application.service import ServiceMaker

cpsagent = ServiceMaker(
    "cpsdmp CPS agent",
    "cpsdmp.agent.tap",
    "The workstation agent that signs with the CPS card through PKCS#11.",
    "cpsagent",
)

dmpsandbox = ServiceMaker(
    "cpsdmp DMP sandbox",
    "cpsdmp.sandbox.tap",
    "A local DMP for development and tests: mutual TLS, SOAP services, SQLite.",
    "dmpsandbox",
)

dmpfacade = ServiceMaker(
    "cpsdmp DMP facade",
    "cpsdmp.facade.tap",
    "REST + JSON for backends: DMP transactions with the professional's CPS card.",
    "dmpfacade",
)
