"""memhp-observer command line."""

import argparse
import json
import sys

from . import __version__
from .views.source import ViewError

EPILOG = """examples:
  memhp-observer snapshot                    zones, memory blocks and resources of this host
  memhp-observer snapshot --json | jq .zones
  memhp-observer snapshot --root tests/fixtures/host-bookworm
  memhp-observer capture -o /tmp/views       copy this host's views into a fixture tree
"""

EXIT_UNREADABLE = 2


def cmd_snapshot(args):
    from . import report, snapshot
    snap = snapshot.take(args.root)
    if args.json:
        json.dump(snapshot.to_json(snap), sys.stdout, indent=1)
        print()
    else:
        print(report.snapshot_text(snap))
    return 0


def cmd_capture(args):
    from .capture import capture
    n = capture(args.output, args.root)
    print(f"captured {n} files from {args.root} into {args.output}")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="memhp-observer", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("snapshot", help="show zones, memory blocks and hotplug resources")
    s.add_argument("--root", default="/", help="read the views under this directory (default /)")
    s.add_argument("--json", action="store_true", help="the stable JSON shape (see README)")
    s.set_defaults(func=cmd_snapshot)

    c = sub.add_parser("capture", help="copy the kernel views into a directory (fixtures, bug reports)")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--root", default="/")
    c.set_defaults(func=cmd_capture)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ViewError as e:
        print(f"memhp-observer: {e}", file=sys.stderr)
        return EXIT_UNREADABLE


if __name__ == "__main__":
    sys.exit(main())
