"""The BTF reader on this host's real kernel BTF, and on broken copies of it."""

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
