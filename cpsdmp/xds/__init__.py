"""
What cpsdmp says to the DMP and reads back, independent of how it travels
(TLS and the card agent are elsewhere).

  - L{cpsdmp.xds.context}: the inputs, who acts (L{Professional}), for which
    structure, with which software, and submission defaults;
  - L{cpsdmp.xds.ebrim}: the XDS metadata model (DocumentEntry,
    SubmissionSet, Association) and its ebRIM 3.0 form;
  - L{cpsdmp.xds.cda}: a CDA document's DocumentEntry;
  - L{cpsdmp.xds.vihf}: the VIHF SAML assertion of every request;
  - L{cpsdmp.xds.transactions}: TD0.2, TD2.1, TD3.1, TD3.2, TD3.3 requests
    and the readers of their answers; L{cpsdmp.xds.responses}: the errors;
  - L{cpsdmp.xds.signature}: the submission-set signature;
  - L{cpsdmp.xds.submit}: a CDA to a signed TD2.1 request in one call.
"""
