"""Rehearse deploy/README.md's "Rotate, revoke and onboard without a redeploy" against moto, with the real proxy.

Every change is made with the ``aws`` commands deploy/README.md gives (aws-cli, pointed at a moto server on loopback
through ``AWS_ENDPOINT_URL``); the proxy runs with the task environment deploy/provider.yaml gives it (resolved by
``tests/test_deploy.py``'s ``Deployment``), reading its certificate, key and client CA from Secrets Manager and its
rules and CRL from a versioned bucket, every ``--interval`` seconds.  For each step it prints how long after the
command returned a client saw the change, and at the end that the proxy process never restarted.

What a laptop cannot have is replaced as in ``tests/sources/test_deploy_sources.py``: loopback addresses, no PROXY
protocol, an upstream that refuses connections (an admitted request is answered 502, a refused one 403), and the
certificates come from ``tests/pki.py`` instead of ``openssl ca`` (a CRL is written with the client CA's key).

    .venv/bin/python deploy/rehearse.py --interval 10     # needs aws-cli (pip install awscli) and moto[server]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402

from tests.harness import client_ctx, free_port, spawn_proxy  # noqa: E402
from tests.pki import Pki  # noqa: E402
from tests.remote import REGION, start_moto  # noqa: E402
from tests.sources.test_deploy_sources import _served as served  # noqa: E402
from tests.sources.test_e2e_sources import _status as status  # noqa: E402
from tests.test_deploy import PROVIDER, Deployment, _load  # noqa: E402

RULES, CRL = "partners/rules.toml", "pki/client-ca.crl"  # the template's RulesObjectKey, CrlObjectKey defaults
SMOKE = '[[allow]]\nname = "smoke-test"\nsubject_cn = ["smoke-test-client"]\n'
PARTNER = '\n[[allow]]\nname = "partner-a"\nsubject_cn = ["client-a"]\n'


class Shell:
    """Runs deploy/README.md's commands with bash in a scratch directory, the aws CLI pointed at moto."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env

    def __call__(self, script: str) -> str:
        print("  $ " + script.strip().replace("\n", "\n    "))
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise SystemExit(f"command failed ({done.returncode}): {done.stderr.strip()}")
        out = done.stdout.strip()
        if out and not out.startswith("arn:"):
            print("    " + out.replace("\n", "\n    "))
        return out


