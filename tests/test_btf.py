"""The BTF reader on this host's real kernel BTF, and on broken copies of it; checked against
bpftool and pahole reading the same BTF."""

import re
import subprocess

import pytest

from observer.probes.btf import BTF_PATH, Btf, BtfError


@pytest.fixture(scope="module")
def btf():
    return Btf.load()


def test_hotplug_prototypes_have_their_parameter_names(btf):
    # 5.8+ shape (kernel-reference.md §1.1); names are what probe shapes are built from
    assert btf.func_params("arch_add_memory") == [
        ("nid", "int"), ("start", "u64"), ("size", "u64"), ("params", "struct mhp_params *")]
    assert btf.func_return("arch_add_memory") == "int"
    assert [n for n, _ in btf.func_params("remove_pfn_range_from_zone")] == ["zone", "start_pfn", "nr_pages"]
    assert btf.func_params("online_pages")[2] == ("zone", "struct zone *")
    assert btf.func_return("memunmap_pages") == "void"
    assert btf.func_params("no_such_function_here") is None


def test_enums_come_from_the_kernel(btf):
    zones = btf.enum_values("zone_type")
    assert zones["ZONE_DMA"] == 0 and zones["ZONE_NORMAL"] < zones["ZONE_MOVABLE"] < zones["__MAX_NR_ZONES"]
    types = btf.enum_values("memory_type")
    assert {"MEMORY_DEVICE_PRIVATE", "MEMORY_DEVICE_FS_DAX", "MEMORY_DEVICE_GENERIC"} <= set(types)
    assert btf.enum_values("no_such_enum") is None


def test_broken_btf_is_a_clear_error(tmp_path):
    with open(BTF_PATH, "rb") as f:
        data = f.read()
    with pytest.raises(BtfError, match="not BTF"):
        Btf(b"\0\0" + data[2:], "copy")
    with pytest.raises(BtfError, match="too short"):
        Btf(data[:10], "copy")
    with pytest.raises(BtfError, match="nothing: No such file"):
        Btf.load(str(tmp_path / "nothing"))


def test_forward_declared_unions_are_unions(btf):
    # bpftool names each forward declaration's kind (fwd_kind=union|struct)
    dump = subprocess.run(["bpftool", "btf", "dump", "file", BTF_PATH], capture_output=True,
                          text=True, timeout=120).stdout
    fwds = re.findall(r"^\[(\d+)\] FWD '(\w+)' fwd_kind=(\w+)$", dump, re.M)
    assert any(kind == "union" for _, _, kind in fwds)
    for tid, name, kind in fwds:
        assert btf.type_name(int(tid)) == f"{kind} {name}"


@pytest.mark.parametrize("struct", ["zone", "pglist_data", "dev_pagemap", "resource", "mhp_params"])
def test_member_offsets_are_paholes(btf, struct):
    out = subprocess.run(["pahole", "-C", struct, BTF_PATH], capture_output=True, text=True,
                         timeout=120).stdout
    members = re.findall(r"\b(\w+)(?:\[\d*\])?;\s+/\*\s+(\d+)\s+\d+\s+\*/", out)
    assert len(members) >= 3
    offsets = btf.struct_offsets(struct)
    for name, off in members:
        if name in offsets:          # pahole also lists the members of named inner structs
            assert offsets[name] == int(off), name
    assert btf.struct_size(struct) == int(re.search(r"/\* size: (\d+),", out).group(1))
