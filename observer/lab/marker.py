"""The marker that says "this is a lab guest": the lab boots every guest with memhp_lab=TOKEN on
the kernel command line and writes the same TOKEN into the results directory. Code that writes
hotplug sysfs files runs only where both agree, so it can never touch the host's memory."""

import os

CMDLINE_KEY = "memhp_lab"
TOKEN_FILE = "lab-token"


class NotALabGuest(Exception):
    pass


def require_lab_guest(results, cmdline="/proc/cmdline"):
    with open(cmdline) as f:
        words = f.read().split()
    booted = [w.split("=", 1)[1] for w in words if w.startswith(CMDLINE_KEY + "=")]
    try:
        with open(os.path.join(results, TOKEN_FILE)) as f:
            token = f.read().strip()
    except OSError:
        token = None
    if not booted or token is None or booted[0] != token:
        raise NotALabGuest(f"refusing to run: not a memhp-observer lab guest ({cmdline} has no "
                           f"{CMDLINE_KEY}= matching {os.path.join(results, TOKEN_FILE)})")