def until(what: str, check: Callable[[], bool], started: float, limit: float) -> None:
    while not check():
        if time.monotonic() - started > limit:
            raise SystemExit(f"{what}: not seen within {limit:.0f} s")
        time.sleep(0.1)
    print(f"  -> {what} {time.monotonic() - started:.1f} s after the command returned\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=10.0, help="ReloadInterval in seconds (default 10)")
    a = ap.parse_args()
    if shutil.which("aws") is None:
        raise SystemExit("the aws CLI is not installed (pip install awscli)")
    limit = a.interval * 2 + 10
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = Pki.build(work / "pki")
        moto = start_moto(work)
        os.environ.update(moto.env())  # boto3 in this process (the harness reads the config once) and aws-cli
        env = {**os.environ, "BUCKET": "mtls-proxy-config", "RULES": RULES, "CRL": CRL}
        sh = Shell(work, env)
        try:
            print("setup (deploy/README.md: 'Create the secrets', 'The config bucket')")
            (work / "server-tls.pem").write_text(pki.server_cert.read_text() + pki.server_key.read_text())
            shutil.copy(pki.client_ca, work / "client-ca.crt")
            (work / "rules.toml").write_text(SMOKE)
            pki.write_crl(work / "client-ca.crl", number=2)
            cert_arn = sh("aws secretsmanager create-secret --name mtls-proxy/server-tls "
                          "--secret-string file://server-tls.pem --query ARN --output text")
            ca_arn = sh("aws secretsmanager create-secret --name mtls-proxy/client-ca "
                        "--secret-string file://client-ca.crt --query ARN --output text")
            sh('aws s3api create-bucket --bucket "$BUCKET" >/dev/null\n'
               'aws s3api put-bucket-versioning --bucket "$BUCKET" --versioning-configuration Status=Enabled\n'
               'aws s3 cp rules.toml "s3://$BUCKET/$RULES" >/dev/null\n'
               'aws s3 cp client-ca.crl "s3://$BUCKET/$CRL" >/dev/null')
            task = Deployment(_load(PROVIDER), ServerCertSecretArn=cert_arn, ClientCaSecretArn=ca_arn,
                              ConfigBucketName=env["BUCKET"]).env()
            task |= {"MTLS_PROXY_SERVER_LISTEN": "127.0.0.1:0", "MTLS_PROXY_ADMIN_LISTEN": "127.0.0.1:0",
                     "MTLS_PROXY_SERVER_PROXY_PROTOCOL": "false", "MTLS_PROXY_METRICS_EMF": "false",
                     "MTLS_PROXY_UPSTREAM_CONNECT_TO": f"127.0.0.1:{free_port()}",
                     "MTLS_PROXY_SERVER_RELOAD_INTERVAL": f"{a.interval:g}", "AWS_REGION": REGION}
            (work / "empty.toml").write_text("")
            proxy = spawn_proxy(work / "empty.toml", work, env=moto.env() | task)
            pid = proxy.proc.pid
            print(f"proxy pid {pid}: the template's sources, ReloadInterval {a.interval:g} s\n")
            try:
                good = client_ctx(pki, "good")
                good.load_verify_locations(cafile=pki.upstream_ca)  # trusts the rotated-in certificate too
                assert status(proxy.port, good) == 403, "partner-a must be refused before it is onboarded"

                print("onboard partner-a ('Onboard a partner')")
                sh('aws s3 cp "s3://$BUCKET/$RULES" rules.toml >/dev/null')
                with (work / "rules.toml").open("a") as fh:
                    fh.write(PARTNER)
                sh("""python3 -c 'import tomllib; tomllib.load(open("rules.toml", "rb")); print("TOML ok")'
aws s3 cp rules.toml "s3://$BUCKET/$RULES" >/dev/null""")
                until("partner-a admitted (403 -> 502 from the refusing upstream)",
                      lambda: status(proxy.port, good) == 502, time.monotonic(), limit)

                print("rotate the server certificate ('Rotate the server certificate')")
                old, new = (x509.load_pem_x509_certificates(p.read_bytes())[0].public_bytes(Encoding.DER)
                            for p in (pki.server_cert, pki.upstream_cert))
                shutil.copy(pki.upstream_cert, work / "server-new.crt")
                shutil.copy(pki.upstream_key, work / "server-new.key")
                sh("""diff <(openssl x509 -in server-new.crt -noout -pubkey) <(openssl pkey -in server-new.key -pubout) \\
  && echo "key matches certificate"
cat server-new.crt server-new.key > server-tls.pem
aws secretsmanager put-secret-value --secret-id mtls-proxy/server-tls --secret-string file://server-tls.pem >/dev/null
rm server-tls.pem""")
                until("new certificate served", lambda: served(proxy.port, good) == new, time.monotonic(), limit)

                print("roll the certificate back (AWSPREVIOUS -> AWSCURRENT)")
                sh("""SECRET=mtls-proxy/server-tls
PREVIOUS=$(aws secretsmanager list-secret-version-ids --secret-id "$SECRET" \\
  --query "Versions[?contains(VersionStages, 'AWSPREVIOUS')].VersionId | [0]" --output text)
CURRENT=$(aws secretsmanager list-secret-version-ids --secret-id "$SECRET" \\
  --query "Versions[?contains(VersionStages, 'AWSCURRENT')].VersionId | [0]" --output text)
aws secretsmanager update-secret-version-stage --secret-id "$SECRET" --version-stage AWSCURRENT \\
  --move-to-version-id "$PREVIOUS" --remove-from-version-id "$CURRENT" >/dev/null""")
                until("old certificate served again", lambda: served(proxy.port, good) == old, time.monotonic(),
                      limit)

                print("revoke partner-a ('Revoke a partner certificate')")
                pki.write_crl(work / "client-ca.crl", [pki.clients["good"]], number=3)
                print(f"  (serial {pki.clients['good'].leaf.serial_number:X} written into client-ca.crl with the "
                      "client CA's key)")
                sh("""openssl crl -in client-ca.crl -noout -text | grep -A1 'Serial Number' | head -2
aws s3 cp client-ca.crl "s3://$BUCKET/$CRL" >/dev/null""")
                until("partner-a refused in the handshake", lambda: status(proxy.port, good) is None,
                      time.monotonic(), limit)

                print("roll the CRL back ('Roll back with S3 versioning')")
                sh("""KEY=$CRL
PREVIOUS=$(aws s3api list-object-versions --bucket "$BUCKET" --prefix "$KEY" \\
  --query "Versions[?Key=='$KEY' && !IsLatest] | [0].VersionId" --output text)
aws s3api copy-object --bucket "$BUCKET" --key "$KEY" --copy-source "$BUCKET/$KEY?versionId=$PREVIOUS" >/dev/null""")
                until("partner-a admitted again", lambda: status(proxy.port, good) == 502, time.monotonic(), limit)

                alive = proxy.proc.poll() is None and proxy.proc.pid == pid
                print(f"proxy pid {pid} {'still running: no restart' if alive else 'NOT running'}; "
                      f"'reload failed' in its log: {'reload failed' in proxy.stderr()}")
                if not alive:
                    raise SystemExit(1)
            finally:
                proxy.stop()
        finally:
            moto.stop()


if __name__ == "__main__":
    main()
