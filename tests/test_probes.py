"""The probe layer on this host: shapes from the real BTF, the generated program through bcc and
the kernel's verifier (loading a program needs no kprobes; attaching does), and the status this
host reports, and how a call whose return probe did not run is known to be over (its thread's
/proc files here). Events themselves are tested in the lab (test_lab.py)."""

import ctypes
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import FIXTURES
from observer.probes import program, threads
from observer.probes.btf import Btf
from observer.probes.functions import ALL, ANNOTATIONS, CORE
from observer.probes.loader import Probes
from observer.probes.shapes import layouts, shape_of

EXE = os.path.join(os.path.dirname(sys.executable), "memhp-observer")


@pytest.fixture(scope="module")
def planned():
    p = Probes()
    p.plan()
    return p


def test_shapes_name_the_arguments_the_decoder_needs():
    btf = Btf.load()
    roles = {fn: dict((r, pos) for pos, r in shape_of(btf, fn).roles) for fn in CORE}
    assert roles["arch_add_memory"] == {"nid": 1, "start": 2, "size": 3, "params": 4}
    assert roles["__remove_pages"] == {"start_pfn": 1, "nr_pages": 2}
    assert roles["release_mem_region_adjustable"] == {"start": 1, "size": 2}
    assert roles["devm_memremap_pages"] == {"pgmap": 2}
    assert shape_of(btf, "online_pages").role_position("zone") == 3
    lay = layouts(btf)
    assert lay.zone_names[btf.enum_values("zone_type")["ZONE_MOVABLE"]] == "Movable"
    assert lay.pgmap_has_range and lay.params_has_pgmap


def test_generated_program_passes_the_verifier(planned):
    from bcc import BPF
    b = BPF(text=planned.text("kprobe"))   # kfunc programs would attach (refused here) as they load
    try:
        for fn in planned.shapes:
            i = ALL.index(fn)
            # an annotation is an entry probe only: it writes into the call it annotates
            for name in (f"enter_{i}",) if fn in ANNOTATIONS else (f"enter_{i}", f"leave_{i}"):
                assert b.load_func(name.encode(), BPF.KPROBE).fd >= 0
    finally:
        b.cleanup()


def test_fentry_types_spelled_without_headers_are_as_wide_as_the_kernels(planned):
    """fentry programs declare each argument with BTF's type spelled to need no kernel header
    (Btf.plain_type_name): clang, given the headers, makes every one of the kernel's own types
    exactly as wide as its plain spelling, and the fentry program compiles with no header."""
    from bcc import BPF
    shapes = planned.shapes.values()
    pairs = sorted({pair for s in shapes for pair in zip([t for _, t in s.params],
                                                         [t for _, t in s.plain_params])} |
                   {(s.return_type, s.plain_return) for s in shapes if s.returns != "void"})
    fields = "".join(f"    {full} full_{i}; {plain} plain_{i};\n"
                     for i, (full, plain) in enumerate(pairs))
    b = BPF(text="".join(f"#include <linux/{h}.h>\n" for h in ("mmzone", "ioport", "memremap",
                                                                 "memory_hotplug")) +
            "struct widths {\n" + fields + "};\nBPF_ARRAY(widths, struct widths, 1);\n")
    try:
        leaf = b[b"widths"].Leaf
        for i, pair in enumerate(pairs):
            assert getattr(leaf, f"full_{i}").size == getattr(leaf, f"plain_{i}").size, pair
    finally:
        b.cleanup()

    class CompileOnly(BPF):      # attaching fentry is refused here
        def _trace_autoload(self):
            pass
    text = planned.text("kfunc")
    assert "#include <linux/mm" not in text
    CompileOnly(text=text).cleanup()


def test_event_layout_is_the_same_in_c_and_python(planned):
    # bcc builds a ctypes class for a map's value from clang's own layout of struct event
    from bcc import BPF
    b = BPF(text=planned.text("kprobe") + "\nBPF_ARRAY(layout_check, struct event, 1);\n")
    try:
        clang = b[b"layout_check"].Leaf
        assert ctypes.sizeof(clang) == ctypes.sizeof(program.Event)
        for name, _ in program.FIELDS:
            assert getattr(clang, name).offset == getattr(program.Event, name).offset, name
    finally:
        b.cleanup()


