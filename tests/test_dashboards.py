"""The Grafana dashboards, linted the way grafana's dashboard-linter and mixtool lint: a
datasource variable and an instance variable drawn from the observers, every panel and query on
that datasource, every range of rate()/increase() `$__rate_interval` (or `$__range` for a
total over the range), units, titles and descriptions, a uid. Whether every query returns
data is checked on a real Prometheus holding a lab session's metrics (test_lab.py)."""

import glob
import json
import os
import re

import pytest

DASHBOARDS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "dashboards", "*.json")))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# units Grafana knows, of those that fit these metrics
UNITS = {"none", "short", "bytes", "s", "ops", "reqps", "percent"}
RANGE = re.compile(r"\b(rate|irate|increase|delta|changes)\([^\[]*\[([^\]]+)\]")


def load(path):
    with open(path) as f:
        return json.load(f)


def queries(dashboard):
    """(where, expr) of every panel target and annotation query."""
    out = [(f"panel {p['title']!r}", t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    out += [(f"annotation {a['name']!r}", a["expr"]) for a in dashboard["annotations"]["list"]]
    return out


def test_the_dashboards_are_there():
    assert [os.path.basename(p) for p in DASHBOARDS] == ["memhp-fleet.json", "memhp-host.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=os.path.basename)
def test_dashboard_lint(path):
    d = load(path)
    assert re.match(r"^[a-z0-9-]{1,40}$", d["uid"]) and d["title"] and d["description"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["datasource"] == DATASOURCE
    assert instance["query"]["query"] == 'label_values(memhp_build_info{job="memhp-observer"}, instance)'
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        where = p["title"]
        assert p["title"] and p["description"], where
        assert p["datasource"] == DATASOURCE, where
        assert p["fieldConfig"]["defaults"]["unit"] in UNITS, where
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, where
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE and t["refId"], where
    cells = set()
    for p in d["panels"]:   # no two panels on the same grid cell
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, p["title"]
        cells |= mine
    for a in d["annotations"]["list"]:
        assert a["datasource"] == DATASOURCE and a["enable"]
    for where, expr in queries(d):
        # every series of the observer's, from the chosen hosts
        assert 'job="memhp-observer"' in expr and ('instance=~"$instance"' in expr
                                                   or 'instance="$instance"' in expr), where
        for fn, window in RANGE.findall(expr):
            assert window in ("$__rate_interval", "$__range"), (where, fn, window)
