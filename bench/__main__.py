"""`.venv/bin/python -m bench`: the benchmarks of DESIGN.md §7 that run on this host, each as a
ratio to a reference measured in the same run (absolute times drift on this machine). Progress
goes to stderr; the report (Markdown: the machine, the date, each benchmark's method, the
figures against their budgets) to stdout, or to --out (BENCHMARKS.md). No figure is a pass or a
fail of the suite: it only runs `--quick` to see that every benchmark still runs."""

import argparse
import datetime
import os
import platform
import signal
import sys
import tempfile

from observer.lab import LabError
from observer.lab.kernels import LabSetupError

from . import idle, lab, reconcile, replay

BENCHMARKS = (reconcile, replay, idle, lab)
PLOT = os.path.join("docs", "bench-replay-scaling.png")   # beside the report
WITHIN = {True: "yes", False: "**no**", None: "—"}          # None: no budget, reported beside


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small sizes and short runs: only that every benchmark still runs")
    ap.add_argument("--out", help="write the report here (BENCHMARKS.md) instead of stdout")
    ap.add_argument("--no-lab", action="store_true",
                    help="leave out the benchmarks that boot a lab guest (a few minutes)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)   # a lab guest is then stopped like on Ctrl-C
    for tool, package in ((reconcile.NODE_EXPORTER, "prometheus-node-exporter"),
                          (None if args.no_lab else lab.BPFTRACE_EXE, "bpftrace")):
        if tool and not os.access(tool, os.X_OK):
            sys.exit(f"bench: no {tool}, a reference: install Debian's {package} "
                     f"(scripts/setup.sh --test-tools)")

    def progress(s):
        print(f"bench: {s}", file=sys.stderr, flush=True)

    sizes, rounds, idle_seconds = ((1000,), 3, 5) if args.quick else ((1000, 10_000, 100_000), 15, 60)
    plot = os.path.join(os.path.dirname(args.out), PLOT) if args.out else None
    with tempfile.TemporaryDirectory(prefix="memhp-bench-") as work:
        rows = (reconcile.rows(sizes, rounds, work, progress) +
                replay.rows(args.quick, work, progress, plot) + idle.rows(idle_seconds, progress))
        lab_failed = None
        if not args.no_lab:
            try:
                rows += lab.rows(args.quick, work, progress)
            except (LabError, LabSetupError) as e:
                # what the host measured (a quarter of an hour) is reported all the same
                lab_failed = f"the lab: {e} (--no-lab leaves it out)"
    text = report(rows, " ".join(["python -m bench"] + (argv if argv is not None else sys.argv[1:])),
                  plot and PLOT, lab_failed)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        progress(f"report written to {args.out}")
    else:
        sys.stdout.write(text)
    if lab_failed:
        sys.exit(f"bench: {lab_failed}")


def _interrupted(*_):
    raise KeyboardInterrupt


def report(rows, command, plot=None, lab_failed=None):
    lines = ["# Benchmarks", "",
             f"Made by `{command}` on {datetime.date.today().isoformat()}, on {machine()}. "
             "Every figure is a ratio to a reference measured in the same run, or a share of one "
             "core; the budgets are DESIGN.md §7's.", ""]
    if lab_failed:
        lines += [f"**Not all measured**: {lab_failed}; its benchmarks are missing below.", ""]
    lines += ["| benchmark | where | measured | reference | ratio | budget | within |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        lines.append(f"| {r['benchmark']} | {r['where']} | {r['measured']} | {r['reference']} | "
                     f"{ratio} | {r['budget']} | {WITHIN[r['within']]} |")
    if plot:
        lines += ["", f"![replay throughput against trace length and host size]({plot})"]
    lines += ["", "## Method", ""]
    for module in BENCHMARKS:
        lines += [" ".join(module.__doc__.split()), ""]
    return "\n".join(lines)


def machine():
    """CPU, cores, memory, kernel and distribution of this machine, in one line."""
    memory = int(_first("/proc/meminfo", "MemTotal", ":").split()[0]) // 2**20
    return (f"{_first('/proc/cpuinfo', 'model name', ':')}, {os.cpu_count()} cores, {memory} GiB, "
            f"kernel {platform.release()}, {_first('/etc/os-release', 'PRETTY_NAME', '=')}")


def _first(path, key, separator):
    """The value of the first `key<separator>value` line of a file, or "?"."""
    try:
        with open(path) as f:
            for line in f:
                name, found, value = line.partition(separator)
                if found and name.strip() == key:
                    return value.strip().strip('"')
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    main()
