"""``mtls-proxy demo``: the proxy in front of the built-in demo API, with development certificates.

Owns: creating the dev PKI if DIR has none, writing DIR/demo.toml (TLS 1.2 + 1.3, CRL on, one rule allowing the
certificate named "client" on every path; "other" is valid but allowed by no rule), starting the demo upstream
and the proxy in one process, and printing the partner smoke-test commands.

Must not: be used in production (the PKI is throw-away).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from .. import config as config_mod
from . import demo_upstream
from .devpki import init_dev_pki
from ..server import run

DEMO_TOML = """\
# Written by `mtls-proxy demo`: the proxy in front of the built-in demo API (development only).
[server]
listen = "{listen}"
cert = "server.crt"
key = "server.key"
client_ca = "ca.crt"
crl = "crl.pem"

[upstream]
url = "https://demo.execute-api.local/prod"   # Host, SNI and the name the upstream certificate must carry
connect_to = "127.0.0.1:{upstream_port}"        # where the demo API really listens
api_id = "demo"
ca_bundle = "upstream-ca.crt"

[admin]
listen = "{admin}"

[[allow]]
name = "demo-client"
subject_cn = ["client"]
"""


async def run_demo(directory: Path, listen: str, admin: str, upstream_port: int) -> int:
    if not (directory / "ca.crt").exists():
        init_dev_pki(directory, clients=["other"])
        print(f"generated development certificates in {directory}/")
    toml = directory / "demo.toml"
    toml.write_text(DEMO_TOML.format(listen=listen, admin=admin, upstream_port=upstream_port))
    cfg = config_mod.load(toml)
    runner = await demo_upstream.start("127.0.0.1", upstream_port, str(directory / "upstream.crt"),
                                       str(directory / "upstream.key"))
    port = cfg.server.listen.port
    d = directory
    other = (f"  curl --key {d}/other.key --cert {d}/other.crt --cacert {d}/server.crt https://localhost:{port}/hello\n"
             f"      -> 403 from the proxy: a valid certificate that no rule allows\n"
             if (d / "other.crt").exists() else "")
    print(f"""
mtls-proxy is listening on https://localhost:{port}/ (config: {toml}); admin on http://{admin}/
Try, from another terminal:
  curl --key {d}/client.key --cert {d}/client.crt --cacert {d}/server.crt https://localhost:{port}/hello
      -> 200, the demo API echoes the identity headers the proxy added
{other}  curl --key {d}/revoked.key --cert {d}/revoked.crt --cacert {d}/server.crt https://localhost:{port}/hello
      -> TLS handshake refused: the certificate is revoked (crl.pem)
  curl --cacert {d}/server.crt https://localhost:{port}/hello
      -> TLS handshake refused: no client certificate
  curl http://{admin}/metrics
Press Ctrl-C to stop.
""", flush=True)
    try:
        return await run(cfg)
    finally:
        await runner.cleanup()
        await asyncio.sleep(0)
