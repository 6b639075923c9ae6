"""snapshot and check end to end, as a user runs them: the installed console script."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import HOST, edit

# the console script installed beside the interpreter running the tests (the venv's bin/)
EXE = os.path.join(os.path.dirname(sys.executable), "memhp-observer")


def cli(*args):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120)


def test_snapshot_text_and_json_agree():
    text, doc = cli("snapshot", "--root", HOST), cli("snapshot", "--root", HOST, "--json")
    assert text.returncode == doc.returncode == 0
    d = json.loads(doc.stdout)
    assert (d["format"], d["version"], d["block_size"]) == ("memhp-snapshot", 1, 128 << 20)
    normal = [z for z in d["zones"] if z["zone"] == "Normal"][0]
    assert normal["end_pfn"] == normal["start_pfn"] + normal["spanned_pages"]
    assert [(r["state"], r["zone"], r["first_block"], r["last_block"]) for r in d["memory_blocks"]] \
        == [("online", "none", 0, 0), ("online", "DMA32", 1, 23), ("online", "Normal", 32, 199)]
    assert d["summary"]["blocks"] == 192 and d["summary"]["blocks_by_state"] == {"online": 192}
    assert {r["type"] for r in d["resources"]} == {"system_ram", "reserved"}
    for r in d["memory_blocks"]:
        assert f"{r['start']:#018x}-{r['end']:#018x}" in text.stdout
    assert text.stdout.rstrip().splitlines()[-1].startswith("summary: 1 node(s), 3 populated zone(s); 192")


def test_snapshot_says_when_iomem_is_hidden(host_copy):
    shutil.copy(host_copy / "proc/iomem.unprivileged", host_copy / "proc/iomem")
    out = cli("snapshot", "--root", str(host_copy))
    assert out.returncode == 0 and "CAP_SYS_ADMIN" in out.stdout
    assert json.loads(cli("snapshot", "--root", str(host_copy), "--json").stdout)["resources"] is None


def test_check_exit_codes(host_copy):
    clean = cli("check", "--root", HOST)
    assert (clean.returncode, clean.stdout.splitlines()[-1]) == \
        (0, "clean: 5 zones, 192 memory blocks and /proc/iomem checked")
    (host_copy / "sys/devices/system/memory/memory199/state").write_text("offline\n")
    leak = cli("check", "--root", str(host_copy), "--json")
    assert leak.returncode == 1
    [a] = json.loads(leak.stdout)["anomalies"]
    assert (a["kind"], a["severity"], a["zone"]) == ("zone_span_leak", "critical", "Normal")
    assert set(a) >= {"kind", "severity", "ts_ns", "node", "zone", "start_pfn", "end_pfn",
                      "message", "evidence"}


def test_check_warning_only_exits_0(host_copy):
    edit(host_copy, "/proc/iomem", "100000000-63fffffff : System RAM",
         "100000000-5fbffffff : System RAM\n5fc000000-63fffffff : System RAM (kmem)")
    out = cli("check", "--root", str(host_copy))
    assert out.returncode == 0 and out.stdout.startswith("warning  unaligned_operation")


def test_unreadable_input_is_one_line_and_exit_2(host_copy, tmp_path):
    edit(host_copy, "/proc/zoneinfo", "spanned  4095", "spanned  40x5")
    line = (host_copy / "proc/zoneinfo").read_text().splitlines().index("        spanned  40x5") + 1
    for verb in ("snapshot", "check"):
        out = cli(verb, "--root", str(host_copy))
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.count("\n") == 1 and f"proc/zoneinfo:{line}: spanned is not a number" in out.stderr
    shutil.copy(host_copy / "proc/iomem.unprivileged", host_copy / "proc/iomem")
    edit(host_copy, "/proc/zoneinfo", "spanned  40x5", "spanned  4095")
    out = cli("check", "--root", str(host_copy))
    assert out.returncode == 2 and "CAP_SYS_ADMIN" in out.stderr
    out = cli("check", "--root", str(tmp_path / "nothing"))
    assert out.returncode == 2 and "proc/zoneinfo: missing" in out.stderr and "Traceback" not in out.stderr


def test_ten_thousand_blocks(host_10k):
    snap = json.loads(cli("snapshot", "--root", host_10k, "--json").stdout)
    assert snap["summary"]["blocks"] == 10_000
    assert snap["memory_blocks"][-1]["last_block"] == 10_000 + 8 - 1  # the PCI hole's 8 blocks
    out = cli("check", "--root", host_10k)
    assert out.returncode == 0, out.stdout


# a kernel without BTF (CONFIG_DEBUG_INFO_BTF off): /sys/kernel/btf/vmlinux is absent
NO_BTF = ("import sys; from observer.probes import btf; "
          "btf.Btf.load = classmethod(lambda cls, path=btf.BTF_PATH: (_ for _ in ()).throw("
          "btf.BtfError(path + ': No such file or directory'))); "
          "from observer.cli import main; sys.exit(main(sys.argv[1:]))")


# a machine without the kernel's headers (no /lib/modules/RELEASE/build)
NO_HEADERS = ("import sys; from observer.probes import availability, loader; "
              "availability.headers_dir = loader.headers_dir = lambda: '/nonexistent/build'; "
              "from observer.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("patch, said", [
    (NO_HEADERS, "memhp-observer: BPF off: no kernel headers at /nonexistent/build: install "
                 "linux-headers-"),
    (NO_BTF, "memhp-observer: BPF off: no kernel BTF (/sys/kernel/btf/vmlinux: No such file or "
             "directory): probe shapes come from BTF: procfs mode"),
])
def test_without_headers_or_btf_record_degrades_and_strict_refuses(tmp_path, patch, said):
    """Each missing capability is one line: procfs mode in the trace's header, or with --strict
    exit 1 and no file."""
    out = subprocess.run([sys.executable, "-c", patch, "record", "-o", str(tmp_path / "t.jsonl"),
                          "--duration", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr.splitlines()[0].startswith(said), out.stderr
    from observer.trace import read_trace
    assert next(read_trace(str(tmp_path / "t.jsonl")))["mode"] == "procfs"
    strict = subprocess.run([sys.executable, "-c", patch, "record", "--strict", "-o",
                             str(tmp_path / "s.jsonl"), "--duration", "1"],
                            capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1 and not (tmp_path / "s.jsonl").exists()
    [line] = strict.stderr.splitlines()
    assert line.startswith("memhp-observer record: --strict: ") and said.split(": ")[2] in line


@pytest.mark.parametrize("mode, said", [
    ("procfs", None),
    ("auto", "BPF off: no kernel BTF (/sys/kernel/btf/vmlinux: No such file or directory)"),
])
def test_record_without_btf_records_the_views(tmp_path, mode, said):
    out = subprocess.run([sys.executable, "-c", NO_BTF, "record", "-o", str(tmp_path / "t.jsonl"),
                          "--duration", "1", "--mode", mode], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert (said in out.stderr) if said else ("BTF" not in out.stderr)
    from observer.trace import read_trace
    records = list(read_trace(str(tmp_path / "t.jsonl")))
    assert records[0]["mode"] == "procfs" and [r["type"] for r in records[1:]] == ["snapshot", "snapshot"]
