"""The HTTP server over real sockets: silent and slow clients cannot lock others out.

A uvicorn server runs in a thread on a free loopback port with the limits ``retr serve`` uses
(``limit_concurrency`` 8 here so that the test needs few sockets); the clients are plain sockets
and ``http.client``.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from retr.cli import main

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

TINY = "synthetic:n_users=150,n_items=150,n_themes=10,min_len=10,max_len=16,seed=1"
LIMIT = 8
READ_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, list[str]]]:
    from retr.serving.http import server_config
    from retr.serving.recommender import Recommender

    run = tmp_path_factory.mktemp("pop") / "run"
    assert main(["train", "--data", TINY, "--model", "pop", "--set", "train.progress=false",
                 "--out", str(run)]) == 0
    rec = Recommender.load(run)
    config = server_config(rec, port=0, limit_concurrency=LIMIT, log_level="critical",
                           read_timeout=READ_TIMEOUT, max_idle=LIMIT // 2)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield port, list(rec.vocab.items[:3])
    srv.should_exit = True
    thread.join(timeout=10)


def _get_health(port: int, timeout: float = 1.0) -> tuple[int, float]:
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        status = conn.getresponse().status
    finally:
        conn.close()
    return status, time.monotonic() - start


def _silent(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        socks.append(s)
    time.sleep(0.2)  # let the server accept them all
    return socks


def test_silent_connections_do_not_lock_out_clients(server: tuple[int, list[str]]) -> None:
    port, history = server
    socks = _silent(port, 3 * LIMIT + 2)  # far more than every concurrency slot
    try:
        for _ in range(5):
            status, seconds = _get_health(port)
            assert status == 200 and seconds < 1.0, (status, seconds)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        conn.request("POST", "/recommend", body=json.dumps({"history": history, "k": 3}),
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and len(json.loads(resp.read())["items"]) == 3
        conn.close()
    finally:
        for s in socks:
            s.close()


def test_a_silent_connection_is_closed_after_the_read_timeout(
        server: tuple[int, list[str]]) -> None:
    port, _ = server
    s = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT + 5)
    start = time.monotonic()
    try:
        assert s.recv(1024) == b""  # closed by the server, nothing sent
    finally:
        s.close()
    assert READ_TIMEOUT * 0.8 <= time.monotonic() - start < READ_TIMEOUT + 3


def test_a_slow_request_gets_408(server: tuple[int, list[str]]) -> None:
    """Headers trickling in (a byte every 0.1 s) still have one deadline for the whole request."""
    port, _ = server
    s = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT + 5)
    start = time.monotonic()
    reply = b""
    try:
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
            if time.monotonic() - start > READ_TIMEOUT + 1:
                break
        reply = s.recv(4096)
    finally:
        s.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert time.monotonic() - start < READ_TIMEOUT + 3


def test_a_partial_body_gets_408(server: tuple[int, list[str]]) -> None:
    port, _ = server
    s = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT + 5)
    try:
        s.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"history\": ")
        reply = s.recv(4096)
    finally:
        s.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply


def test_keep_alive_clients_still_work(server: tuple[int, list[str]]) -> None:
    port, history = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        for _ in range(3):
            conn.request("POST", "/recommend", body=json.dumps({"history": history, "k": 2}),
                         headers={"content-type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
    finally:
        conn.close()


def test_lone_surrogate_over_a_real_socket(server: tuple[int, list[str]]) -> None:
    port, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("POST", "/recommend", body=b'{"history": ["\\ud800"]}',
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 422
        assert "not valid Unicode text" in json.loads(resp.read())["detail"]
    finally:
        conn.close()


def test_serve_options_are_checked(tmp_path: Path) -> None:
    from retr.serving.http import guarded_protocol

    with pytest.raises(ValueError, match="read_timeout"):
        guarded_protocol(read_timeout=0)
    with pytest.raises(ValueError, match="max_idle"):
        guarded_protocol(max_idle=0)
