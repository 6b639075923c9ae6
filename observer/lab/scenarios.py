"""Named, repeatable hotplug scenarios. Each is a list of steps; the lab captures the kernel's
views after every step (and once before the first), so the truth before and after each step is
on disk: captures/SCENARIO/NN-STEP/ is the state after step NN (00-start: before step 01).

A step runs a shell command in the guest (`sh`) or a QMP command on the host (`qmp`), then may
wait until a guest shell condition holds (`until`), for hotplug that completes asynchronously."""

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from .guest import LabError

# The guest's dax/pmem stack (Debian builds them as modules); nd_e820 turns memmap= into a region.
PMEM_MODULES = "for m in nd_e820 nd_pmem dax_pmem device_dax kmem; do modprobe $m || exit 1; done"
# Debian 6.1 leaves hot-added blocks offline; 6.12 onlines them, and daxctl then refuses to
# reconfigure: pin the policy to offline (in the guest only) so every kernel behaves alike.
OFFLINE_POLICY = "echo offline > /sys/devices/system/memory/auto_online_blocks"


@dataclass
class Step:
    name: str
    sh: Optional[str] = None
    qmp: Optional[tuple] = None          # (command, {arguments})
    until: Optional[str] = None          # guest shell condition polled after the step
    timeout: int = 120
    expect_rc: int = 0


@dataclass
class Scenario:
    name: str
    what: str
    steps: list = field(default_factory=list)


SCENARIOS = {s.name: s for s in [
    Scenario("kmem", "dax/kmem: a devdax namespace on legacy pmem becomes System RAM (kmem), is "
                     "onlined, offlined and given back to device-dax", [
        Step("prepare", sh=f"{PMEM_MODULES} && {OFFLINE_POLICY} && ndctl list -R"),
        Step("devdax", sh="ndctl create-namespace -f -e namespace0.0 -m devdax"),
        Step("system-ram", sh="daxctl reconfigure-device --mode=system-ram --no-online dax0.0"),
        Step("online", sh="daxctl online-memory dax0.0"),
        Step("offline", sh="daxctl offline-memory dax0.0"),
        Step("devdax-again", sh="daxctl reconfigure-device --mode=devdax -f dax0.0"),
    ]),
]}


def run_scenario(guest, scenario, say=None):
    """Run every step of one scenario; returns the step records (also appended to steps.jsonl)."""
    say = say or guest.say
    records = []
    guest.capture(f"{scenario.name}/00-start")
    for i, step in enumerate(scenario.steps, 1):
        say(f"[{scenario.name}] {i}/{len(scenario.steps)} {step.name}")
        began = time.monotonic()
        rec = {"scenario": scenario.name, "index": i, "step": step.name}
        if step.sh:
            res = guest.sh(step.sh, timeout=step.timeout, check=False)
            rec.update(command=step.sh, rc=res["rc"], out=res["out"], err=res["err"])
            if res["rc"] != step.expect_rc:
                _record(guest, rec)
                raise LabError(f"[{scenario.name}] step {step.name} exited {res['rc']} "
                               f"(expected {step.expect_rc}): {step.sh}\n{res['err'][-2000:]}")
        if step.qmp:
            command, args = step.qmp
            rec.update(qmp=[command, args], qmp_return=guest.qmp.execute(command, **args))
        if step.until:
            deadline = time.monotonic() + step.timeout
            while guest.sh(step.until, check=False)["rc"] != 0:
                if time.monotonic() > deadline:
                    raise LabError(f"[{scenario.name}] {step.name}: '{step.until}' still false "
                                   f"after {step.timeout} s")
                time.sleep(1)
        rec["seconds"] = round(time.monotonic() - began, 2)
        rec["capture"] = f"captures/{scenario.name}/{i:02d}-{step.name}"
        guest.capture(f"{scenario.name}/{i:02d}-{step.name}")
        _record(guest, rec)
        records.append(rec)
    return records


def _record(guest, rec):
    with open(os.path.join(guest.results, "steps.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
