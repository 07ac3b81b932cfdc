"""Development-only tools: a dev PKI (``devpki``), the demo API that stands in for a private API Gateway
(``demo_upstream``), and ``demo``, which runs the proxy in front of it with those certificates.

Nothing in the proxy itself imports this package (tests/test_architecture.py keeps it above every product layer);
only the command line does (``mtls-proxy demo``, ``certs init``); the compose file runs the demo API as
``python -m proxy.dev.demo_upstream``.
"""
