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
from observer.probes.functions import ALL, CORE
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
            for name in (f"enter_{i}", f"leave_{i}"):
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


def test_this_host_reports_every_function_unobserved_with_the_reason():
    out = subprocess.run([EXE, "probes"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1              # the core probes cannot attach here
    lines = {l.split()[0]: l for l in out.stdout.splitlines()[1:]}
    assert set(lines) == set(ALL)
    for fn in CORE:   # kprobes absent, then fentry tried for real and refused
        assert "no kprobes in this kernel; fentry: the kernel refuses fentry programs (EPERM)" \
            in lines[fn] and " none " in lines[fn]
    assert out.stderr == ""               # libbpf's own complaint is not repeated
    # what it would load here: fentry/fexit, arguments named as BTF types them
    ebpf = subprocess.run([EXE, "probes", "--ebpf"], capture_output=True, text=True, timeout=120)
    assert ebpf.returncode == 0
    assert "KFUNC_PROBE(arch_add_memory, int nid, u64 start, u64 size, struct mhp_params *params)" in ebpf.stdout
    assert "KRETFUNC_PROBE(arch_add_memory, int nid, u64 start, u64 size, struct mhp_params *params, int ret)" in ebpf.stdout
