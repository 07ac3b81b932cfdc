# mtls-proxy container image.
#
#   docker build -t mtls-proxy .                                  # runtime image (the last stage)
#   docker build --target smoke -t mtls-proxy-smoke .             # curl + scripts/smoke.sh, for docker-compose.yml
#   podman build --format docker --build-arg BASE_IMAGE=localhost/debian-python:bookworm -t mtls-proxy .
#
# BASE_IMAGE is any Debian-based image with python3 (3.11+) and its venv module: the official slim image by
# default, or a local debootstrap image (ci/container-test.sh); only `python3 -m venv` is relied on, no path
# that exists in one of them only.  podman needs `--format docker` to keep HEALTHCHECK (OCI images have none).
#
# Runtime contract (deploy/provider.yaml and docker-compose.yml depend on it): proxy on 8443, admin (/healthz,
# /readyz, /metrics) on 0.0.0.0:9100, UID/GID 10001, configuration only by MTLS_PROXY_* variables and mounted
# files, nothing written outside /tmp (run it with a read-only root filesystem and a tmpfs on /tmp), the proxy is
# PID 1 (exec-form ENTRYPOINT) so SIGTERM starts its drain and it exits 0.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

# ---- build: wheels for the project and its dependencies, installed into a clean venv --------------------------
FROM ${BASE_IMAGE} AS build
# pip reads the distribution's CA store rather than its bundled copy, so a build host behind a TLS-inspecting
# proxy can mount its own bundle over this file for the RUN steps (podman build -v BUNDLE:THIS_PATH:ro).
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first, from pyproject.toml alone: this layer stays cached until the dependencies change. The aws
# extra (boto3) is part of the image: the ECS task reads its secrets, rules and CRL from AWS sources.
COPY pyproject.toml ./
RUN python3 -m venv /opt/build \
    && python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); \
print("\n".join(p["build-system"]["requires"]), file=open("/tmp/build-requires.txt", "w")); \
print("\n".join(p["project"]["dependencies"] + p["project"]["optional-dependencies"]["aws"]), \
file=open("/tmp/requires.txt", "w"))' \
    && /opt/build/bin/pip install --requirement /tmp/build-requires.txt \
    && /opt/build/bin/pip wheel --wheel-dir /wheels --requirement /tmp/requires.txt
COPY . ./
# The project's own wheel offline, then a venv without pip holding only what the proxy runs.
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --no-index --wheel-dir /wheels . \
    && python3 -m venv --without-pip /opt/mtls-proxy \
    && /opt/build/bin/pip --python /opt/mtls-proxy/bin/python install --no-index --find-links /wheels \
       'mtls-proxy[aws]' \
    && /opt/mtls-proxy/bin/mtls-proxy --help >/dev/null \
    && /opt/mtls-proxy/bin/python -c 'import boto3'

# ---- smoke: curl and scripts/smoke.sh, the `smoke` service of docker-compose.yml (not part of the runtime) ------
FROM ${BASE_IMAGE} AS smoke
# Pinning a Debian package version would break the build at the next point release of the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY scripts/smoke.sh /usr/local/bin/smoke.sh
USER 10001:10001
ENTRYPOINT ["bash", "/usr/local/bin/smoke.sh"]

# ---- runtime ---------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
# A fixed numeric UID/GID (deploy/provider.yaml's ContainerUser; Kubernetes runAsNonRoot needs a number). /certs
# is the mount point for certificate volumes: owned by that user, so a fresh named volume mounted there takes its
# ownership and `mtls-proxy certs init /certs` can write into it.
RUN groupadd --gid 10001 mtls-proxy \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin mtls-proxy \
    && install -d -o 10001 -g 10001 -m 0750 /certs
COPY --from=build /opt/mtls-proxy /opt/mtls-proxy
# The venv first on PATH: `mtls-proxy`, and `python3` for the health check and `python3 -m proxy.dev.demo_upstream`.
# Bytecode was compiled at install time; never try to write more (the root filesystem is read-only). HOME and the
# working directory point at /tmp, the only writable place. The listen addresses are the image's port contract;
# like every MTLS_PROXY_* variable they override the same keys of a --config file.
ENV PATH=/opt/mtls-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MTLS_PROXY_SERVER_LISTEN=0.0.0.0:8443 \
    MTLS_PROXY_ADMIN_LISTEN=0.0.0.0:9100
WORKDIR /tmp
USER 10001:10001
EXPOSE 8443 9100
# Liveness only, the same command as the ECS task definition's: readiness (/readyz) belongs to the load balancer,
# so a draining proxy is not reported unhealthy and killed while it finishes its requests.
HEALTHCHECK --interval=15s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=3)"]
STOPSIGNAL SIGTERM
# Provenance labels last: build arguments that change on every build (commit, time) then invalidate no layer.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE_URL=
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="mtls-proxy" \
      org.opencontainers.image.description="Mutual-TLS reverse proxy for private API Gateway APIs behind PrivateLink" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
ENTRYPOINT ["mtls-proxy"]
# Configuration from the environment alone (how ECS runs it); `serve --config FILE` for a mounted TOML file.
CMD ["serve"]
