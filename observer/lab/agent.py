"""Guest side of the lab: runs the host's requests in order and writes their results into the
shared results directory (the console interleaves lines, so nothing is read from it).

Protocol, in RESULTS/cmd/: the host writes N.req (JSON, renamed into place); the agent answers
with N.res. Requests: {"sh": "...", "timeout": S} runs a shell command; {"capture": "NAME"}
writes the kernel views into RESULTS/captures/NAME; {"exit": true} ends the agent, which powers
the guest off. Usage (inside the guest only): python -m observer.lab.agent RESULTS"""

import json
import os
import subprocess
import sys
import tempfile
import time

from ..capture import capture
from .marker import NotALabGuest, require_lab_guest

POLL_SECONDS = 0.05


def write_json(path, doc):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.rename(tmp, path)


def run_shell(sh, timeout):
    began = time.monotonic()
    try:
        p = subprocess.run(["bash", "-c", sh], capture_output=True, text=True, timeout=timeout)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, e.stdout or "", (e.stderr or "") + f"\ntimed out after {timeout} s"
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        err = err.decode(errors="replace") if isinstance(err, bytes) else err
    return {"rc": rc, "out": out[-65536:], "err": err[-65536:],
            "seconds": round(time.monotonic() - began, 3)}


def take_capture(results, name):
    """The views into a guest-local tmpfs, then one tar file into the shared directory: a few
    hundred small files written one by one over 9p cost seconds under TCG, one file does not.
    The host unpacks it (Guest.capture). Owners go into the tar as numbers: Python's tarfile
    looks each file's user and group name up, which reads /etc/passwd and /etc/group over 9p
    anew each time (5.7 of a capture's 7.5 s in a 5.10 guest)."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        n = capture(os.path.join(tmp, "views"))
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
        with open(os.path.join(tmp, "views", "dmesg.txt"), "w") as f:
            f.write("\n".join(dmesg[-200:]) + "\n")
        tar = os.path.join(results, "captures", name + ".tar")
        os.makedirs(os.path.dirname(tar), exist_ok=True)
        subprocess.run(["tar", "--numeric-owner", "-C", os.path.join(tmp, "views"), "-cf",
                        tar + ".tmp", "."], check=True)
        os.rename(tar + ".tmp", tar)
    # CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns: events recorded in the guest fall between
    # the captures around their step
    return {"rc": 0, "files": n, "tar": os.path.relpath(tar, results), "ns": time.monotonic_ns()}


def serve(results):
    cmd = os.path.join(results, "cmd")
    os.makedirs(cmd, exist_ok=True)
    write_json(os.path.join(results, "ready"), {"kernel": os.uname().release, "pid": os.getpid()})
    n = 1
    while True:
        req_path = os.path.join(cmd, f"{n}.req")
        if not os.path.exists(req_path):
            time.sleep(POLL_SECONDS)
            continue
        with open(req_path) as f:
            req = json.load(f)
        if req.get("exit"):
            write_json(os.path.join(cmd, f"{n}.res"), {"rc": 0})
            return 0
        if "capture" in req:
            res = take_capture(results, req["capture"])
        else:
            res = run_shell(req["sh"], req.get("timeout", 120))
        write_json(os.path.join(cmd, f"{n}.res"), res)
        n += 1


def main(argv):
    results = argv[1]
    try:
        require_lab_guest(results)
    except NotALabGuest as e:
        print(e, file=sys.stderr)
        return 2
    return serve(results)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
