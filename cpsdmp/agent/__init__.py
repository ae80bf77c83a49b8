"""
The workstation agent (C{twist cpsagent}): access to the CPS card, the REST
resource that serves it over HTTPS, and L{client.CpsAgentClient}, through
which the rest of cpsdmp reaches it; also the test card and its PKI.
"""
