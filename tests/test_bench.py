"""The benchmarks still run (`python -m bench --quick`: every one, on small sizes, the lab's in
a guest of their own, into a report). Their figures are not judged here: DESIGN.md §7's budgets are ratios a benchmark
reports (BENCHMARKS.md), never timed tests."""

import os
import re
import subprocess
import sys

from bench import __main__ as bench, reconcile
from observer.probes.functions import ALL, CORE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_benchmark_runs_into_the_report(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "bench: replay: timing" in run.stderr            # progress, as it goes
    text = out.read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")][1:]
    # the watched functions the guest's kernel has: 19 of 20 in Debian's 6.12
    watched = int(re.search(r"bpftrace counting calls of the (\d+) watched", text).group(1))
    assert len(CORE) <= watched <= len(ALL)
    assert {(r[0].lstrip("| "), r[1]) for r in rows} == {
        *((f"{said} (median of {3 * reconcile.SCRAPES if kind == 'scrape' else 3})", where)
          for kind, said in reconcile.KINDS.items() for where in ("this host", "1,000 blocks")),
        ("replay throughput", "2,000 events, 1,000 blocks"),
        ("idle daemon CPU, procfs mode, 10 s reconcile", "this host"),
        *((name, "Debian 6.12 guest (TCG)") for name in (
            "start-up to READY, BPF mode (kprobes, the program kept from the first start), "
            "median of 1",
            "start-up to READY, the first on this kernel (bcc compiles the program and keeps it)",
            "start-up, bcc's own: an empty program on the 4 core kprobes, median of 1",
            "idle daemon CPU, BPF mode, 10 s reconcile, 5 s",
            *(f"probe overhead, {method}, {which}, median of {n} cycles"
              for method, n in (("kprobes (the daemon), on and off in turns", 6),
                                ("kprobes armed, the daemon stopped (the probes alone), in the "
                                 "same turns", 6),
                                ("fentry (the daemon), started and stopped in turns", 3),
                                (f"kprobes (bpftrace counting calls of the {watched} watched "
                                 "functions), started and stopped in turns", 3))
              for which in ("wall time", "CPU time of the cycling thread")),
            *(f"probe run time, {method} (the daemon's BPF programs, as the kernel times them), "
              "6 cycles" for method in ("kprobes", "fentry")),
            f"probe run time, kprobes (bpftrace's counting programs on the {watched} watched "
            "functions, as the kernel times them), 6 cycles",
            "latency, kernel call to metric, 6 calls",
            "latency, kernel call to anomaly journalled, 3 calls"))}
    # the kernel timed the daemon's programs (kprobes, fentry) and bpftrace's: an entry and a
    # return of offline_pages and online_pages a cycle at least
    runs = re.findall(r"\| \d+ µs a cycle \(([\d.]+) runs of [\d.]+ µs\)", text)
    assert len(runs) == 3 and all(float(r) >= 4 for r in runs)
    assert all(re.fullmatch(r"[\d.]+×|—", r[4]) and r[6].rstrip(" |") in bench.WITHIN.values()
               for r in rows)
    for module in bench.BENCHMARKS:
        assert " ".join(module.__doc__.split()) in text
    assert (tmp_path / bench.PLOT).stat().st_size > 0


def test_a_lab_that_fails_keeps_what_the_host_measured(tmp_path):
    # no lab kernels where the lab looks: its benchmarks fail, the host's are reported
    out = tmp_path / "BENCHMARKS.md"
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, MEMHP_LAB_CACHE=str(tmp_path / "no-lab")))
    assert run.returncode != 0
    said = run.stderr.strip().splitlines()[-1]
    assert said.startswith("bench: the lab: ") and "--no-lab leaves it out" in said
    text = out.read_text()
    assert f"**Not all measured**: {said.removeprefix('bench: ')}" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert any(r.startswith("| replay throughput |") for r in rows)
    assert not any("Debian 6.12 guest" in r for r in rows)
