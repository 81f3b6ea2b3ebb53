"""systemd's notify protocol: READY=1, STATUS=…, WATCHDOG=1, STOPPING=1 on $NOTIFY_SOCKET.

Without NOTIFY_SOCKET (not under systemd, or Type=simple) every call is a no-op. The watchdog
pings come from a task on the event loop itself, so a loop that hangs stops pinging and systemd
restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval_s = _watchdog_interval_s(env)

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *fields: str) -> None:
        """Send `KEY=value` lines without ever blocking: a reader that does not keep up (its queue
        full) loses the message rather than stalling the event loop. Errors are swallowed: telling
        systemd must never stop serving."""
        if not self._address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto("\n".join(fields).encode(), self._address)
        except OSError:
            pass

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    async def watchdog(self) -> None:
        """Ping at half the watchdog interval for as long as the event loop runs."""
        if self.watchdog_interval_s is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval_s / 2)


def _watchdog_interval_s(env: Mapping[str, str]) -> float | None:
    """WATCHDOG_USEC, if it is meant for this process (WATCHDOG_PID absent or ours)."""
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1_000_000
