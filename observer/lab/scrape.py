"""In a lab guest, for the whole session: each daemon's /metrics every few seconds, appended to
RESULTS/metrics-MODE.history, each scrape after a `# scraped at UNIX_SECONDS` line. A Prometheus
can then be filled with the session as it was scraped (tests/test_dashboards.py backfills it
with `promtool tsdb create-blocks-from openmetrics`).

usage: python -m observer.lab.scrape RESULTS SECONDS MODE=PORT..."""

import os
import sys
import time
import urllib.request

SCRAPED = "# scraped at "


def history_file(mode):
    return f"metrics-{mode}.history"


def main(argv):
    results, interval, targets = argv[0], float(argv[1]), [t.split("=") for t in argv[2:]]
    while True:
        for mode, port in targets:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                    text = r.read().decode()
            except OSError:
                continue   # not serving yet, or stopped: the next round tries again
            with open(os.path.join(results, history_file(mode)), "a") as f:
                f.write(f"{SCRAPED}{time.time():.3f}\n{text}")
        time.sleep(interval)


if __name__ == "__main__":
    main(sys.argv[1:])
