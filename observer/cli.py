"""memhp-observer command line."""

import argparse
import functools
import json
import math
import os
import re
import signal
import sys

from . import __version__
from .views.source import ViewError

EPILOG = """examples:
  memhp-observer snapshot                    zones, memory blocks and resources of this host
  memhp-observer snapshot --json | jq .zones
  memhp-observer snapshot --root tests/fixtures/host-6.18
  memhp-observer check                       invariants of this host's views (exit 1 on critical)
  memhp-observer run --listen 127.0.0.1:9477  the daemon; curl -s localhost:9477/metrics
  memhp-observer record -o t.jsonl           a trace of hotplug calls and views (Ctrl-C ends it)
  memhp-observer replay t.jsonl              what the reference model finds in a trace
  memhp-observer map -o map.png --trace t.jsonl   the address space, leaks marked
  memhp-observer lab --scenario kmem         boot a 6.1 guest, run the kmem scenario
  memhp-observer capture -o /tmp/views       copy this host's views into a fixture tree
"""

EXIT_UNREADABLE = 2
MIN_SECONDS = 0.1


def cmd_snapshot(args):
    from . import formats, report, snapshot
    snap = snapshot.take(args.root)
    if args.json:
        json.dump(formats.snapshot_json(snap), sys.stdout, indent=1)
        print()
    else:
        print(report.snapshot_text(snap))
    return 0


def cmd_check(args):
    import time
    from . import report, snapshot
    from .model.anomaly import CRITICAL
    from .model.invariants import judge_views
    snap = snapshot.take(args.root)
    if snap.resources is None:
        print(f"memhp-observer: cannot check resources: {snap.iomem_error}", file=sys.stderr)
        return EXIT_UNREADABLE
    anomalies = judge_views(snap, time.time_ns())
    critical = any(a.severity == CRITICAL for a in anomalies)
    if args.json:
        json.dump({"format": "memhp-check", "version": 1, "root": snap.root, "kernel": snap.kernel,
                   "clean": not anomalies, "anomalies": [a.to_dict() for a in anomalies]},
                  sys.stdout, indent=1)
        print()
    else:
        for a in anomalies:
            print(report.anomaly_line(a))
        n = snap.blocks.count()
        print(f"{'clean' if not anomalies else f'{len(anomalies)} anomalies'}: "
              f"{len(snap.zones)} zones, {n} memory blocks and /proc/iomem checked")
    return 1 if critical else 0


def parse_listen(value):
    """HOST:PORT, [IPV6]:PORT, or :PORT for every IPv4 interface (the Prometheus exporters'
    convention)."""
    host, sep, port = value.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") or host.endswith("]"):
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else None
        if not inner or not _is_ip(inner, 6):
            raise argparse.ArgumentTypeError(f"expected [IPV6]:PORT, got {value!r}")
        return inner, int(port)
    if ":" in host:
        raise argparse.ArgumentTypeError(f"an IPv6 address goes in brackets: [{host}]:{port}")
    if host and not (_is_ip(host, 4) or re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", host)):
        raise argparse.ArgumentTypeError(f"not a host name or address: {host!r}")
    return host or "0.0.0.0", int(port)


def _is_ip(text, version):
    import ipaddress
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def seconds(value):
    """A positive, finite number of seconds (nan, inf, 0 or less would spin or never wake)."""
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not (math.isfinite(s) and s >= MIN_SECONDS):
        raise argparse.ArgumentTypeError(f"expected at least {MIN_SECONDS} seconds, got {value!r}")
    return s


def byte_count(value):
    """A positive number of bytes."""
    if not value.isdigit() or int(value) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of bytes, got {value!r}")
    return int(value)


def cmd_run(args):
    host, port = args.listen
    if args.strict and (args.mode == "procfs" or args.root != "/"):
        print("memhp-observer run: --strict needs the probes: not with --mode procfs or --root",
              file=sys.stderr)
        return 2
    compiled = None
    # held until daemon.run's handlers are in: a stop asked meanwhile is then a clean stop
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    if args.mode != "procfs" and args.root == "/":
        # the probes compile while the rest of the daemon is imported (seconds under TCG)
        from .probes.loader import compile_soon
        compiled = compile_soon(args.strict, args.probe_method)
    from . import daemon
    try:
        return daemon.run(host, port, root=args.root, interval=args.reconcile_interval,
                          mode=args.mode, record=args.record, journal=args.journal,
                          record_max_bytes=args.record_max_bytes, strict=args.strict,
                          probe_method=args.probe_method, compiled=compiled)
    finally:
        if compiled is not None:   # a start that ended before attaching: its compile ends first
            compiled.close()


def cmd_lab(args):
    from .lab import session
    from .lab import LabError
    from .lab.kernels import LabSetupError
    from .lab.scenarios import SCENARIOS, default_scenarios
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:<14} {s.what}" + (" (own boot: name it)" if s.boots_alone else ""))
        return 0
    if args.fidelity:
        from .lab import fidelity
        try:
            sys.stdout.write(fidelity.table(args.fidelity))
        except fidelity.NotResults as e:
            print(f"memhp-observer lab: {e}", file=sys.stderr)
            return 1
        return 0
    names = args.scenario or default_scenarios()
    try:
        summary = session.run(args.results, names, release=args.kernel)
    except (LabError, LabSetupError) as e:
        print(f"memhp-observer lab: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"memhp-observer lab: interrupted; guest stopped, console in "
              f"{args.results}/console.log", file=sys.stderr)
        return 130
    bad = {k: v for k, v in summary["checks"].items() if v}
    for name, sc in summary["scenarios"].items():
        print(f"{name}: {len(sc['steps'])} steps in {sc['seconds']} s")
    for capture, anomalies in bad.items():
        for a in anomalies:
            print(f"{capture}: {a['severity']} {a['kind']}: {a['message']}")
    print(f"kernel {summary['kernel']}: boot {summary['boot_seconds']} s, session "
          f"{summary['seconds']} s, {len(summary['checks'])} captures, "
          f"{'all clean' if not bad else f'{len(bad)} with anomalies'}; results in {args.results}")
    return 1 if bad else 0


