"""The probe layer on this host: shapes from the real BTF, the generated program through bcc and
the kernel's verifier (loading a program needs no kprobes; attaching does), and the status this
host reports. Events themselves are tested in the lab (test_lab.py)."""

import ctypes
import os
import subprocess
import sys

import pytest

from observer.probes import program
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
        assert "KFUNC_PROBE(arch_add_memory, int nid, u64 start, u64 size, struct mhp_params *params)" in ebpf.stdout
        assert "KRETFUNC_PROBE(arch_add_memory, int nid, u64 start, u64 size, struct mhp_params *params, int ret)" in ebpf.stdout


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
