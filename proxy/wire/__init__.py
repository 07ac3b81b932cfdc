"""The sans-IO wire package: the grammar of the bytes the proxy reads and writes, as pure functions and values.

Owns: HTTP/1.1 framing, chunked coding, header rewriting, request-path normalisation, the PROXY protocol v2 header,
and the shared lexical facts of those formats.  Every module takes bytes or text and returns values or raises a
``proxy.errors`` exception; the IO shells (listener, connection, upstream) do the reads and writes.

Must not: import asyncio, socket, ssl, selectors or anything else that does IO, nor any ``proxy`` module but
``proxy.errors`` and its own siblings (tests/test_architecture.py checks both), so each parser can be tested with
byte tables and fuzzed on its own.
"""
