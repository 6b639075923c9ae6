"""Named, repeatable hotplug scenarios. Each is a list of steps; the lab captures the kernel's
views after every step (and once before the first), so the truth before and after each step is
on disk: captures/SCENARIO/NN-STEP/ is the state after step NN (00-start: before step 01).

A step runs a shell command in the guest (`sh`) and/or a QMP command on the host (`qmp`), then
may wait until a guest shell condition holds (`until`), for hotplug that completes
asynchronously. `sh` and `until` may name values an earlier step saved ({name}): a step with
`save` keeps the last line of its output under that name (which blocks a DIMM added, say)."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field

from . import kernels
from . import LabError

# The guest's dax/pmem stack (Debian builds them as modules); nd_e820 turns memmap= into a region.
# Where the kernel still has dax_pmem_compat (5.10), a devdax namespace's alias (nd:t7) names it,
# and daxctl cannot reconfigure its /sys/class/dax model: what `daxctl migrate-device-model`
# would write into /etc goes into the guest's own /run.
PMEM_MODULES = ("mkdir -p /run/modprobe.d && printf 'blacklist dax_pmem_compat\\nalias nd:t7* dax_pmem\\n' "
                "> /run/modprobe.d/memhp-lab.conf && "
                "for m in nd_e820 nd_pmem dax_pmem device_dax kmem; do modprobe $m || exit 1; done")
# Debian 6.1 leaves hot-added blocks offline; 6.12 onlines them, and daxctl then refuses to
# reconfigure: pin the policy to offline (in the guest only) so every kernel behaves alike.
OFFLINE_POLICY = "echo offline > /sys/devices/system/memory/auto_online_blocks"
MEM = "/sys/devices/system/memory"
BLOCK_SIZE = f"$((0x$(cat {MEM}/block_size_bytes)))"
# Blocks online in Movable, ascending (boot Movable comes from movablecore= on the guest's cmdline)
MOVABLE_BLOCKS = (f"for m in {MEM}/memory*; do [ \"$(cat $m/state) $(cat $m/valid_zones)\" = "
                  f"'online Movable' ] && echo ${{m##*memory}}; done | sort -n")
DIMM_SIZE = 512 << 20
VIRTIO_MEM_SIZE = 1 << 30
# Bytes of "System RAM (virtio_mem)" in /proc/iomem, into $s
VIRTIO_MEM_BYTES = ("s=0; for r in $(grep 'System RAM (virtio_mem)' /proc/iomem | "
                    "grep -o '[0-9a-f]*-[0-9a-f]*'); do s=$((s + 0x${r#*-} - 0x${r%-*} + 1)); done")
# Blocks from the first address QEMU gave the DIMM ({dimm_addr}, decimal) for DIMM_SIZE
DIMM_BLOCKS = f"seq $(({{dimm_addr}} / {BLOCK_SIZE})) $((({{dimm_addr}} + {DIMM_SIZE}) / {BLOCK_SIZE} - 1))"


# The one guest every scenario runs in: boot Movable memory for offline-edge/-middle/stress, and
# an empty virtio-mem device (its 1 GiB appears only when the virtio-mem scenario asks). The
# kernel image stays where it was linked: 5.10's KASLR put it at 0x13e800000-0x1417fffff in a
# boot, across the start of boot Movable, whose edge blocks then never went offline.
GUEST_APPEND = ["movablecore=1G", "nokaslr"]
# A second legacy pmem range, inside QEMU's device-memory window (DIMMs go there): once nd_pmem
# claims it busy, a DIMM plugged at that address cannot get its System RAM (the conflict
# scenario). It boots on its own: with this range the 6.1 guest's boot allocations land in
# random boot-Movable blocks (seen in 2 of 3 boots), which then never go offline.
CONFLICT_ADDR, CONFLICT_SIZE = 9 << 30, 256 << 20
GUEST_QEMU = [f"-object memory-backend-ram,id=vmem0,size={1 << 30}",
              "-device virtio-mem-pci,id=vm0,memdev=vmem0,node=0,requested-size=0"]


# Debian builds CONFIG_MEMORY_NOTIFIER_ERROR_INJECT=m: an errno written to an action's `error`
# makes that memory notifier action fail (lib/memory-notifier-error-inject.c)
INJECT = ("modprobe memory-notifier-error-inject && "
          "{ mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug; }")
INJECT_DIR = "/sys/kernel/debug/notifier-error-inject/memory/actions"
INJECTED_ERRNO = -12   # -ENOMEM


def _offline_one(candidates):
    """Shell that offlines the first of the candidate blocks that will go and prints its number.
    A Movable block can be briefly busy (pages in use fail to migrate: EBUSY), so each is tried
    for a while; the top block of this guest's RAM never goes (it holds a reserved page)."""
    return (f"for b in $({candidates}); do for try in $(seq 10); do "
            f"if echo offline > {MEM}/memory$b/state 2>/dev/null; then echo $b; exit 0; fi; "
            f"sleep 1; done; done; echo 'no candidate block would go offline' >&2; exit 1")


