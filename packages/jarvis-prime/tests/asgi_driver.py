"""Drive an ASGI app in-process, one request at a time, with full control over how the
body arrives (chunked, endless, or a client that hangs up): what the servers' Guard
tests need and an HTTP client library hides. Shared by jarvis-prime's and jarvis's tests
(pytest.ini puts this folder on the path)."""

from __future__ import annotations

import asyncio
import gc
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Exchange:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    chunks_read: int = 0

    def json(self) -> Any:
        return json.loads(self.body)


def call(app, method: str, path: str, *, headers: dict[str, str] | None = None, chunks: list[bytes] | None = None,
         chunk_count: int | None = None, chunk: bytes = b"", host: str = "127.0.0.1:8000", hang_up: bool = False,
         cut_off: bool = False) -> Exchange:
    """One request; its body is `chunks`, or `chunk` sent `chunk_count` times (a bounded
    stand-in for an endless upload), with no Content-Length unless `headers` has one.
    `hang_up`: once the body is sent the client disconnects, before any answer; the
    garbage collector is off meanwhile, so what the request held must be released by
    the server itself (CPython's collector frees cycles late or, under load, much later).
    `cut_off`: the client disconnects mid-body (its last chunk said more was coming)."""
    out = Exchange()
    body = list(chunks or ([chunk] * (chunk_count or 0)))

    async def receive():
        if out.chunks_read < len(body):
            out.chunks_read += 1
            return {"type": "http.request", "body": body[out.chunks_read - 1],
                    "more_body": out.chunks_read < len(body) or cut_off}
        if out.chunks_read == len(body) and not body:
            out.chunks_read += 1
            return {"type": "http.request", "body": b"", "more_body": False}
        if hang_up or cut_off:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)  # the client waits for the answer

    async def send(message):
        if message["type"] == "http.response.start":
            out.status = message["status"]
            out.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            out.body += message.get("body", b"")

    raw = [(b"host", host.encode())] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": raw, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    collecting = gc.isenabled()
    gc.disable()
    try:
        asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    finally:
        if collecting:
            gc.enable()
    return out
