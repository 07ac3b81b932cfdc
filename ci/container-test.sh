#!/usr/bin/env bash
# Build the mtls-proxy image with podman and run it for real, then run the docker-compose.yml stack the same way.
#
#   sudo ci/container-test.sh               (CI runs it as root through tests/test_container.py)
#
# No container registry is needed: the base image is made here with debootstrap (Debian bookworm: python3 3.11 +
# python3-venv) and imported with `podman import`, then passed to the Dockerfile as BASE_IMAGE.  Only Debian's
# mirror (debootstrap, the smoke image's curl) and PyPI (the image's wheels) are reached.  Steps:
#
#   1. tools: podman, runc, debootstrap, curl, nsenter (installed with apt-get when missing and we are root)
#   2. base image: reused from podman's storage, else imported from the cache tarball, else debootstrapped; keyed by
#      a hash of the recipe below and cached in $MTLS_PROXY_CI_CACHE (default /var/cache/mtls-proxy-ci)
#   3. image: podman build, then its metadata checked (user, ports, stop signal, entrypoint, health check, labels)
#   4. standalone: `certs init` in a container into a bind mount; the demo upstream and the proxy in two containers
#      (read-only root, tmpfs /tmp, no capabilities, certificates passed as env:NAME like ECS does); wait for
#      /readyz; the image's HEALTHCHECK; scripts/smoke.sh; `podman stop -t 30` and exit status 0
#   5. compose: ci/compose_podman.py runs docker-compose.yml's services in order (certs, upstream, proxy, then
#      smoke in the foreground), runs certs again (it must keep the PKI), checks the proxy refuses TLS 1.3, then
#      `down` stops every service with SIGTERM and fails unless each exits 0
#
# Every container runs in a podman pod whose network namespace has only loopback: nothing binds a host port (no
# clash with anything else on the machine) and no traffic leaves the machine.  Host tools (curl, smoke.sh) enter
# that namespace with nsenter.  One run at a time (a lock in the cache directory).
#
# Environment: MTLS_PROXY_CI_CACHE (cache directory), DEBIAN_MIRROR (default http://deb.debian.org/debian),
# PYTHON (a Python with docker-compose beside it or on PATH; default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

started=$SECONDS
log() { printf '[container-test +%3ds] %s\n' "$((SECONDS - started))" "$*"; }
die() { printf '[container-test +%3ds] FAIL: %s\n' "$((SECONDS - started))" "$*" >&2; exit 1; }

# ---- 1. tools ---------------------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run as root: the test uses rootful podman, debootstrap and nsenter (CI runs as root)"
missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
  log "installing ${missing[*]} with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
fi
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

CACHE=${MTLS_PROXY_CI_CACHE:-/var/cache/mtls-proxy-ci}
mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
flock -w 1800 9 || die "another container-test.sh holds $CACHE/lock"

work=$(mktemp -d /tmp/mtls-proxy-container-test.XXXXXX)
STANDALONE=mtls-proxy-ci-standalone
PROJECT=mtls-proxy-ci
IMAGE=localhost/mtls-proxy:ci

# podman as this machine needs it: runc, and ulimits within the hard limits (podman's default nofile of 1048576
# makes runc fail with "error setting rlimits ... operation not permitted").
cat >"$work/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=10000:10000", "nproc=10000:10000"]

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$work/containers.conf

# A build host behind a TLS-inspecting proxy trusts its CA through the host bundle; the Dockerfile's build stage
# points pip at the same path, so mounting the bundle over it for the RUN steps is enough (nothing lands in a layer).
ca_bundle=/etc/ssl/certs/ca-certificates.crt
build_mounts=()
compose_opts=()
if [ -f "$ca_bundle" ]; then
  build_mounts=(-v "$ca_bundle:$ca_bundle:ro")
  compose_opts=(--build-volume "$ca_bundle:$ca_bundle:ro")
fi
compose() { "$PYTHON" ci/compose_podman.py -p "$PROJECT" "${compose_opts[@]}" "$@"; }

