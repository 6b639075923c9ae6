"""Prometheus filled with what the lab's daemons served: their /metrics history (each scrape
after a `# scraped at UNIX_SECONDS` line, observer/lab/scrape.py) made into OpenMetrics with
timestamps and the job and instance labels a scrape would have added, then turned into TSDB
blocks by `promtool tsdb create-blocks-from openmetrics`."""

import subprocess

from prometheus_client.parser import text_string_to_metric_families

from observer.lab.scrape import SCRAPED


def scrapes(path):
    """[(unix seconds, exposition text)] of a history file."""
    out = []
    with open(path) as f:
        for block in f.read().split(SCRAPED)[1:]:
            stamp, _, text = block.partition("\n")
            out.append((float(stamp), text))
    return out


def _labels(labels):
    def esc(v):
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


def openmetrics(histories):
    """OpenMetrics text of histories {instance: path}, under job memhp-observer: each metric's
    points together, in time order (a histogram's point: its buckets, count and sum)."""
    families = {}      # name -> (type, {label set: {time: [lines]}})
    for instance, path in histories.items():
        for stamp, text in scrapes(path):
            for fam in text_string_to_metric_families(text):
                kind, metrics = families.setdefault(fam.name, (fam.type, {}))
                for s in fam.samples:
                    if s.name.endswith("_created"):
                        continue
                    labels = dict(s.labels, job="memhp-observer", instance=instance)
                    key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
                    metrics.setdefault(key, {}).setdefault(stamp, []).append(
                        f"{s.name}{_labels(labels)} {s.value!r} {stamp:.3f}")
    out = []
    for name, (kind, metrics) in families.items():
        out.append(f"# TYPE {name} {kind}")
        for key in sorted(metrics):
            for stamp in sorted(metrics[key]):
                out += metrics[key][stamp]
    return "\n".join(out + ["# EOF", ""])


def create_blocks(histories, tsdb, tmp_path):
    path = tmp_path / "history.om"
    path.write_text(openmetrics(histories))
    made = subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", str(path),
                           str(tsdb)], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