@dataclass
class Step:
    name: str
    sh: str | None = None
    qmp: tuple | None = None        # (command, {arguments})
    until: str | None = None        # guest shell condition polled after the step
    save: str | None = None         # keep the output's last line as {save} for later steps
    timeout: int = 120
    expect_rc: int = 0


def _dimm_added(dimm, suffix):
    """Steps that give QEMU a DIMM_SIZE memory backend and plug a pc-dimm on it. QEMU's address
    for the DIMM is saved as {dimm_addr}; the guest adds it via ACPI (the until waits for it)."""
    return [Step(f"object-add{suffix}", qmp=("object-add", {"qom-type": "memory-backend-ram",
                                                           "id": f"{dimm}mem", "size": DIMM_SIZE})),
            Step(f"device-add{suffix}", qmp=("device_add", {"driver": "pc-dimm", "id": dimm,
                                                           "memdev": f"{dimm}mem"}),
                 until=f"[ -e {MEM}/memory$((({{dimm_addr}} + {DIMM_SIZE}) / {BLOCK_SIZE} - 1)) ]")]


@dataclass
class Scenario:
    name: str
    what: str
    steps: list = field(default_factory=list)
    append: list = field(default_factory=list)   # kernel arguments it needs: it boots on its own
    alone: bool = False                          # it leaves the kernel broken: a boot of its own
    makes: frozenset = frozenset()               # the anomaly kinds (warning, critical) it makes

    @property
    def boots_alone(self):
        return bool(self.append) or self.alone


def default_scenarios():
    """What one boot runs when no scenario is named: every scenario that needs no boot of its own."""
    return [name for name, s in SCENARIOS.items() if not s.boots_alone]


# The lab's modules (module/*.c, built per kernel by kernels.lab_module)
# Long enough for every observer to judge the state a step left: the recorders read the views
# every 3 s (session.SNAPSHOT_SECONDS), and procfs mode judges a read only a second past the last
# uevent and when it agrees with the read before: two reads after the uevents udev's onlining
# may still make once the action returned.
FAULT_SETTLE_SECONDS = 9


def action_file(module):
    """Where a lab module (memhp_faults, memhp_gpu) takes its actions."""
    return f"/sys/module/{module}/parameters/action"


def _module_action(action, module="memhp_faults"):
    """Shell: one action of a lab module, then its last word (dmesg) once the observers have had
    time to judge what it left."""
    return (f"echo \"{action}\" > {action_file(module)} && sleep {FAULT_SETTLE_SECONDS} && "
            f"dmesg | grep '{module}: ' | tail -1")


