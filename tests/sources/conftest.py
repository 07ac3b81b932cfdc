"""Fixtures for the source tests.

moto        a MotoServer (tests/remote.py) for the whole session: real S3, Secrets Manager and SSM APIs over HTTP
aws_env     sets this process's AWS_* variables to that server and dummy credentials for one test (boto3 reads
            them itself, as it would on ECS), restored afterwards
aws         a boto3 client factory for the test's own calls: aws("s3")
dp          a started plain-HTTP DistributionPoint, stopped at teardown
tls_dp      (DistributionPoint, CA PEM path): the same over TLS with a certificate from a throwaway trustme CA

Tests name their buckets, secrets and parameters uniquely (``unique()``), so they never see each other's data.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.remote import DistributionPoint, MotoServer, start_moto


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = start_moto(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture
def aws_env(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    for k, v in moto.env().items():
        monkeypatch.setenv(k, v)
    return moto


@pytest.fixture
def aws(moto: MotoServer) -> Callable[[str], Any]:
    return moto.client


@pytest.fixture
def dp() -> Iterator[DistributionPoint]:
    point = DistributionPoint().start()
    yield point
    point.stop()


@pytest.fixture
def tls_dp(tmp_path: Path) -> Iterator[tuple[DistributionPoint, Path]]:
    ca = trustme.CA(organization_name="mtls-proxy tests", organization_unit_name="distribution point CA")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    ca_file = tmp_path / "dp-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    point = DistributionPoint(tls=server_ctx).start()
    yield point, ca_file
    point.stop()