def test_probes_reports_what_this_kernel_allows():
    # what the kernel allows, read here from its own files: a kprobe PMU means kprobes attach
    kprobes = os.path.exists("/sys/bus/event_source/devices/kprobe")
    out = subprocess.run([EXE, "probes"], capture_output=True, text=True, timeout=120)
    lines = {l.split()[0]: l for l in out.stdout.splitlines()[1:]}
    assert set(lines) == set(ALL)
    if kprobes:
        assert out.returncode == 0
        assert all(" kprobe " in lines[fn] and " yes " in lines[fn] for fn in CORE)
    else:      # kprobes absent, then fentry tried for real (refused here with EPERM)
        assert out.returncode == 1
        for fn in CORE:
            assert "no kprobes in this kernel; fentry: " in lines[fn] and " none " in lines[fn]
    assert out.stderr == ""               # libbpf's own complaint is not repeated
    # what it would load here: fentry/fexit without kprobes, arguments named as BTF types them
    ebpf = subprocess.run([EXE, "probes", "--ebpf"], capture_output=True, text=True, timeout=120)
    assert ebpf.returncode == 0
    if not kprobes:
        # arch_add_memory(int nid, u64 start, u64 size, struct mhp_params *params), spelled to
        # need no kernel header
        head = "arch_add_memory, s32 nid, u64 start, u64 size, struct mhp_params *params"
        assert f"KFUNC_PROBE({head})" in ebpf.stdout
        assert f"KRETFUNC_PROBE({head}, s32 ret)" in ebpf.stdout


def test_a_function_left_only_as_compiler_clones_is_not_attached(tmp_path):
    # this host's kallsyms with online_pages as the compiler could have left it: only a .isra
    # and a .part copy, whose arguments need not be the prototype's
    with open("/proc/kallsyms") as f:
        text = f.read()
    assert " online_pages\n" in text
    derived = text.replace(" online_pages\n", " online_pages.isra.0\n", 1)
    derived += "ffffffff81000000 t online_pages.part.0\n"
    (tmp_path / "kallsyms").write_text(derived)
    status = Probes(kallsyms=str(tmp_path / "kallsyms")).plan()
    st = status["online_pages"]
    assert (st.present, st.method, st.symbol) == (False, "none", None)
    assert st.reason == ("only compiler clones in kallsyms (online_pages.isra.0, online_pages.part.0): "
                         "their arguments may differ from the prototype")
    assert status["offline_pages"].symbol == "offline_pages"   # the others by their own name


def test_a_thread_has_left_a_function_only_when_its_kernel_stack_or_its_end_says_so():
    """threads.left on real threads of this host: a child asleep in `sleep` is inside
    hrtimer_nanosleep (the frame its /proc stack shows) and not inside memremap_pages; this
    thread, running, may be inside anything; a thread begun after the call entered is not the
    one that entered it; and once the child is gone it is inside nothing."""
    child = subprocess.Popen(["sleep", "30"])
    entered = time.monotonic_ns()     # a call the child makes can only enter after it began
    try:
        deadline = time.monotonic() + 10
        while "hrtimer_nanosleep+" not in open(f"/proc/{child.pid}/stack").read():
            assert time.monotonic() < deadline, open(f"/proc/{child.pid}/stack").read()
            time.sleep(0.05)
        assert not threads.left(child.pid, "hrtimer_nanosleep", entered)
        assert threads.left(child.pid, "memremap_pages", entered)
        assert not threads.left(os.getpid(), "memremap_pages", entered)
        assert threads.left(child.pid, "hrtimer_nanosleep", entered - 10**9)
    finally:
        child.kill()
        child.wait()
    assert threads.left(child.pid, "hrtimer_nanosleep", entered)


def test_a_stack_says_a_thread_left_a_function_only_when_it_is_whole():
    """Stacks the lab's probes took at entry (the kernel's unwinder, as /proc/<tid>/stack
    has it). On 5.10 the unwinder stops at a kretprobe's trampoline, where the return address
    into the caller was: devm_memremap_pages, running while its probed callee memremap_pages
    runs, is not on that stack by name, and such a stack says nothing. On 6.1 it reaches the
    syscall entry: a function on it is inside, one not on it has been left."""
    def stacks(lab):
        with open(os.path.join(FIXTURES, lab, "trace.jsonl")) as f:
            return [[frame.split(" [")[0] for frame in r["stack"]] for r in map(json.loads, f)
                    if r.get("fn") == "memremap_pages" and r.get("caller") != "map_at"]
    for frames in stacks("lab-5.10"):
        assert "devm_memremap_pages" not in frames and frames[-1] == "kretprobe_trampoline"
        assert not threads.outside(frames, "devm_memremap_pages")
    for frames in stacks("lab-6.1"):
        assert frames[-1] == "entry_SYSCALL_64_after_hwframe"
        assert not threads.outside(frames, "devm_memremap_pages")
        assert threads.outside(frames, "online_pages")
