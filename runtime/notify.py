"""systemd notification protocol (sd_notify) and a watchdog fed only while frames flow.

The protocol is small enough to speak directly (no libsystemd, no extra package): one datagram of
``KEY=VALUE`` lines sent to the Unix datagram socket named by ``$NOTIFY_SOCKET``. A name starting
with ``@`` is in the Linux abstract namespace (leading NUL byte). Outside systemd the variable is
unset and every call is a no-op, so the same code runs in a terminal, in Docker and under systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger("edgestad.runtime.notify")


class SystemdNotifier:
    """Sends READY / STATUS / WATCHDOG / STOPPING messages to ``$NOTIFY_SOCKET`` if it is set."""

    def __init__(self, address: str | None = None):
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.address = address or None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False
        if self.address:
            if self.address.startswith("@"):
                self._target = "\0" + self.address[1:]
            else:
                self._target = self.address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: object) -> bool:
        """Send one message, e.g. ``notify(READY=1, STATUS="running")``. Never raises."""
        if self._sock is None:
            return False
        text = "\n".join(f"{k}={_one_line(v)}" for k, v in fields.items())
        with self._lock:
            try:
                self._sock.sendto(text.encode("utf-8"), self._target)
                return True
            except OSError as exc:
                # systemd gone or socket full: the runtime must keep inspecting parts regardless.
                if not self._warned:
                    log.warning("cannot send to NOTIFY_SOCKET %s: %s", self.address, exc)
                    self._warned = True
                return False

    def ready(self, status: str = "") -> bool:
        return self.notify(READY=1, STATUS=status) if status else self.notify(READY=1)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(value: object) -> str:
    # The protocol is newline separated; a newline inside STATUS would start a bogus field.
    return str(value).replace("\n", " ")


def watchdog_interval_s(env: dict[str, str] | None = None) -> float | None:
    """The watchdog period systemd expects (``WATCHDOG_USEC``), or None when no watchdog is set.

    ``WATCHDOG_PID``, when present, must be this process: a child that inherited the variables
    must not feed the parent's watchdog.
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class WatchdogFeeder:
    """Sends WATCHDOG=1 every ``period_s`` but only while frames keep arriving.

    A frozen camera, a hung driver call or a stuck backend stops ``frame_done()`` calls; the feeder
    then goes quiet and systemd restarts the service after ``WatchdogSec``. That is the point of the
    watchdog here: a process that is alive but not inspecting parts is a failure.
    """

    def __init__(self, notifier: SystemdNotifier, period_s: float, stale_after_s: float | None = None):
        self.notifier = notifier
        # systemd recommends pinging at half the watchdog period.
        self.period_s = max(0.01, float(period_s))
        self.stale_after_s = float(stale_after_s) if stale_after_s else 2 * self.period_s
        self._last_frame = None  # monotonic time of the last processed frame
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgestad-watchdog", daemon=True)
        self.pings = 0

    @classmethod
    def from_environment(cls, notifier: SystemdNotifier) -> "WatchdogFeeder | None":
        interval = watchdog_interval_s()
        if interval is None or not notifier.enabled:
            return None
        return cls(notifier, period_s=interval / 2, stale_after_s=interval / 2)

    def start(self) -> "WatchdogFeeder":
        self._thread.start()
        return self

    def frame_done(self) -> None:
        self._last_frame = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            last = self._last_frame
            if last is not None and time.monotonic() - last <= self.stale_after_s:
                if self.notifier.watchdog():
                    self.pings += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.period_s + 1)
