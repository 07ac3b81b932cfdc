"""http:// and https:// sources: a CRL distribution point, or a CA bundle / rule document on a web server.

Owns: one conditional GET per fetch (``If-None-Match`` with the last ETag, ``If-Modified-Since`` with the last
``Last-Modified``; RFC 9110 section 13.1), answered 304 when nothing changed.  A server that sends neither
validator is downloaded every time and compared by content by the caller.

Trust: https:// is verified against the system trust store (``ssl.create_default_context``, which honours
``SSL_CERT_FILE``); a redirect from https:// to http:// is refused, so TLS cannot be silently dropped.  Plain
http:// is accepted by the config loader for CRLs only: a CRL carries its CA's signature, which OpenSSL checks.
The body must be complete (``http.client`` raises on a short read) and at most ``MAX_BYTES``.

urllib is imported at the first fetch, not at import time: a proxy with no URL source never loads it.

Must not: run on the event loop (every call blocks; the caller uses an executor), or put the URL's query string
in an error message (it may carry a token).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from . import MAX_BYTES, Fetched, SourceError
from .location import Location

if TYPE_CHECKING:
    import urllib.request

TIMEOUT = 10.0  # seconds per connect and per read


class UrlSource:
    def __init__(self, location: Location, *, context: ssl.SSLContext | None = None,
                 timeout: float = TIMEOUT) -> None:
        assert location.uri is not None and location.kind in ("http", "https")
        self.location = location
        self._url = location.uri
        self._shown = str(location)
        self._context = context
        self._timeout = timeout
        self._opener: urllib.request.OpenerDirector | None = None

    def fetch(self, known: str | None) -> Fetched | None:
        import http.client
        import urllib.error
        import urllib.request

        etag, _, modified = (known or "").partition("\n")
        headers = {"User-Agent": "mtls-proxy", "Accept": "*/*"}
        if etag and not etag.startswith("sha256:"):
            headers["If-None-Match"] = etag
        if modified:
            headers["If-Modified-Since"] = modified
        request = urllib.request.Request(self._url, headers=headers)
        try:
            with self._open().open(request, timeout=self._timeout) as resp:
                length = resp.length  # Content-Length as http.client parsed it; None for chunked
                if length is not None and length > MAX_BYTES:
                    raise SourceError(f"{self._shown}: larger than {MAX_BYTES} bytes")
                # read() without a size raises IncompleteRead on a short body; with a size it would not.
                data = resp.read() if length is not None else resp.read(MAX_BYTES + 1)
                if len(data) > MAX_BYTES:
                    raise SourceError(f"{self._shown}: larger than {MAX_BYTES} bytes")
                new_etag, new_modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 304:
                return None
            raise SourceError(f"{self._shown}: HTTP {exc.code} {_one_line(exc.reason)}") from None
        except urllib.error.URLError as exc:
            raise SourceError(f"{self._shown}: {_reason(exc.reason)}") from None
        except http.client.IncompleteRead as exc:
            raise SourceError(f"{self._shown}: body cut short after {len(exc.partial)} bytes") from None
        except (http.client.HTTPException, OSError) as exc:
            raise SourceError(f"{self._shown}: {_reason(exc)}") from None
        if new_etag or new_modified:
            version = f"{new_etag or ''}\n{new_modified or ''}"
        else:
            import hashlib

            version = "sha256:" + hashlib.sha256(data).hexdigest()
        return Fetched(data, version)

    def _open(self) -> urllib.request.OpenerDirector:
        if self._opener is None:
            import urllib.request

            context = self._context or ssl.create_default_context()
            self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                                       _redirect_handler())
        return self._opener


def _redirect_handler() -> Any:
    import urllib.request

    class NoDowngrade(urllib.request.HTTPRedirectHandler):
        """Follow redirects, but never from https:// to anything else."""

        def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                             newurl: str) -> Any:
            if req.full_url.startswith("https://") and not newurl.startswith("https://"):
                raise SourceError(f"{req.host}: refused a redirect from https:// to a non-https URL")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return NoDowngrade()


def _reason(reason: object) -> str:
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {reason.verify_message}"
    if isinstance(reason, ssl.SSLError):
        return f"TLS error: {reason.reason or reason}"
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return _one_line(str(reason) or type(reason).__name__)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())
