#!/usr/bin/env bash
# Smoke test of a running mtls-proxy, done the way a partner checks it: with curl and certificate files.
#
#   scripts/smoke.sh URL CERTDIR          e.g. scripts/smoke.sh https://localhost:8443/hello certs
#
# CERTDIR holds what `mtls-proxy certs init CERTDIR --client other` writes: server.crt (the partner's --cacert),
# client.crt/.key (allowed by the proxy's rules), other.crt/.key (valid, but allowed by no rule) and
# revoked.crt/.key (listed in the proxy's CRL).  Four checks, one PASS/FAIL line each:
#
#   1. the partner command  curl --key client.key --cert client.crt --cacert server.crt URL   -> HTTP 200
#   2. no client certificate                                     -> the TLS handshake is refused (an alert)
#   3. a revoked client certificate                              -> the TLS handshake is refused (an alert)
#   4. a valid client certificate that no allow rule admits      -> HTTP 403 from the proxy
#
# A refusal counts only if curl got no HTTP response and reports a TLS alert, so a proxy that is down or
# unreachable (connection refused, timeout) or a server certificate that does not verify fails every check.
# Exit status: 0 when all pass, 1 when any fails, 2 for bad usage.  CURL=/path/to/curl picks another curl.
set -uo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 URL CERTDIR" >&2
  exit 2
fi
url=$1
certdir=$2
curl_bin=${CURL:-curl}
if ! cd "$certdir" 2>/dev/null; then
  echo "smoke.sh: cannot enter CERTDIR $certdir" >&2
  exit 2
fi

failed=0
status=""
rc=0
detail=""

# probe ARGS...: run curl with ARGS and the URL from inside CERTDIR, so the command reads exactly as a partner
# types it.  Sets rc (curl's exit status), status (the HTTP status, 000 for none) and detail (curl's error).
probe() {
  local out
  out=$("$curl_bin" --silent --show-error --stderr - --output /dev/null --write-out '\n%{http_code}' \
        --connect-timeout 10 --max-time 30 "$@" "$url")
  rc=$?
  status=${out##*$'\n'}
  detail=${out%$'\n'*}
  detail=${detail//$'\n'/ }
}

report() {  # report PASS|FAIL NAME TEXT
  printf '%s  %s: %s\n' "$1" "$2" "$3"
  [ "$1" = PASS ] || failed=1
}

have() {  # have NAME.crt NAME.key ...: every file exists in CERTDIR
  local f
  for f in "$@"; do
    [ -f "$f" ] || return 1
  done
}

expect_status() {  # expect_status NAME WANT CURL-ARGS...
  local name=$1 want=$2
  shift 2
  probe "$@"
  if [ "$rc" -eq 0 ] && [ "$status" = "$want" ]; then
    report PASS "$name" "curl $* $url -> HTTP $status"
  elif [ "$rc" -eq 0 ]; then
    report FAIL "$name" "expected HTTP $want, got HTTP $status (curl $* $url)"
  else
    report FAIL "$name" "expected HTTP $want, curl failed with exit $rc: $detail"
  fi
}

expect_refused() {  # expect_refused NAME CURL-ARGS...: the handshake must fail with a TLS alert, no HTTP status
  local name=$1
  shift
  probe "$@"
  if [ "$rc" -ne 0 ] && [ "$status" = 000 ] && [[ "$detail" == *alert* ]]; then
    report PASS "$name" "TLS handshake refused (curl exit $rc: $detail)"
  elif [ "$rc" -eq 0 ]; then
    report FAIL "$name" "expected the TLS handshake to be refused, got HTTP $status (curl $* $url)"
  else
    report FAIL "$name" "expected a TLS alert from the proxy, curl failed otherwise (exit $rc: $detail)"
  fi
}

if have server.crt client.crt client.key; then
  expect_status "allowed client (partner command)" 200 --key client.key --cert client.crt --cacert server.crt
else
  report FAIL "allowed client (partner command)" "server.crt, client.crt or client.key missing in $certdir"
fi

if have server.crt; then
  expect_refused "no client certificate" --cacert server.crt
else
  report FAIL "no client certificate" "server.crt missing in $certdir"
fi

if have server.crt revoked.crt revoked.key; then
  expect_refused "revoked client certificate" --key revoked.key --cert revoked.crt --cacert server.crt
else
  report FAIL "revoked client certificate" "revoked.crt or revoked.key missing in $certdir"
fi

if have server.crt other.crt other.key; then
  expect_status "valid certificate no rule allows" 403 --key other.key --cert other.crt --cacert server.crt
else
  report FAIL "valid certificate no rule allows" \
    "other.crt or other.key missing in $certdir (create them with: mtls-proxy certs init DIR --client other)"
fi

exit "$failed"
