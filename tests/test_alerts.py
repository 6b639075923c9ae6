"""The alert rules with Debian's promtool: they load, their own unit tests pass, and every rule
carries what an on-call engineer needs (severity, summary, description, a runbook section that
exists) and is tested both firing and quiet."""

import os
import re
import subprocess

import yaml

DASHBOARDS = os.path.join(os.path.dirname(__file__), "..", "dashboards")
RULES = os.path.join(DASHBOARDS, "alerts.yml")
TESTS = os.path.join(DASHBOARDS, "alerts.test.yml")


def rules():
    with open(RULES) as f:
        return [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]


def test_promtool_checks_the_rules_and_runs_their_tests():
    checked = subprocess.run(["promtool", "check", "rules", RULES], capture_output=True, text=True)
    assert checked.returncode == 0 and f"SUCCESS: {len(rules())} rules found" in checked.stdout
    tested = subprocess.run(["promtool", "test", "rules", TESTS], capture_output=True, text=True,
                            cwd=DASHBOARDS)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_says_what_it_is_and_has_a_runbook_section():
    with open(os.path.join(DASHBOARDS, "RUNBOOK.md")) as f:
        anchors = {h.strip().lower() for h in re.findall(r"^## (.+)$", f.read(), re.M)}
    for r in rules():
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        page, _, anchor = r["annotations"]["runbook_url"].partition("#")
        assert page == "dashboards/RUNBOOK.md" and anchor == r["alert"].lower() in anchors


def test_every_alert_is_tested_firing_and_quiet():
    with open(TESTS) as f:
        cases = yaml.safe_load(f)["tests"]
    fired, quiet = set(), set()
    for case in cases:
        for t in case["alert_rule_test"]:
            (fired if t["exp_alerts"] else quiet).add(t["alertname"])
    names = {r["alert"] for r in rules()}
    assert fired == names and quiet == names
