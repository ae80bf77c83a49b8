"""
A TLS 1.2 client whose private key lives elsewhere: on a CPS card, reached
through the agent, or in-process for tests. The handshake asks an
L{IRemoteKey} for the client certificate chain and for the CertificateVerify
signature, and waits on the Deferreds it returns.
"""