cleanup() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    for c in $(podman ps -a --format '{{.Names}}' 2>/dev/null | grep -E "^($STANDALONE|$PROJECT)-" || true); do
      echo "---- logs of $c" >&2
      podman logs "$c" 2>&1 | tail -n 40 >&2 || true
    done
  fi
  podman pod rm --force "$STANDALONE" >/dev/null 2>&1 || true
  compose down >/dev/null 2>&1 || true
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

podman info --format '{{.Host.OCIRuntime.Name}}' >/dev/null 2>"$work/podman-info.err" \
  || die "podman cannot run here: $(cat "$work/podman-info.err")"

# Leftovers of a run that was killed before its cleanup.
podman pod rm --force "$STANDALONE" >/dev/null 2>&1 || true
compose down >/dev/null 2>&1 || true

# ---- 2. base image ------------------------------------------------------------------------------------------
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,ca-certificates

make_base_tarball() {  # make_base_tarball OUT.tar: debootstrap a minimal Debian with Python, trimmed, as a tarball
  local rootfs=$1.rootfs
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
         "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log
  tar -C "$rootfs" --numeric-owner -cf "$1.tmp" .
  mv "$1.tmp" "$1"
  rm -rf "$rootfs"
}
import_changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
                --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]')
# Cache keys cover everything that shapes what they name: the recipe function's own text and its inputs for the
# tarball, that plus the import changes for the image.
tar_key=$(printf '%s' "$(declare -f make_base_tarball) $SUITE $MIRROR $PACKAGES" | sha256sum | cut -c1-16)
key=$(printf '%s' "$tar_key ${import_changes[*]}" | sha256sum | cut -c1-16)
BASE=localhost/mtls-proxy-ci-base:$key
tarball=$CACHE/base-$tar_key.tar
if podman image exists "$BASE"; then
  log "base image $BASE: reused"