def cmd_probes(args):
    from .probes.loader import ProbeError, Probes
    from .probes.functions import CORE
    probes = Probes(method=args.probe_method)
    try:
        status = probes.plan()
        if args.ebpf:
            print(probes.text())
            return 0
        status = probes.start()
    except ProbeError as e:
        print(f"memhp-observer probes: {e}", file=sys.stderr)
        return 1
    finally:
        probes.close()
    if args.json:
        json.dump({fn: st._asdict() for fn, st in status.items()}, sys.stdout, indent=1)
        print()
    else:
        print(f"{'FUNCTION':<32} {'PRESENT':<8} {'METHOD':<7} {'ATTACHED':<9} SHAPE / WHY NOT")
        for fn, st in status.items():
            attached = "yes" if st.attached else "no"
            detail = st.shape or ""
            if st.reason:
                detail = f"{st.reason}" + (f"  [{st.shape}]" if st.shape else "")
            print(f"{fn:<32} {'yes' if st.present else 'no':<8} {st.method:<7} {attached:<9} {detail}")
    return 0 if all(status[fn].attached for fn in CORE) else 1


def cmd_record(args):
    import signal
    import threading
    from .probes.loader import ProbeError
    from .record import record
    from .trace import TraceWriteError
    if args.strict and args.mode == "procfs":
        print("memhp-observer record: --strict needs the probes: not with --mode procfs",
              file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        counts = record(args.output, stop, duration=args.duration, mode=args.mode,
                        probe_method=args.probe_method,
                        snapshot_interval=args.snapshot_interval, root=args.root, strict=args.strict)
    except (ProbeError, TraceWriteError) as e:
        print(f"memhp-observer record: {e}", file=sys.stderr)
        return 1
    print(f"recorded {counts['events']} events, {counts['uevents']} uevents, {counts['snapshots']} snapshots, "
          f"{counts['lost']} lost into {args.output}", file=sys.stderr)
    return 0


def cmd_replay(args):
    from . import report
    from .model.anomaly import CRITICAL
    from .pipeline import replay
    from .trace import TraceError
    try:
        anomalies, model = replay(args.trace)
    except TraceError as e:
        print(f"memhp-observer replay: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    critical = sum(a.severity == CRITICAL for a in anomalies)
    snapshots = model.snapshots
    if args.json:
        json.dump({"format": "memhp-replay", "version": 1, "trace": args.trace,
                   "kernel": model.header.get("kernel"), "mode": model.header.get("mode"),
                   "snapshots": snapshots, "anomalies": [a.to_dict() for a in anomalies]},
                  sys.stdout, indent=1)
        print()
    else:
        for a in anomalies:
            print(report.anomaly_line(a))
        print(f"{len(anomalies)} anomalies, {critical} critical: {args.trace} "
              f"({model.header.get('mode')} mode, kernel {model.header.get('kernel')}); "
              f"{snapshots['judged']} snapshots judged, {snapshots['unsettled']} read while "
              f"hotplug was in flight")
    return 1 if critical else 0


def cmd_map(args):
    import time
    from . import snapshot
    from .model.invariants import judge_views
    suffix = os.path.splitext(args.output)[1].lower()
    if suffix not in (".png", ".svg"):
        print(f"memhp-observer map: {args.output}: the picture is .png or .svg", file=sys.stderr)
        return EXIT_UNREADABLE
    try:
        from . import mapdraw
        import matplotlib  # noqa: F401  (said plainly when it is missing)
    except ImportError:
        print("memhp-observer map: matplotlib is not importable: run scripts/setup.sh",
              file=sys.stderr)
        return 1
    if args.trace:
        from .pipeline import replay
        from .trace import TraceError
        try:
            anomalies, model = replay(args.trace)
        except TraceError as e:
            print(f"memhp-observer map: {e}", file=sys.stderr)
            return EXIT_UNREADABLE
        if model.judged is None:
            print(f"memhp-observer map: {args.trace}: no settled snapshot to draw",
                  file=sys.stderr)
            return EXIT_UNREADABLE
        snap, pagemaps = model.judged, list(model.pagemaps.values())
        title = (f"{os.path.basename(args.trace)}: the last settled read, every anomaly the "
                 f"trace made known")
    else:
        snap = snapshot.take(args.root)
        anomalies, pagemaps, title = judge_views(snap, time.time_ns()), [], None
    try:
        mapdraw.draw(args.output, snap, anomalies, pagemaps, title)
    except OSError as e:
        print(f"memhp-observer map: {args.output}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"drew {len(anomalies)} anomalies over {len(snap.zones)} zones and "
          f"{snap.blocks.count()} memory blocks into {args.output}")
    return 0


def cmd_capture(args):
    from .capture import CaptureError, capture
    try:
        n = capture(args.output, args.root, replace=args.replace)
    except CaptureError as e:
        print(f"memhp-observer capture: {e}", file=sys.stderr)
        return 1
    print(f"captured {n} files from {args.root} into {args.output}")
    return 0


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's, as wide as the terminal, found without shutil: argparse makes a formatter for
    every argument added, and its own imports shutil (and with it bz2 and lzma: a sixth of a
    second of the daemon's start under TCG) to ask the width."""

    def __init__(self, prog):
        super().__init__(prog, width=_columns() - 2)


def _columns():
    """What shutil.get_terminal_size() gives: $COLUMNS, else the terminal's, else 80."""
    if os.environ.get("COLUMNS", "").isdigit() and int(os.environ["COLUMNS"]) > 0:
        return int(os.environ["COLUMNS"])
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):   # no stdout, or not a terminal
        return 80


def build_parser():
    p = argparse.ArgumentParser(prog="memhp-observer", description=__doc__, epilog=EPILOG,
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="verb", required=True,
                           parser_class=functools.partial(argparse.ArgumentParser,
                                                          formatter_class=HelpFormatter))

    s = sub.add_parser("snapshot", help="show zones, memory blocks and hotplug resources")
    s.add_argument("--root", default="/", help="read the views under this directory (default /)")
    s.add_argument("--json", action="store_true", help="the stable JSON shape (see README)")
    s.set_defaults(func=cmd_snapshot)

    k = sub.add_parser("check", help="check the invariants the kernel views show; "
                                     "exit 0 clean, 1 critical anomaly, 2 unreadable input")
    k.add_argument("--root", default="/", help="read the views under this directory (default /)")
    k.add_argument("--json", action="store_true", help="anomaly records as JSON (see README)")
    k.set_defaults(func=cmd_check)

    r = sub.add_parser("run", help="the daemon: reconcile from the kernel views and serve /metrics")
    r.add_argument("--listen", type=parse_listen, default="127.0.0.1:9477",
                   help="HOST:PORT or [IPV6]:PORT for /metrics (default 127.0.0.1:9477, this "
                        "machine only); :PORT listens on every IPv4 interface")
    r.add_argument("--mode", choices=["auto", "bpf", "procfs"], default="auto",
                   help="auto: probes where the kernel lets them attach, else procfs; bpf: exit 1 "
                        "unless they attach; procfs: kernel views and uevents only")
    r.add_argument("--reconcile-interval", type=seconds, default=10.0, metavar="S",
                   help="seconds between reads of the kernel views (default 10)")
    r.add_argument("--record", metavar="FILE",
                   help="also write every record the model is fed into a new trace (v1), "
                        "which `replay` judges the same way")
    r.add_argument("--record-max-bytes", type=byte_count, metavar="N",
                   help="past N bytes, the next read of the views begins a new --record file "
                        "(FILE.1 .. FILE.4 kept; default 64 MiB); each file replays on its own")
    r.add_argument("--journal", metavar="FILE",
                   help="append every anomaly reported to this JSON Lines journal, fsynced per "
                        "record, rotated at 16 MiB (FILE.1 .. FILE.4); a restart in the same "
                        "boot says no open anomaly twice; SIGHUP reopens it")
    r.add_argument("--strict", action="store_true",
                   help="exit 1 unless every core probe attaches (no procfs mode)")
    r.add_argument("--probe-method", choices=["auto", "kprobe", "kfunc"], default="auto",
                   help="auto: kprobes where the kernel has them, else fentry (kfunc)")
    r.add_argument("--root", default="/", help="read the views under this directory (default /)")
    r.set_defaults(func=cmd_run)

    pr = sub.add_parser("probes", help="attach every probe, then report per watched function: "
                                       "present, shape, method, attached or why not; exit 0 "
                                       "when all core probes attach")
    pr.add_argument("--probe-method", choices=["auto", "kprobe", "kfunc"], default="auto",
                    help="auto: kprobes where the kernel has them, else fentry (kfunc)")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)  # print the BPF C
    pr.set_defaults(func=cmd_probes)

    rec = sub.add_parser("record", help="record hotplug calls and view snapshots into a trace (v1)")
    rec.add_argument("-o", "--output", required=True, metavar="FILE")
    rec.add_argument("--duration", type=seconds, metavar="S", help="stop after S seconds (default: SIGINT)")
    rec.add_argument("--snapshot-interval", type=seconds, default=10.0, metavar="S",
                     help="seconds between snapshots of the kernel views (default 10)")
    rec.add_argument("--strict", action="store_true", help="fail unless every core probe attaches")
    rec.add_argument("--mode", choices=["auto", "bpf", "procfs"], default="auto",
                     help="procfs: no probes, snapshots and memory-block uevents only")
    rec.add_argument("--probe-method", choices=["auto", "kprobe", "kfunc"], default="auto",
                     help="auto: kprobes where the kernel has them, else fentry (kfunc)")
    rec.add_argument("--root", default="/", help=argparse.SUPPRESS)
    rec.set_defaults(func=cmd_record)

    rp = sub.add_parser("replay", help="judge a recorded trace with the reference model; exit 1 "
                                       "on a critical anomaly, 2 when the trace is unreadable")
    rp.add_argument("trace", metavar="FILE")
    rp.add_argument("--json", action="store_true", help="anomaly records as one JSON document")
    rp.set_defaults(func=cmd_replay)

    mp = sub.add_parser("map", help="draw the physical address space (zones, blocks, resources, "
                                    "pagemaps, anomalies) into a .png or .svg")
    mp.add_argument("-o", "--output", required=True, metavar="FILE.png|FILE.svg")
    src = mp.add_mutually_exclusive_group()
    src.add_argument("--root", default="/", help="the views under this directory (default /)")
    src.add_argument("--trace", metavar="FILE", help="a trace: its last settled read, its "
                                                     "pagemaps and every anomaly it made known")
    mp.set_defaults(func=cmd_map)

    lab = sub.add_parser("lab", help="boot a Debian kernel under QEMU/TCG and drive hotplug "
                                     "scenarios in it, capturing the views around every step")
    lab.add_argument("--kernel", metavar="RELEASE",
                     help="kernel release in the lab cache, or a series such as 6.12 for its "
                          "newest (default: the newest 6.1)")
    lab.add_argument("--results", default="/tmp/memhp-lab", metavar="DIR",
                     help="results directory, shared read-write with the guest (default /tmp/memhp-lab)")
    lab.add_argument("--scenario", action="append", metavar="NAME",
                     help="run this scenario (repeatable; default: all but those that need a "
                          "boot of their own, in one boot)")
    lab.add_argument("--list", action="store_true", help="list the scenarios and exit")
    lab.add_argument("--fidelity", nargs="+", metavar="RESULTS",
                     help="print the kernel fidelity table (Markdown) of these lab results "
                          "directories and exit")
    lab.set_defaults(func=cmd_lab)

    c = sub.add_parser("capture", help="copy the kernel views into a new or empty directory "
                                       "(fixtures, bug reports); exit 1 when refused")
    c.add_argument("-o", "--output", required=True, metavar="DIR")
    c.add_argument("--replace", action="store_true",
                   help="replace DIR when it holds an earlier capture and nothing else")
    c.add_argument("--root", default="/", help="read the views under this directory (default /)")
    c.set_defaults(func=cmd_capture)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ViewError as e:
        print(f"memhp-observer: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    except BrokenPipeError:   # `... --json | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