# Where the device-private scenario claims a region and then plugs a DIMM: in QEMU's DIMM window,
# above the conflict scenario's range
PRIVATE_CLAIM_ADDR = 11 << 30
PRIVATE_DIMM_SIZE = 128 << 20   # memhp_gpu's chunk


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
    Scenario("fsdax", "ZONE_DEVICE: an fsdax namespace (devm_memremap_pages, FS_DAX), then a "
                      "devdax one (GENERIC), each torn down to raw", [
        Step("prepare", sh=PMEM_MODULES),
        Step("fsdax", sh="ndctl create-namespace -f -e namespace0.0 -m fsdax"),
        # a legacy memmap= namespace cannot be destroyed: raw is its teardown
        Step("fsdax-raw", sh="ndctl create-namespace -f -e namespace0.0 -m raw"),
        Step("devdax", sh="ndctl create-namespace -f -e namespace0.0 -m devdax"),
        Step("devdax-raw", sh="ndctl create-namespace -f -e namespace0.0 -m raw"),
    ]),
    Scenario("dimm", "ACPI pc-dimm: hot-add over QMP, its blocks onlined movable, offlined, "
                     "device_del; then again, ejected while online (ACPI offlines it)", [
        Step("prepare", sh=OFFLINE_POLICY),
        *_dimm_added("dimm0", ""),
        Step("added", sh=f"for b in $({DIMM_BLOCKS}); do [ -e {MEM}/memory$b ] || exit 1; done; "
                         f"echo $({DIMM_BLOCKS})", save="dimm_blocks"),
        Step("online-movable", sh=f"for b in $({DIMM_BLOCKS}); do echo online_movable > "
                                  f"{MEM}/memory$b/state || exit 1; done"),
        Step("offline", sh=f"for b in $({DIMM_BLOCKS}); do echo offline > {MEM}/memory$b/state "
                           f"|| exit 1; done"),
        Step("device-del", qmp=("device_del", {"id": "dimm0"}),
             until=f"[ ! -e {MEM}/memory$(({{dimm_addr}} / {BLOCK_SIZE})) ]"),
        Step("object-del", qmp=("object-del", {"id": "dimm0mem"})),
        # the ACPI eject path: device_del with the blocks online, the kernel offlines them itself
        *_dimm_added("dimm1", "-2"),
        Step("online-2", sh=f"for b in $({DIMM_BLOCKS}); do echo online_movable > "
                            f"{MEM}/memory$b/state || exit 1; done; echo $({DIMM_BLOCKS})",
             save="dimm2_blocks"),
        Step("eject-online", qmp=("device_del", {"id": "dimm1"}),
             until=f"[ ! -e {MEM}/memory$(({{dimm_addr}} / {BLOCK_SIZE})) ]"),
        Step("object-del-2", qmp=("object-del", {"id": "dimm1mem"})),
    ]),
    Scenario("virtio-mem", "virtio-mem: grow by 1 GiB and shrink to 0 with qom-set "
                           "requested-size, auto-onlined movable", [
        # no udev in the guest: the driver is loaded by hand
        Step("prepare", sh=f"modprobe virtio_mem && echo online_movable > {MEM}/auto_online_blocks"),
        Step("grow", qmp=("qom-set", {"path": "vm0", "property": "requested-size",
                                      "value": VIRTIO_MEM_SIZE}),
             until=f"{VIRTIO_MEM_BYTES} && [ $s -eq {VIRTIO_MEM_SIZE} ] && "
                   f"! grep -q offline {MEM}/memory*/state"),
        Step("shrink", qmp=("qom-set", {"path": "vm0", "property": "requested-size", "value": 0}),
             until="! grep -q 'System RAM (virtio_mem)' /proc/iomem"),
        Step("restore", sh=OFFLINE_POLICY),
    ]),
    Scenario("offline-edge", "offline and online a block at an edge of the boot Movable zone: "
                             "the span shrinks at the edge and grows back", [
        Step("offline", sh=_offline_one(f"{MOVABLE_BLOCKS} | sed -n '1p;$p'"), save="edge"),
        Step("online", sh=f"echo online_movable > {MEM}/memory{{edge}}/state"),
    ]),
    Scenario("offline-middle", "offline and online a block inside the boot Movable zone: the span "
                               "does not change", [
        Step("offline", sh=_offline_one(f"{MOVABLE_BLOCKS} | sed '1d;$d'"), save="middle"),
        Step("online", sh=f"echo online_movable > {MEM}/memory{{middle}}/state"),
    ]),
    Scenario("stress", "random offline/online of Movable blocks for 20 s", [
        Step("random", timeout=90, sh=(
            f"end=$((SECONDS + 20)); ok=0; busy=0; "
            f"while [ $SECONDS -lt $end ]; do b=$({MOVABLE_BLOCKS} | shuf -n 1); "
            f"if echo offline > {MEM}/memory$b/state 2>/dev/null; then ok=$((ok+1)); "
            f"echo online_movable > {MEM}/memory$b/state || exit 1; else busy=$((busy+1)); fi; "
            f"done; echo cycles=$ok busy=$busy")),
    ]),
    Scenario("conflict", "a pc-dimm plugged where a pmem namespace holds the range busy: its "
                         "System RAM request fails (-EEXIST), which ACPI takes as 'already used'", [
        Step("prepare", sh=f"{PMEM_MODULES} && grep -q 'namespace1.0' /proc/iomem"),
        Step("object-add", qmp=("object-add", {"qom-type": "memory-backend-ram", "id": "dimm2mem",
                                               "size": CONFLICT_SIZE})),
        # never unplugged: ACPI marked it enabled, and an eject would remove memory never added
        Step("device-add", qmp=("device_add", {"driver": "pc-dimm", "id": "dimm2",
                                               "memdev": "dimm2mem", "addr": CONFLICT_ADDR}),
             # a failed add changes no view to wait for: the guest's ACPI work gets 10 s
             until="sleep 10"),
    ], append=[f"memmap={CONFLICT_SIZE >> 20}M!{CONFLICT_ADDR:#x}"],
        makes=frozenset({"operation_failed"})),
    Scenario("faults", "what buggy drivers and kernels do, done by the lab's fault module: a "
                       "pagemap left mapped after its region goes, a device range released as "
                       "System RAM, a remove of memory never added, System RAM left over removed "
                       "memory (whole, and stretched over part of it), Movable's span left wide "
                       "after an offline and after a remove; then dax/kmem unbound while its "
                       "memory is online (its deliberate pin, no leak)", [
        Step("prepare", sh=f"{OFFLINE_POLICY} && insmod {{faults_module}}"),
        Step("remove-never-added", sh=_module_action("remove-never-added"), timeout=60),
        Step("leak-whole", sh=_module_action("leak-whole"), timeout=60),
        Step("add-two", sh=_module_action("add-two"), timeout=60),
        Step("leak-partial", sh=_module_action("leak-partial"), timeout=60),
        Step("map", sh=_module_action("map"), timeout=60),
        Step("map-again", sh=_module_action("map"), timeout=60),
        Step("drop-owner", sh=_module_action("drop-owner"), timeout=60),
        Step("release-as-ram", sh=_module_action("release-as-ram"), timeout=60),
        *_dimm_added("dimm0", ""),
        # seen online in Movable by every observer: procfs mode knows a block's zone only so
        Step("online-movable", timeout=60, sh=f"for b in $({DIMM_BLOCKS}); do echo online_movable "
                                              f"> {MEM}/memory$b/state || exit 1; done && "
                                              f"sleep {FAULT_SETTLE_SECONDS}"),
        Step("offline", sh=f"for b in $({DIMM_BLOCKS}); do echo offline > {MEM}/memory$b/state "
                           f"|| exit 1; done"),
        Step("widen-movable", timeout=60, sh=_module_action(
            f"widen-movable $(printf %x $((({{dimm_addr}} + {DIMM_SIZE}) / 4096)))")),
        Step("device-del", qmp=("device_del", {"id": "dimm0"}),
             until=f"[ ! -e {MEM}/memory$(({{dimm_addr}} / {BLOCK_SIZE})) ]"),
        # dax/kmem's deliberate pin, which is no leak: its memory online, the driver unbound;
        # remove_memory fails (-EBUSY) and kmem keeps the range until the next reboot
        Step("kmem-online", timeout=180, sh=f"{PMEM_MODULES} && ndctl create-namespace -f -e "
                                            f"namespace0.0 -m devdax && daxctl reconfigure-device "
                                            f"--mode=system-ram dax0.0"),
        Step("kmem-unbind", timeout=60, sh=f"echo dax0.0 > /sys/bus/dax/drivers/kmem/unbind && "
                                           f"sleep {FAULT_SETTLE_SECONDS} && "
                                           f"dmesg | grep 'cannot be hotremoved' | tail -1"),
        Step("settle", sh=f"sleep {FAULT_SETTLE_SECONDS}", timeout=60),
    ], alone=True, makes=frozenset({"pagemap_leak", "device_range_release", "unbalanced_remove",
                                    "resource_leak", "zone_span_leak"})),
    Scenario("device-private", "HMM: device-private memory as a GPU driver makes it (the lab's "
                               "memhp_gpu module; kernels with CONFIG_DEVICE_PRIVATE): a pagemap "
                               "over a free region at the top of the physical address space, torn "
                               "down cleanly; then a region claimed where a DIMM is plugged next "
                               "(its hot-add fails), a pagemap past the CPU's address bits, and "
                               "the claimed range released as System RAM, its pagemap left "
                               "without its region", [
        Step("prepare", sh=f"{OFFLINE_POLICY} && insmod {{gpu_module}} && "
                           f"grep -m1 'address sizes' /proc/cpuinfo"),
        Step("map", sh=_module_action("map", "memhp_gpu"), timeout=60),
        Step("unmap", sh=_module_action("unmap", "memhp_gpu"), timeout=60),
        Step("claim", sh=_module_action(f"claim {PRIVATE_CLAIM_ADDR:x}", "memhp_gpu"), timeout=60),
        Step("object-add", qmp=("object-add", {"qom-type": "memory-backend-ram", "id": "dimm3mem",
                                               "size": PRIVATE_DIMM_SIZE})),
        # never unplugged, as in the conflict scenario; the kernel says why the add failed
        Step("device-add", qmp=("device_add", {"driver": "pc-dimm", "id": "dimm3",
                                               "memdev": "dimm3mem", "addr": PRIVATE_CLAIM_ADDR}),
             until="dmesg | grep -q 'Unaddressable device memhp_gpu'"),
        Step("past-bits", sh=_module_action("past-bits", "memhp_gpu"), timeout=60),
        # the claimed chunk, away from the top, where the fault module takes its ranges
        Step("release-as-ram", sh=_module_action("release-as-ram", "memhp_gpu"), timeout=60),
    ], alone=True, makes=frozenset({"device_private_conflict", "device_range_release",
                                    "pagemap_leak"})),
    Scenario("selftest", "a certain offline and online failure (memory notifier error injection), "
                         "then the kernel's own tools/testing/selftests/memory-hotplug/"
                         "mem-on-off-test.sh (from Debian's linux-source)", [
        # an offline refused as users of daxctl see it ("Device or resource busy"): boot
        # Movable's blocks from the top down until one holds a page that will not isolate
        # (memblock allocates top-down; its pages are reserved, unmovable even in Movable). One
        # that goes offline is onlined again. The kernel's own dump_page lines are printed.
        Step("offline-busy", save="busy_block", timeout=300, sh=(
            f"for b in $({MOVABLE_BLOCKS} | sort -rn); do "
            f"if err=$({{ echo offline > {MEM}/memory$b/state; }} 2>&1); then "
            f"echo online_movable > {MEM}/memory$b/state || exit 1; "
            f"elif echo \"$err\" | grep -q 'busy'; then "
            f"dmesg | grep -A4 'pfn:' | tail -5; echo $b; exit 0; fi; done; "
            f"echo 'every Movable block went offline' >&2; exit 1")),
        # the selftest's own injection phase picks 2% of the blocks at random and may make no
        # hotplug call at all: these two steps fail one offline and one online for certain
        Step("offline-fails", save="offline_failed", sh=(
            # a Movable block that goes offline and back first: one holding an unmovable page
            # fails isolation with -EBUSY before the notifier is asked (offline_pages)
            f"{INJECT} && b=$(" + _offline_one(MOVABLE_BLOCKS) + ") && "
            f"echo online_movable > {MEM}/memory$b/state && "
            f"echo {INJECTED_ERRNO} > {INJECT_DIR}/MEM_GOING_OFFLINE/error && "
            f"if echo offline > {MEM}/memory$b/state; then echo 'offline went through' >&2; exit 1; fi; "
            f"echo 0 > {INJECT_DIR}/MEM_GOING_OFFLINE/error && echo $b")),
        Step("online-fails", save="online_failed", sh=(
            # any Movable block that will go offline (some hold a reserved page and never do)
            "b=$(" + _offline_one(MOVABLE_BLOCKS) + ") && "
            f"echo {INJECTED_ERRNO} > {INJECT_DIR}/MEM_GOING_ONLINE/error && "
            f"if echo online_movable > {MEM}/memory$b/state; then echo 'online went through' >&2; exit 1; fi; "
            f"echo 0 > {INJECT_DIR}/MEM_GOING_ONLINE/error && "
            f"echo online_movable > {MEM}/memory$b/state && echo $b")),
        # copied into the results directory so the run is self-contained
        Step("mem-on-off-test", timeout=600, sh=(
            "cp -r {selftests}/memory-hotplug {results}/ && "
            "{ mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug; } && "
            "bash {results}/memory-hotplug/mem-on-off-test.sh")),
    ]),
]}

