"""Memory-block uevents from the kernel's netlink socket (kernel-reference.md §4.4): add/remove
when a block device is registered/unregistered (hot-add, hot-remove), online/offline when a
block changes state. What procfs mode sees between snapshots when no probe can attach."""

import errno
import re
import select
import socket
import time

NETLINK_KOBJECT_UEVENT = 15
_BLOCK = re.compile(r"^/devices/system/memory/memory(\d+)$")


def parse(message):
    """A uevent record for a memory block, or None for anything else. The kernel's message is
    "ACTION@DEVPATH\\0KEY=VALUE\\0..."; udev's re-broadcasts (libudev header) are not read."""
    if message.startswith(b"libudev"):
        return None
    fields = message.split(b"\0")
    env = dict(f.decode(errors="replace").split("=", 1) for f in fields[1:] if b"=" in f)
    m = _BLOCK.match(env.get("DEVPATH", ""))
    if env.get("SUBSYSTEM") != "memory" or not m:
        return None
    return {"type": "uevent", "action": env.get("ACTION", "?"), "block": int(m.group(1)),
            "seqnum": int(env.get("SEQNUM", "0"))}


class UeventListener:
    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
        self.sock.bind((0, 1))      # group 1: the kernel's broadcasts
        self.sock.setblocking(False)
        # room for a storm of onlines and offlines (the kernel caps it at net.core.rmem_max)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.overflowed = False     # the kernel dropped uevents since this was last cleared

    def wait(self, timeout):
        """Until a message may be waiting, or timeout seconds."""
        select.select([self.sock], [], [], timeout)

    def take(self):
        """The memory-block uevents waiting now (never blocks)."""
        out = []
        while True:
            try:
                message = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                # the socket was full and the kernel dropped uevents: whoever reads the views
                # must read every block again
                self.overflowed = True
                continue
            rec = parse(message)
            if rec:
                rec["ts_ns"] = time.monotonic_ns()
                out.append(rec)
        return out

    def close(self):
        self.sock.close()


class HandedUevents:
    """Memory-block uevents handed in by the caller, for views under another root (a tree whose
    kernel is elsewhere): what UeventListener gives, from a list."""

    def __init__(self):
        self.waiting, self.overflowed = [], False

    def hand(self, action, block, ts_ns=None):
        self.waiting.append({"type": "uevent", "action": action, "block": block, "seqnum": 0,
                             "ts_ns": time.monotonic_ns() if ts_ns is None else ts_ns})

    def wait(self, timeout):
        time.sleep(timeout)

    def take(self):
        taken, self.waiting = self.waiting, []
        return taken

    def close(self):
        pass
