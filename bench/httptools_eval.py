"""httptools (llhttp) beside the proxy's own parser: strictness on the smuggling table, and cost per head.

Issue: would llhttp, through httptools, be a safe and cheaper request parser than ``proxy.wire.http1``?  Two
questions, answered here without touching the product:

1. Strictness.  Every case of ``tests/adversarial/test_smuggling.py`` (the table the real proxy process is held to
   in CI) is fed, with its pipelined follow-up, to ``httptools.HttpRequestParser`` in its default (strict) mode.
   For a case the proxy refuses, llhttp is "as strict" only if it raises before the first request is complete;
   for a case the proxy serves, llhttp must yield the same requests (method, target, body).  Refusals that are
   not about framing (Host count, absolute-form, Expect, size limits, HTTP/2.0 on the request line) would stay
   the proxy's own checks after an adoption, so they are listed apart: they are not held against llhttp.
2. Cost.  The bench's request head parsed 200,000 times by ``parse_request_head`` and by httptools with the
   callbacks a proxy needs to rebuild and forward it byte-exact (URL and every field).  Wall time of a tight loop
   on an idle core: a rough figure for a decision, not a test.

    .venv/bin/pip install httptools && .venv/bin/python bench/httptools_eval.py

httptools is not a dependency of the project: this script is the evaluation the decision rests on.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httptools  # noqa: E402

from proxy.wire.headers import SPOOFABLE  # noqa: E402
from proxy.wire.http1 import parse_request_head  # noqa: E402
from tests.adversarial.test_smuggling import CASES, FOLLOW_UP  # noqa: E402

# Refusals a framing parser is not asked to make: the proxy checks them on the parsed head, whoever parses it.
# (Transfer-Encoding in HTTP/1.0 and "identity, chunked" are framing: RFC 9112 §6.1, §6.3; they count against llhttp.)
SEMANTIC = {"two-hosts", "no-host", "absolute-form", "expect-unknown", "cl-over-max-body", "101-fields",
            "request-line-9k", "request-line-9k-unfinished", "head-over-64k", "http2-version"}


class Collect:
    def __init__(self) -> None:
        self.messages: list[tuple[str, str, bytes]] = []
        self.url = b""
        self.body = b""
        self.parser: httptools.HttpRequestParser | None = None

    def on_message_begin(self) -> None:
        self.url, self.body = b"", b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        assert self.parser is not None
        self.messages.append((self.parser.get_method().decode(), self.url.decode("latin-1"), self.body))


def llhttp(data: bytes) -> tuple[list[tuple[str, str, bytes]], str | None]:
    c = Collect()
    p = httptools.HttpRequestParser(c)
    c.parser = p
    try:
        p.feed_data(data)
    except httptools.HttpParserUpgrade:
        return c.messages, "upgrade"
    except httptools.HttpParserError as exc:
        return c.messages, f"{exc.__class__.__name__}: {exc}"
    return c.messages, None


def strictness() -> int:
    worse: list[str] = []  # the proxy refuses, llhttp frames a request: less strict
    stricter: list[str] = []  # the proxy serves a valid request, llhttp refuses it: a partner would break
    rows = []
    for index, (case, (template, outcome)) in enumerate(CASES.items()):
        case_id = b"k%03d" % index
        data = template.replace(b"@ID@", case_id) + FOLLOW_UP.replace(b"@ID@", case_id)
        messages, error = llhttp(data)
        expected = [(m, t.replace("@ID@", case_id.decode()), b.replace(b"@ID@", case_id))
                    for m, t, b in outcome.upstream]
        if outcome.upstream:  # served by the proxy: llhttp must frame it the same way
            ok = messages[:len(expected)] == expected
            verdict = "same" if ok else f"REFUSES a valid request: {error or messages!r}"
            if not ok:
                stricter.append(case)
        else:  # refused by the proxy (status outcome.statuses[0])
            ok = not messages
            verdict = "refuses too" if ok else f"ACCEPTS {messages[0][0]} {messages[0][1][:40]}"
            if not ok and case in SEMANTIC:
                verdict += " (the proxy's own check stays)"
        if not ok and not outcome.upstream and case not in SEMANTIC:
            worse.append(case)
        rows.append((case, outcome.statuses[0], verdict))
    width = max(len(r[0]) for r in rows)
    for case, status, verdict in rows:
        print(f"  {case:{width}}  proxy {status}  llhttp {verdict}")
    print(f"\n{len(CASES)} cases.  llhttp frames a request the proxy refuses, in {len(worse)}: {', '.join(worse)}")
    print(f"llhttp refuses a request the proxy serves (RFC 9112 allows it), in {len(stricter)}: {', '.join(stricter)}")
    return len(worse)


HEAD = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
TRACED = (b"GET /prod/orders/42 HTTP/1.1\r\nHost: api.test\r\nUser-Agent: aws-sdk-java/2.25\r\nAccept: */*\r\n"
          b"Content-Type: application/json\r\nX-Amzn-Trace-Id: Root=1-5759e988-bd862e3fe1be46a994272793\r\n\r\n")


class Fields:
    """What a forwarding proxy keeps from llhttp: the URL and every field, to rebuild the head."""

    __slots__ = ("url", "fields")

    def __init__(self) -> None:
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))


def cost(n: int = 200_000) -> None:
    for label, head in (("bench head (4 lines)", HEAD), ("SDK head with trace id (6 lines)", TRACED)):
        t = time.perf_counter()
        for _ in range(n):
            parse_request_head(head, SPOOFABLE)
        ours = (time.perf_counter() - t) / n * 1e6
        t = time.perf_counter()
        for _ in range(n):
            f = Fields()
            httptools.HttpRequestParser(f).feed_data(head)
        theirs = (time.perf_counter() - t) / n * 1e6
        print(f"  {label}: proxy.wire.http1 {ours:.2f} us, httptools {theirs:.2f} us per head")


if __name__ == "__main__":
    print(f"httptools {httptools.__version__}, strict (default) mode\n")
    strictness()
    print("\ncost per head (wall time, one core):")
    cost()