# The scenarios that take no hotplug path of the README's fidelity table (lab/fidelity.py) of
# their own: it names them in one column
PATHLESS = ("stress", "selftest", "conflict", "faults")
# The scenarios of one boot that take every path all four kernels have (dax/kmem, fsdax and
# devdax, ACPI DIMM, virtio-mem, sysfs offline/online)
PATHS = [name for name in default_scenarios() if name not in PATHLESS]


def run_scenario(guest, scenario, say=None):
    """Run every step of one scenario; returns the step records (also appended to steps.jsonl)."""
    say = say or guest.say
    records = []
    series = ".".join(guest.release.split(".")[:2])
    saved = {"results": guest.results, "selftests": os.path.join(kernels.CACHE, "selftests", series)}
    for key, module in (("faults_module", "memhp_faults"), ("gpu_module", "memhp_gpu")):
        if any("{" + key + "}" in (step.sh or "") for step in scenario.steps):
            saved[key] = kernels.lab_module(module, guest.release)
    _record(guest, {"scenario": scenario.name, "index": 0, "step": "start",
                    "capture": f"captures/{scenario.name}/00-start",
                    "capture_ns": guest.capture(f"{scenario.name}/00-start")})
    for i, step in enumerate(scenario.steps, 1):
        say(f"[{scenario.name}] {i}/{len(scenario.steps)} {step.name}")
        began = time.monotonic()
        rec = {"scenario": scenario.name, "index": i, "step": step.name}
        if step.qmp:
            command, args = step.qmp
            rec.update(qmp=[command, args], qmp_return=guest.qmp.execute(command, **args))
            if command == "device_add" and args.get("driver") == "pc-dimm":
                saved["dimm_addr"] = rec["dimm_addr"] = _dimm_addr(guest, args["id"])
        if step.sh:
            sh = _fill(step.sh, saved)
            res = guest.sh(sh, timeout=step.timeout, check=False)
            rec.update(command=sh, rc=res["rc"], out=res["out"], err=res["err"])
            if res["rc"] != step.expect_rc:
                _record(guest, rec)
                raise LabError(f"[{scenario.name}] step {step.name} exited {res['rc']} "
                               f"(expected {step.expect_rc}): {sh}\n{res['err'][-2000:]}")
            if step.save:
                lines = res["out"].strip().splitlines()
                if not lines:
                    raise LabError(f"[{scenario.name}] step {step.name} printed nothing to save")
                saved[step.save] = lines[-1].strip()
                rec["saved"] = {step.save: saved[step.save]}
        if step.until:
            until = _fill(step.until, saved)
            deadline = time.monotonic() + step.timeout
            while guest.sh(until, check=False)["rc"] != 0:
                if time.monotonic() > deadline:
                    raise LabError(f"[{scenario.name}] {step.name}: '{step.until}' still false "
                                   f"after {step.timeout} s")
                time.sleep(1)
        rec["seconds"] = round(time.monotonic() - began, 2)
        rec["capture"] = f"captures/{scenario.name}/{i:02d}-{step.name}"
        # events of this step: after the previous capture's ns, up to this one
        rec["capture_ns"] = guest.capture(f"{scenario.name}/{i:02d}-{step.name}")
        _record(guest, rec)
        records.append(rec)
    return records


def _fill(text, saved):
    """{name} -> a value an earlier step saved; shell's own ${...} is left alone."""
    return re.sub(r"\{(\w+)\}", lambda m: saved.get(m.group(1), m.group(0)), text)


def _dimm_addr(guest, dimm_id):
    """The guest-physical address QEMU gave a pc-dimm (decimal), from query-memory-devices."""
    for dev in guest.qmp.execute("query-memory-devices"):
        if dev.get("data", {}).get("id") == dimm_id:
            return str(dev["data"]["addr"])
    raise LabError(f"QEMU reports no memory device {dimm_id}")


def _record(guest, rec):
    with open(os.path.join(guest.results, "steps.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
