"""Whose listener answers on a port (hive.workers.listener): the kernel's tables read, and the
owner found, against sockets this test opens."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from hive.workers.listener import foreign_listener, reachable_listeners, socket_inodes

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"  # noqa: E501


def _row(local: str, state: str, inode: int) -> str:
    return f"   0: {local} 00000000:0000 {state} 00000000:00000000 00:00000000 00000000  1000        0 {inode} 1 0\n"  # noqa: E501


def _tables(tmp_path: Path, v4: list[str], v6: list[str]) -> list[Path]:
    tcp, tcp6 = tmp_path / "tcp", tmp_path / "tcp6"
    tcp.write_text(HEADER + "".join(v4))
    tcp6.write_text(HEADER + "".join(v6))
    return [tcp, tcp6]


def test_the_kernels_order_of_preference(tmp_path: Path) -> None:
    port = 18003  # 0x4653
    loopback = _row("0100007F:4653", "0A", 11)
    any_v4 = _row("00000000:4653", "0A", 12)
    any_v6 = _row("00000000000000000000000000000000:4653", "0A", 13)
    mapped_loopback = _row("0000000000000000FFFF00000100007F:4653", "0A", 14)
    v6_loopback = _row("00000000000000000000000001000000:4653", "0A", 15)  # ::1: not reached
    connected = _row("0100007F:4653", "01", 16)  # an established connection, not a listener
    other_port = _row("0100007F:4654", "0A", 17)
    elsewhere = _row("0500000A:4653", "0A", 18)  # 10.0.0.5: a connection to 127.0.0.1 misses

    def found(v4: list[str], v6: list[str]) -> set[int]:
        return reachable_listeners(port, _tables(tmp_path, v4, v6))

    assert found([loopback, any_v4], [any_v6]) == {11}
    assert found([any_v4, connected, other_port], [any_v6, v6_loopback]) == {12}
    assert found([elsewhere], [any_v6, v6_loopback]) == {13}
    assert found([], [mapped_loopback, any_v6]) == {14}
    assert found([connected, other_port, elsewhere], [v6_loopback]) == set()
    assert reachable_listeners(port, [tmp_path / "missing"]) == set()


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock
    finally:
        sock.close()


def test_a_listener_of_the_workers_own_is_ready(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    inodes = reachable_listeners(port)
    assert inodes == {os.fstat(listening.fileno()).st_ino}
    assert inodes <= socket_inodes(os.getpid())
    assert foreign_listener(port, lambda: [os.getpid()]) is None


def test_another_processs_listener_is_named(listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    why = foreign_listener(port, lambda: [])
    assert why is not None
    assert why.startswith(f"port {port} is held by another process (pid {os.getpid()}, ")
    assert why.endswith("not by the worker; waiting for it to be freed")


def test_no_listener_seen_leaves_the_probe_its_word() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening
        assert foreign_listener(port, lambda: []) is None