else
  if [ -f "$tarball" ]; then
    log "base image: importing cached $tarball"
  else
    log "base image: debootstrap $SUITE ($PACKAGES) from $MIRROR"
    find "$CACHE" -maxdepth 1 -name 'base-*.tar' ! -name "base-$tar_key.tar" -delete  # recipes no longer used
    make_base_tarball "$tarball"
  fi
  podman import "${import_changes[@]}" "$tarball" "$BASE" >/dev/null 2>&1 || die "podman import $tarball failed"
  # Older recipes' base images: untagged here, removed by the prune at the end once nothing uses them.
  for old in $(podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/mtls-proxy-ci-base:' || true); do
    [ "$old" = "$BASE" ] || podman untag "$old" >/dev/null 2>&1 || true
  done
  log "base image $BASE imported"
fi

# ---- 3. the image -------------------------------------------------------------------------------------------
log "building $IMAGE on $BASE"
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
build=(podman build --format docker --network host "${build_mounts[@]}" --build-arg "BASE_IMAGE=$BASE")
# The build stage gets a tag of its own so that pruning replaced images (at the end) keeps its cached layers, the
# dependency wheels from PyPI above all.
"${build[@]}" --target build -t "$IMAGE-build" . >"$work/build.log" 2>&1 \
  || { tail -n 40 "$work/build.log" >&2; die "podman build --target build failed"; }
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# The provenance labels are also given as --label: buildah 1.28 reuses a cached LABEL layer even when only the
# build arguments it expands (REVISION, CREATED) changed, so the image kept an older commit's revision.
"${build[@]}" --build-arg "REVISION=$revision" --build-arg "CREATED=$created" \
  --label "org.opencontainers.image.revision=$revision" --label "org.opencontainers.image.created=$created" \
  -t "$IMAGE" . >>"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "podman build failed"; }
log "built $IMAGE"

podman image inspect "$IMAGE" >"$work/image.json"
"$PYTHON" - "$work/image.json" "$revision" <<'EOF' || die "image metadata"
import json, sys
image = json.load(open(sys.argv[1]))[0]
cfg = image["Config"]
health = image.get("Healthcheck") or cfg.get("Healthcheck") or {}
checks = {
    "non-root user 10001:10001": cfg.get("User") == "10001:10001",
    "EXPOSE 8443 9100": set(cfg.get("ExposedPorts", {})) == {"8443/tcp", "9100/tcp"},
    "STOPSIGNAL SIGTERM": cfg.get("StopSignal") == "SIGTERM",
    "exec-form ENTRYPOINT mtls-proxy": cfg.get("Entrypoint") == ["mtls-proxy"],
    "CMD serve (environment-only configuration)": cfg.get("Cmd") == ["serve"],
    "HEALTHCHECK python3 /healthz": health.get("Test", [])[:2] == ["CMD", "python3"]
                                     and "http://127.0.0.1:9100/healthz" in health["Test"][-1],
    "OCI labels": cfg.get("Labels", {}).get("org.opencontainers.image.title") == "mtls-proxy"
                  and cfg["Labels"].get("org.opencontainers.image.revision") == sys.argv[2],
}
for name, ok in checks.items():
    print(("PASS  " if ok else "FAIL  ") + "image: " + name)
sys.exit(0 if all(checks.values()) else 1)
EOF

# ---- 4. standalone: the image as ECS runs it ------------------------------------------------------------------
certs=$work/certs
mkdir -m 0750 "$certs"
chown 10001:10001 "$certs"
printf '127.0.0.1 localhost upstream\n::1 localhost\n' >"$work/hosts"
chmod 0644 "$work/hosts"
podman pod create --name "$STANDALONE" --network none >/dev/null
tmpfs_opts="rw,nosuid,nodev,noexec"  # as the ECS task definition mounts /tmp
hardening=(--pod "$STANDALONE" -v "$work/hosts:/etc/hosts:ro" --read-only --tmpfs "/tmp:$tmpfs_opts"
           --cap-drop ALL --security-opt no-new-privileges)

log "standalone: certs init in a container"
podman run --rm --no-healthcheck "${hardening[@]}" -v "$certs:/certs" "$IMAGE" \
  certs init /certs --client other || die "certs init in the container failed"
if [ ! -f "$certs/other.crt" ] || [ ! -f "$certs/server.crt" ]; then die "certs init wrote no certificates"; fi

podman run -d --name "$STANDALONE-upstream" --no-healthcheck "${hardening[@]}" -v "$certs:/certs:ro" \
  --entrypoint '["python3", "-m", "proxy.dev.demo_upstream"]' "$IMAGE" --listen 127.0.0.1:9443 \
  --cert /certs/upstream.crt --key /certs/upstream.key --api-id demo --stage prod >/dev/null 2>"$work/run.err" \
  || { cat "$work/run.err" >&2; die "podman run of the upstream failed"; }
# The PEM material as ECS passes Secrets Manager secrets: environment variables named by env:NAME sources.
podman run -d --name "$STANDALONE-proxy" "${hardening[@]}" -v "$certs:/certs:ro" \
  -e MTLS_PROXY_SERVER_CERT=env:SERVER_CERT_PEM -e MTLS_PROXY_SERVER_KEY=env:SERVER_KEY_PEM \
  -e MTLS_PROXY_SERVER_CLIENT_CA=env:CLIENT_CA_PEM -e MTLS_PROXY_SERVER_CRL=env:CLIENT_CRL_PEM \
  -e SERVER_CERT_PEM="$(cat "$certs/server.crt")" -e SERVER_KEY_PEM="$(cat "$certs/server.key")" \
  -e CLIENT_CA_PEM="$(cat "$certs/ca.crt")" -e CLIENT_CRL_PEM="$(cat "$certs/crl.pem")" \
  -e MTLS_PROXY_SERVER_SHUTDOWN_TIMEOUT=25 \
  -e MTLS_PROXY_UPSTREAM_URL=https://demo.execute-api.local/prod -e MTLS_PROXY_UPSTREAM_CONNECT_TO=upstream:9443 \
  -e MTLS_PROXY_UPSTREAM_API_ID=demo -e MTLS_PROXY_UPSTREAM_CA_BUNDLE=/certs/upstream-ca.crt \
  -e MTLS_PROXY_ALLOW='[{"name": "demo-client", "subject_cn": ["client"]}]' \
  "$IMAGE" >/dev/null 2>"$work/run.err" || { cat "$work/run.err" >&2; die "podman run of the proxy failed"; }

infra=$(podman pod inspect "$STANDALONE" --format '{{.InfraContainerID}}')
netns=/proc/$(podman inspect --type container --format '{{.State.Pid}}' "$infra")/ns/net
in_pod() { nsenter --net="$netns" "$@"; }

log "standalone: waiting for /readyz"
ready=0
for _ in $(seq 1 240); do
  state=$(podman inspect --type container --format '{{.State.Status}}' "$STANDALONE-proxy")
  [ "$state" = running ] || die "the proxy container is $state before it was ready"
  if in_pod curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:9100/readyz 2>/dev/null; then
    ready=1
    break
  fi
  sleep 0.25
done
[ $ready = 1 ] || die "the proxy was not ready within 60 s"
log "standalone: ready"

podman healthcheck run "$STANDALONE-proxy" >"$work/health.out" 2>&1 \
  || die "the image's HEALTHCHECK fails: $(cat "$work/health.out")"
echo "PASS  image HEALTHCHECK: healthy"
[ "$(podman exec "$STANDALONE-proxy" id -u)" = 10001 ] || die "the proxy does not run as UID 10001"
echo "PASS  runs as UID 10001"

log "standalone: smoke test"
in_pod bash scripts/smoke.sh https://localhost:8443/hello "$certs" || die "smoke test against the container"

log "standalone: SIGTERM (podman stop -t 30)"
podman stop --time 30 "$STANDALONE-proxy" >/dev/null 2>&1
code=$(podman inspect --type container --format '{{.State.ExitCode}}' "$STANDALONE-proxy")
[ "$code" = 0 ] || die "the proxy exited $code on SIGTERM (expected 0)"
echo "PASS  SIGTERM: the proxy drained and exited 0"
podman stop --time 10 "$STANDALONE-upstream" >/dev/null 2>&1
podman pod rm --force "$STANDALONE" >/dev/null 2>&1

# ---- 5. compose -----------------------------------------------------------------------------------------------
log "compose: docker-compose.yml services with podman (BASE_IMAGE=$BASE)"
export BASE_IMAGE=$BASE
compose run smoke || die "compose: the smoke service failed"
log "compose: certs again (must keep the existing PKI)"
compose run certs >"$work/certs-again.log" 2>&1 || { cat "$work/certs-again.log" >&2; die "compose: certs rerun"; }
grep -q "already holds a PKI" "$work/certs-again.log" || die "compose: certs did not keep the existing PKI"
echo "PASS  compose certs: idempotent"

netns=$(compose netns)
volume=$(podman volume inspect "${PROJECT}_certs" --format '{{.Mountpoint}}')
tls13=0
in_pod curl -sS -o /dev/null --tlsv1.3 --key "$volume/client.key" --cert "$volume/client.crt" \
  --cacert "$volume/server.crt" https://localhost:8443/hello 2>"$work/tls13.err" || tls13=$?
if [ $tls13 != 35 ] || ! grep -q "protocol version" "$work/tls13.err"; then
  die "compose: the proxy should refuse TLS 1.3 (curl exit $tls13: $(cat "$work/tls13.err"))"
fi
echo "PASS  compose proxy pinned to TLS 1.2: TLS 1.3 refused"

log "compose: down (SIGTERM to every service, each must exit 0)"
compose down || die "compose: a service did not exit 0 on SIGTERM"
# Images this run's builds replaced (untagged now); tagged images and the layers they use stay as the next cache.
podman image prune --force >/dev/null 2>&1 || true
log "all container checks passed"
