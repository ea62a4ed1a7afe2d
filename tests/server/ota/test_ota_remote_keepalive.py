"""The publisher's HTTP client never reuses a connection the server may be closing.

CI once failed a whole ``fedota simulate`` run with "Server disconnected without
sending a response": httpx kept idle connections for 5 s and uvicorn closed them after
5 s, so a publish sent at that moment met a closing socket. ``fedota serve`` now keeps
idle connections for ``KEEP_ALIVE_S`` and ``OtaRemote`` drops its own much sooner.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from server.cli import KEEP_ALIVE_S
from server.ota import OtaRemote
from server.ota.remote import KEEPALIVE_EXPIRY_S


async def _client_port(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    """A bare ASGI app answering with the client's source port (one per connection)."""
    if scope["type"] != "http":
        return
    body = str(scope["client"][1]).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


@pytest.fixture()
def server_url() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        _client_port, host="127.0.0.1", port=port, log_config=None,
        timeout_keep_alive=KEEP_ALIVE_S,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_idle_connections_are_dropped_by_the_client_long_before_the_server(
    server_url: str,
) -> None:
    assert KEEPALIVE_EXPIRY_S * 5 <= KEEP_ALIVE_S  # a wide margin, not a tie
    remote = OtaRemote(server_url, "key")
    try:
        first = remote.request("GET", "/")
        assert remote.request("GET", "/") == first  # back to back: the same connection
        time.sleep(KEEPALIVE_EXPIRY_S + 0.3)
        assert remote.request("GET", "/") != first  # idle past the expiry: a new one
    finally:
        remote.close()
