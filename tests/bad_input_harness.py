"""Child process of test_bad_input.py: runs memhp-observer's verbs in-process on many inputs,
each under a time bound, with the process under a memory bound, and prints one JSON result per
job. A job is {"argv": [...]} (the command line, through cli.main) or {"daemon": ROOT} (one
reconcile of the daemon on ROOT, then its /metrics exposition).

Outcomes: "exit" (with the code, stdout and stderr), "traceback" (an exception escaped, with
its text) or "hang" (the time bound passed)."""

import contextlib
import io
import json
import resource
import signal
import sys
import traceback


class Hang(BaseException):
    """Raised by the alarm: BaseException, so that no `except Exception` in the code swallows it."""


def _alarm(*_):
    raise Hang()


def run_cli(argv):
    from observer.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:   # argparse
            code = e.code if isinstance(e.code, int) else 2
    return {"outcome": "exit", "code": code, "stdout": out.getvalue()[-4000:],
            "stderr": err.getvalue()[-4000:]}


def run_daemon(root):
    from observer.daemon import Daemon, State
    from observer.metrics import StateCollector, exposition
    from observer.sources.live import LiveSource
    d = Daemon(root, mode="procfs")
    d.current = State(kernel="campaign", mode="procfs")
    d.source = LiveSource(root)
    d.reconcile()
    d._take(d.source.poll(0))   # the read, and the header made from it, through the model
    return {"outcome": "exit", "code": 0, "reconcile_errors": d.current.reconcile_errors,
            "anomalies": [a.kind for a in d.current.anomalies],
            "exposition": exposition([StateCollector(d)]).decode()}


def main():
    bound, memory = float(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    signal.signal(signal.SIGALRM, _alarm)
    for line in sys.stdin:
        job = json.loads(line)
        signal.setitimer(signal.ITIMER_REAL, bound)
        try:
            result = run_daemon(job["daemon"]) if "daemon" in job else run_cli(job["argv"])
        except Hang:
            result = {"outcome": "hang"}
        except BaseException:
            result = {"outcome": "traceback", "text": traceback.format_exc()[-4000:]}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        result["id"] = job["id"]
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
