"""systemd's notify protocol (sd_notify(3)), which a Type=notify service speaks: one datagram of
KEY=VALUE lines to the socket in $NOTIFY_SOCKET ("@name" is Linux's abstract namespace). Outside
systemd the variable is unset and nothing is sent. The watchdog interval is $WATCHDOG_USEC,
for this process when $WATCHDOG_PID is unset or names it."""

import os
import socket


class Notifier:
    def __init__(self, environ=os.environ):
        path = environ.get("NOTIFY_SOCKET")
        self.address = ("\0" + path[1:] if path.startswith("@") else path) if path else None
        usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
        ours = pid is None or pid == str(os.getpid())
        # systemd's advice: ping at half the interval
        self.watchdog_seconds = int(usec) / 2e6 if usec and usec.isdigit() and ours else None

    def send(self, **fields):
        """READY=1, STATUS=..., WATCHDOG=1, STOPPING=1: True when systemd was told."""
        if self.address is None:
            return False
        data = "".join(f"{key}={value}\n" for key, value in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(data, self.address)
                return True
            except OSError:
                return False
