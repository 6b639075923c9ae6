"""The probes' program compiled once and loaded without clang (image.py, bpfsys.py), on this
host: each program, loaded through bpf(2) from the image, is the one bcc loads (the kernel's
own tag of a program hashes its instructions, map fds left out), its maps are the ones bcc made
(the kernel's own account of each), and a cache that is corrupt or writable by others is not
loaded from. Attaching and events need kprobes: the lab's daemons run from the image
(test_lab.py)."""

import ctypes
import json
import os
import struct

import pytest

from observer.probes import bpfsys, image
from observer.probes.functions import ALL, ANNOTATIONS
from observer.probes.loader import Probes


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(the planned probes, the program text, bcc's object, the image kept in a cache)."""
    from bcc import BPF
    cache = str(tmp_path_factory.mktemp("cache"))
    p = Probes(cache=cache)
    p.plan()
    p.ringbuf = True        # where the kernel has none the image is never made
    text = p.text("kprobe")
    p._compile_kprobes()
    bpf = BPF(text=text)
    yield p, text, bpf, cache
    bpf.cleanup()


def _prog_tag(fd):
    # struct bpf_prog_info: type, id, tag[8]
    info = ctypes.create_string_buffer(16)
    bpfsys._bpf(bpfsys.BPF_OBJ_GET_INFO_BY_FD,
                struct.pack("=IIQ", fd, len(info), ctypes.addressof(info)))
    return info.raw[8:16]


def test_each_program_loaded_from_the_image_is_the_one_bcc_loads(compiled):
    from bcc import BPF
    p, text, bpf, cache = compiled
    kept = image.cached(cache, text)
    assert kept is not None and [os.path.join(cache, f) for f in os.listdir(cache)] == [image.path_of(cache, text)]
    loaded = image.Loaded(kept)
    try:
        names = sorted(kept.programs)
        assert names == sorted(f"{kind}_{i}" for i, fn in enumerate(p.functions)
                               if fn in p.shapes for kind in
                               (("enter",) if fn in ANNOTATIONS else ("enter", "leave")))
        for name in names:
            assert _prog_tag(loaded.program(name)) == _prog_tag(bpf.load_func(name.encode(),
                                                                               BPF.KPROBE).fd)
    finally:
        loaded.close()


def test_the_images_maps_are_the_ones_bcc_made(compiled):
    p, text, bpf, cache = compiled
    loaded = image.Loaded(image.cached(cache, text))
    try:
        for name, fd in loaded.map_fds.items():
            ours, bccs = bpfsys.map_info(fd), bpfsys.map_info(bpf[name.encode()].map_fd)
            assert [getattr(ours, f) for f, _ in bpfsys.MapInfo._fields_ if f != "id"] == \
                [getattr(bccs, f) for f, _ in bpfsys.MapInfo._fields_ if f != "id"], name
        assert {"counters", "inflight", "events", "kernel_addresses"} <= set(loaded.map_fds)
    finally:
        loaded.close()


def test_a_map_written_and_walked_through_bpf_syscalls(compiled):
    """What the daemon does with the calls in flight: a hash map's entries walked, read and
    deleted by key, on the image's own inflight map."""
    from observer.probes.program import Event
    p, text, bpf, cache = compiled
    loaded = image.Loaded(image.cached(cache, text))
    try:
        fd = loaded.map_fds["inflight"]
        for seq in (7, 9):
            ev = Event()
            ev.seq = seq
            bpfsys.map_update(fd, ctypes.c_uint64(seq * 100), ev)
        assert sorted((k.value, v.seq) for k, v in bpfsys.map_items(fd, ctypes.c_uint64, Event)) \
            == [(700, 7), (900, 9)]
        bpfsys.map_delete(fd, ctypes.c_uint64(700))
        bpfsys.map_delete(fd, ctypes.c_uint64(700))       # gone already: nothing to say
        assert [k.value for k, _ in bpfsys.map_items(fd, ctypes.c_uint64, Event)] == [900]
        assert not bpfsys.map_lookup(fd, ctypes.c_uint64(700), Event())
    finally:
        loaded.close()


def test_a_cache_file_that_is_corrupt_or_writable_by_others_is_compiled_over(compiled, capsys):
    p, text, bpf, cache = compiled
    path = image.path_of(cache, text)
    good = open(path).read()
    try:
        with open(path, "w") as f:
            f.write(good[:len(good) // 2])
        assert image.cached(cache, text) is None
        said = capsys.readouterr().err
        assert path in said and "compiling instead" in said
        with open(path, "w") as f:
            f.write(json.dumps({**json.loads(good), "format": 0}))
        assert image.cached(cache, text) is None
        assert "format 0" in capsys.readouterr().err
        with open(path, "w") as f:      # one kept for another text whose checksum is the same
            f.write(json.dumps({**json.loads(good), "for": "another program"}))
        assert image.cached(cache, text) is None
        assert "kept for another program or kernel build" in capsys.readouterr().err
        with open(path, "w") as f:
            f.write(good)
        os.chmod(path, 0o666)
        assert image.cached(cache, text) is None
        assert "writable by others" in capsys.readouterr().err
        os.chmod(path, 0o600)
        assert image.cached(cache, text) is not None
        assert image.cached(cache, text + " ") is None      # another text: not this image
    finally:
        with open(path, "w") as f:
            f.write(good)
        os.chmod(path, 0o600)


def test_an_unwritable_cache_costs_only_a_compile(tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder\n")
    p = Probes(cache=str(blocked))
    p.plan()
    p.ringbuf = True
    p._compile_kprobes()
    assert p._image is not None and str(blocked) in capsys.readouterr().err
    assert blocked.read_text() == "not a folder\n"


def test_a_plan_kept_gives_the_same_program_and_status(tmp_path):
    """A start that finds the plan kept for this kernel build reads neither BTF nor kallsyms:
    what it has is what planning gives."""
    made, kept = Probes(cache=str(tmp_path)), Probes(cache=str(tmp_path))
    made._plan_kept_or_made()
    kept._plan_kept_or_made()
    assert kept.variables is None and made.variables is not None   # kept: read after attach
    assert kept.text("kprobe") == made.text("kprobe")
    assert {fn: st._asdict() for fn, st in kept.status.items()} == \
        {fn: st._asdict() for fn, st in made.status.items()}
    # another code (a probe source changed): planned again
    other = image.plan_identity(ALL[:3], "auto")
    assert image.cached_plan(str(tmp_path), other) is None


def test_a_plan_from_another_kallsyms_is_neither_kept_nor_taken(tmp_path):
    copy = tmp_path / "kallsyms"
    copy.write_bytes(open("/proc/kallsyms", "rb").read())
    cache = tmp_path / "cache"
    cache.mkdir()
    Probes(cache=str(cache), kallsyms=str(copy))._plan_kept_or_made()
    assert os.listdir(cache) == []
    Probes(cache=str(cache))._plan_kept_or_made()
    other = Probes(cache=str(cache), kallsyms=str(copy))
    other._plan_kept_or_made()
    assert other.variables is not None      # planned from its own kallsyms, not the kept plan
