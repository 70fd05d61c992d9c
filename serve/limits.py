"""The gateway's bound on request bodies: `BodyLimit`, a plain ASGI middleware.

A body over `max_body_bytes` is answered 413 in nlm's error shape before it is parsed: at once
when its Content-Length says so (nothing of it is read), and as soon as the bytes streamed so
far pass the limit otherwise (chunked uploads, a lying Content-Length). So a 100 MB body costs
the gateway at most the limit in memory, never the body plus its parsed JSON.

The limit is set per gateway replica by `configure` (the Gateway's constructor): Serve freezes
a copy of the FastAPI app when the ingress class is decorated, so the middleware reads the limit
from this module at request time rather than from the app it was added to.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_settings = {"max_body_bytes": DEFAULT_MAX_BODY_BYTES}


def configure(max_body_bytes: int) -> None:
    """Set the body limit of this process's gateway (bytes, >= 1)."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    _settings["max_body_bytes"] = int(max_body_bytes)


def max_body_bytes() -> int:
    return _settings["max_body_bytes"]


class BodyLimit:
    """ASGI middleware: refuse bodies over `max_body_bytes()` with 413 before the app reads them.

    The body is read here (up to the limit) and handed to the app whole; later `receive` calls
    (a disconnect) go to the server as usual.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = max_body_bytes()
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _refuse(send, 400, "bad_request", "Content-Length is not a number")
                return
            if size > limit:
                await _refuse(send, 413, "body_too_large", _too_large(f"{size} bytes", limit))
                return
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                await _refuse(send, 413, "body_too_large", _too_large(f"over {limit} bytes", limit))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks)}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


def _too_large(size: str, limit: int) -> str:
    return f"request body too large ({size}; the limit is {limit} bytes)"


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
