"""The live source reads again only the memory blocks that uevents named: on a copy of the host
capture changed by hand (a block offlined, one removed, one added), its reads are checked
against a full read of the same tree."""

import shutil

from observer import snapshot
from observer.sources import live
from observer.sources.live import LiveSource
from observer.uevents import HandedUevents

MEM = "sys/devices/system/memory"


def change(root):
    """Block 199 offline, block 198 removed, block 300 added (a copy of 197, online): the
    uevents the kernel would send, in order."""
    (root / MEM / "memory199" / "state").write_text("offline\n")
    (root / MEM / "memory199" / "valid_zones").write_text("Normal Movable\n")
    shutil.rmtree(root / MEM / "memory198")
    shutil.copytree(root / MEM / "memory197", root / MEM / "memory300", symlinks=True)
    (root / MEM / "memory300" / "phys_index").write_text(f"{300:08x}\n")
    return [("offline", 199), ("remove", 198), ("add", 300), ("online", 300)]


def test_a_read_rereads_the_blocks_uevents_named(host_copy):
    uevents = HandedUevents()
    source = LiveSource(root=str(host_copy), uevents=uevents)
    first = source.read_views().blocks
    said = change(host_copy)
    # no uevent yet: the blocks are those of the first read, not read again
    assert source.read_views().blocks.blocks is first.blocks
    for action, block in said:
        uevents.hand(action, block)
    assert source.read_views().blocks == snapshot.take(str(host_copy)).blocks != first
    # the uevents taken by the read are put out once, in order
    assert [(u["action"], u["block"]) for u in source.poll(0) if u["type"] == "uevent"] == said
    assert not [r for r in source.poll(0) if r["type"] == "uevent"]


def test_every_block_is_read_after_lost_uevents_and_now_and_then(host_copy, monkeypatch):
    uevents = HandedUevents()
    source = LiveSource(root=str(host_copy), uevents=uevents)
    first = source.read_views().blocks
    change(host_copy)
    uevents.overflowed = True       # the kernel dropped them
    assert source.read_views().blocks == snapshot.take(str(host_copy)).blocks != first
    assert not uevents.overflowed

    source = LiveSource(root=str(host_copy), uevents=HandedUevents())
    before = source.read_views().blocks
    (host_copy / MEM / "memory197" / "state").write_text("offline\n")   # and no uevent
    assert source.read_views().blocks == before
    monkeypatch.setattr(live, "FULL_READ_SECONDS", 0.0)
    assert source.read_views().blocks == snapshot.take(str(host_copy)).blocks != before


def test_without_uevents_every_read_is_whole(host_copy):
    source = LiveSource(root=str(host_copy))
    first = source.read_views().blocks
    change(host_copy)
    assert source.read_views().blocks == snapshot.take(str(host_copy)).blocks != first


class Calls:
    """The probes as the source asks them, a call returning when the test says (no BPF here:
    the kernel's side of this is the lab's, whose traces show no model_drift)."""

    def __init__(self):
        self.returned = 0

    def calls_begun(self):
        return self.returned

    def calls_returned(self):
        return self.returned

    def close(self):
        pass


def test_every_block_is_read_after_a_probed_call_returned(host_copy):
    # the call's uevent comes after it returns (milliseconds under TCG): a read in between
    # would take the blocks the uevent has yet to name as they were
    calls = Calls()
    source = LiveSource(root=str(host_copy), probes=calls, uevents=HandedUevents())
    first = source.read_views().blocks
    change(host_copy)
    assert source.read_views().blocks == first      # no call, no uevent: as they were
    calls.returned += 1
    assert source.read_views().blocks == snapshot.take(str(host_copy)).blocks != first


def test_a_block_whose_remove_uevent_came_is_gone_while_its_directory_lingers(host_copy):
    # the kernel sends `remove` once the block's files are gone, before its directory goes (a
    # 6.1 guest's fentry recorder read such a block: "memory59/phys_index: missing")
    uevents = HandedUevents()
    source = LiveSource(root=str(host_copy), uevents=uevents)
    source.read_views()
    for name in ("phys_index", "state", "valid_zones"):
        (host_copy / MEM / "memory198" / name).unlink()
    uevents.hand("offline", 198)
    uevents.hand("remove", 198)
    blocks = source.read_views().blocks
    assert blocks.block(198) is None and blocks.block(197) is not None
