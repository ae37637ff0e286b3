"""A port whose last connections are in TIME_WAIT is free for a restart, for the launcher's check
and for the gateway's HTTP front alike; a port with a live listener is not."""

from __future__ import annotations

import socket

import pytest

from gateway import http
from specserve.launcher import port_is_free


def _served_and_stopped() -> int:
    """A port a server listened on, answered one connection and closed first (so the server's side of
    that connection sits in TIME_WAIT), then stopped listening."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the server closes first: TIME_WAIT on its side
    client.recv(1)
    client.close()
    listener.close()
    return port


def test_a_port_in_time_wait_is_free_for_a_restart():
    port = _served_and_stopped()
    with socket.socket() as plain:  # what a bind without address reuse meets: the port is held
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    assert port_is_free(port)
    http.bind("127.0.0.1", port).close()


def test_a_port_with_a_listener_is_busy():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert not port_is_free(port)
        with pytest.raises(SystemExit, match="cannot bind the HTTP port"):
            http.bind("127.0.0.1", port)
