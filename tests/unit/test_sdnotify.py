"""The notify protocol against a datagram socket the test owns."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from edgeserve.sdnotify import Notifier


def receive_all(sock: socket.socket) -> list[str]:
    messages = []
    sock.setblocking(False)
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


def test_messages_reach_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        notifier.status("loading q2_k")
        notifier.ready("serving 3 variants")
        notifier.stopping("draining")
        assert receive_all(sock) == ["STATUS=loading q2_k", "READY=1\nSTATUS=serving 3 variants",
                                     "STOPPING=1\nSTATUS=draining"]


def test_without_notify_socket_nothing_happens() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("x")  # no error


def test_a_missing_socket_never_raises(tmp_path: Path) -> None:
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready("x")


def test_a_reader_that_does_not_keep_up_never_blocks_the_sender(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        for i in range(5000):  # far beyond a datagram queue; nobody reads
            notifier.status(f"step {i}")
        assert receive_all(sock)[0] == "STATUS=step 0"


def test_the_watchdog_interval_is_for_this_process_only() -> None:
    assert Notifier({"WATCHDOG_USEC": "4000000"}).watchdog_interval_s == 4.0
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 4.0
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval_s is None
    assert Notifier({}).watchdog_interval_s is None


async def test_the_watchdog_pings_at_half_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
        task = asyncio.create_task(notifier.watchdog())
        await asyncio.sleep(0.25)
        task.cancel()
        pings = receive_all(sock)
    assert 2 <= len(pings) <= 5
    assert set(pings) == {"WATCHDOG=1"}
