"""The bad-input campaign: corrupted trees generated from real captures (tests/corrupt.py) go
through every verb under a time bound. Zero tracebacks, zero hangs, no file of the input
changed or deleted, and input no kernel could write is an error (exit 2, one line naming the
file), never a verdict. Then the faults a user meets outside the views: unprivileged runs,
outputs that exist or cannot be written, a daemon whose reconcile hangs."""

import collections
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import corrupt
from conftest import FIXTURES, HOST

EXE = os.path.join(os.path.dirname(sys.executable), "memhp-observer")
HARNESS = os.path.join(os.path.dirname(__file__), "bad_input_harness.py")
SOURCES = {"host-6.18": HOST,
           "lab-6.12-kmem-online": os.path.join(FIXTURES, "lab-6.12/kmem/04-online"),
           "lab-6.1-dimm-movable": os.path.join(FIXTURES, "lab-6.1/dimm/05-online-movable")}
TIME_BOUND = 10           # seconds per verb and input
MEMORY_BOUND = 3 << 30    # the harness's address space: a view read whole would hit it
VERBS = {"snapshot": ["snapshot"], "snapshot --json": ["snapshot", "--json"], "check": ["check"],
         "check --json": ["check", "--json"], "capture": ["capture"], "record": ["record"],
         "run (reconcile)": None}
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def fingerprint(root):
    """Every entry under root with its type, size and mtime, links not followed."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def build_trees(top):
    """{tree id: (source, family, name, expect, path)} for every variant of every source."""
    trees = {}
    for source, src in SOURCES.items():
        for n, (family, name, expect, mutate) in enumerate(corrupt.variants(seed=len(trees))):
            tid = f"{source}/{n:03d}"
            path = os.path.join(top, source, f"{n:03d}")
            shutil.copytree(src, path, symlinks=True, ignore=shutil.ignore_patterns("dmesg.txt"))
            mutate(path)
            trees[tid] = (source, family, name, expect, path)
    return trees


def jobs_for(tid, path, scratch):
    out = []
    for verb, argv in VERBS.items():
        job = {"id": f"{tid}|{verb}"}
        if argv is None:
            job["daemon"] = path
        elif verb == "capture":
            job["argv"] = ["capture", "--root", path, "-o", os.path.join(scratch, tid, "capture")]
        elif verb == "record":
            job["argv"] = ["record", "--root", path, "--mode", "procfs", "--duration", "0.1",
                           "--snapshot-interval", "0.1", "-o", os.path.join(scratch, tid, "trace.jsonl")]
        else:
            job["argv"] = argv + ["--root", path]
        out.append(job)
    os.makedirs(os.path.join(scratch, tid))
    return out


class Harness:
    """One harness process, fed one job at a time. A job whose result does not come back within
    the time bound plus a margin (the alarm did not get through) is a hang: the process is
    killed and a fresh one takes the next job."""

    def __init__(self):
        self.proc = None

    def run(self, job):
        if self.proc is None:
            self.proc = subprocess.Popen([sys.executable, HARNESS, str(TIME_BOUND), str(MEMORY_BOUND)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True,
                                         cwd=os.path.dirname(HARNESS))
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], TIME_BOUND + 20)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            return {"id": job["id"], "outcome": "hang", "text": "the time bound did not stop it"}
        return json.loads(line)

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def run_harness(jobs):
    """Run the jobs in two harness processes (two cores); {job id: result}."""
    from concurrent.futures import ThreadPoolExecutor

    def work(share):
        harness = Harness()
        try:
            return [harness.run(j) for j in share]
        finally:
            harness.close()
    with ThreadPoolExecutor(2) as pool:
        return {r["id"]: r for share in pool.map(work, [jobs[0::2], jobs[1::2]]) for r in share}


def duplicate_series(exposition):
    seen, dups = set(), []
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            if key in seen:
                dups.append(key)
            seen.add(key)
    return dups


def judge(verb, expect, path, scratch_dir, r):
    """What is wrong with one result, or None."""
    if r["outcome"] != "exit":
        return f"{r['outcome']}: {r.get('text', '')[-600:]}"
    if verb == "run (reconcile)":
        if duplicate_series(r["exposition"]):
            return f"the same series twice: {duplicate_series(r['exposition'])[:3]}"
        if expect == "error" and (r["reconcile_errors"], r["anomalies"]) != (1, []):
            return f"judged input no kernel writes: {r['reconcile_errors']} errors, {r['anomalies']}"
        return None
    code, err = r["code"], r["stderr"]
    if code not in (0, 1, 2) or "Traceback" in err:
        return f"exit {code}: {err[-600:]}"
    if code == 2 and (len(err.strip().splitlines()) != 1 or path not in err or len(err) > 400):
        return f"exit 2 without one short line naming the input: {err[:600]!r}"
    if expect == "error" and verb != "capture" and code != 2:
        return f"exit {code} on input no kernel writes: {r['stdout'][-300:]}"
    if verb == "capture":
        made = os.path.isdir(os.path.join(scratch_dir, "capture"))
        if made != (code == 0) or [n for n in os.listdir(scratch_dir) if n.startswith(".memhp")]:
            return f"capture exit {code}, output {'made' if made else 'absent'}: {os.listdir(scratch_dir)}"
    if verb == "record" and code != 0 and os.path.exists(os.path.join(scratch_dir, "trace.jsonl")):
        return f"record exit {code} left a trace"
    return None


@pytest.fixture
def scratch_dir(tmp_path):
    """A directory in RAM where there is one: ~1000 small files per host tree, and this disk
    takes 0.3 s of system time to copy them (0.03 s on tmpfs)."""
    if not os.path.isdir("/dev/shm"):
        yield str(tmp_path)
        return
    top = tempfile.mkdtemp(prefix="memhp-campaign-", dir="/dev/shm")
    try:
        yield top
    finally:
        shutil.rmtree(top)


def test_campaign_on_corrupted_trees(scratch_dir):
    trees = build_trees(os.path.join(scratch_dir, "trees"))
    prints = {tid: fingerprint(t[4]) for tid, t in trees.items()}
    scratch = os.path.join(scratch_dir, "out")
    jobs = [j for tid, t in trees.items() for j in jobs_for(tid, t[4], scratch)]
    results = run_harness(jobs)
    assert len(results) == len(jobs)

    failures, counts = [], collections.Counter()
    for tid, (source, family, name, expect, path) in trees.items():
        for verb in VERBS:
            r = results[f"{tid}|{verb}"]
            wrong = judge(verb, expect, path, os.path.join(scratch, tid), r)
            outcome = r["outcome"] if r["outcome"] != "exit" else (
                f"exit {r['code']}" if verb != "run (reconcile)" else
                "reconcile error" if r["reconcile_errors"] else "reconciled")
            counts[verb, outcome] += 1
            if wrong:
                failures.append(f"{source} {family} {name!r} {verb}: {wrong[:300]}")
        if fingerprint(path) != prints[tid]:
            failures.append(f"{source} {family} {name!r}: the input tree changed")
    print(f"\n{len(trees)} corrupted trees from {len(SOURCES)} captures, {len(jobs)} runs:")
    for (verb, outcome), n in sorted(counts.items()):
        print(f"  {verb:<16} {outcome:<16} {n}")
    assert not failures, "\n".join(failures[:60])


# --- end to end through the console script -------------------------------------------------

def cli(*args, **kw):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=60, **kw)


def public_tree():
    """A temporary directory that nobody (uid 65534) can enter; pytest's own is root's only."""
    top = tempfile.mkdtemp(prefix="memhp-badinput-")
    os.chmod(top, 0o755)
    return top


@pytest.fixture
def public_copy():
    top = public_tree()
    root = os.path.join(top, "root")
    shutil.copytree(HOST, root, symlinks=True)
    yield root
    shutil.rmtree(top)


@pytest.mark.parametrize("family", sorted({v[0] for v in corrupt.variants() if v[2] == "error"}))
def test_first_of_each_family_through_the_console_script(tmp_path, family):
    _, name, expect, mutate = next(v for v in corrupt.variants() if v[0] == family and v[2] == "error")
    root = str(tmp_path / "root")
    shutil.copytree(HOST, root, symlinks=True)
    mutate(root)
    for verb in ("snapshot", "check"):
        out = cli(verb, "--root", root)
        assert (out.returncode, out.stdout) == (2, ""), (name, out)
        assert len(out.stderr.splitlines()) == 1 and root in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("where", ["zoneinfo", "block directory", "node directory"])
def test_unreadable_views_as_nobody(public_copy, where):
    root = public_copy
    if where == "zoneinfo":
        os.chmod(os.path.join(root, "proc/zoneinfo"), 0)
    elif where == "block directory":
        os.chmod(os.path.join(root, corrupt.MEM, "memory5"), 0)
    else:   # a capture with node*/memoryN instead of each block's nodeN link
        for b in corrupt.blocks(root):
            os.unlink(os.path.join(root, corrupt.MEM, f"memory{b}", "node0"))
        node = os.path.join(root, "sys/devices/system/node/node0")
        os.makedirs(node)
        os.chmod(node, 0)
    for verb in ("snapshot", "check"):
        out = subprocess.run(NOBODY + [EXE, verb, "--root", root], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and "permission denied" in out.stderr.lower()
        assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr


def test_without_privileges_each_verb_says_what_is_missing(tmp_path):
    top = public_tree()
    os.chown(top, 65534, 65534)   # nobody may write here: only the privilege is missing
    try:
        probes = subprocess.run(NOBODY + [EXE, "probes"], capture_output=True, text=True, timeout=60)
        assert probes.returncode == 1 and probes.stderr.count("\n") == 1
        assert "CAP_SYS_ADMIN" in probes.stderr and "Traceback" not in probes.stderr
        rec = subprocess.run(NOBODY + [EXE, "record", "-o", f"{top}/t.jsonl", "--mode", "bpf",
                                       "--duration", "1"], capture_output=True, text=True, timeout=60)
        assert rec.returncode == 1 and "CAP_SYS_ADMIN" in rec.stderr and not os.listdir(top)
        cap = subprocess.run(NOBODY + [EXE, "capture", "-o", f"{top}/cap"], capture_output=True,
                             text=True, timeout=60)
        assert cap.returncode == 2 and "CAP_SYS_ADMIN" in cap.stderr and not os.listdir(top)
        denied = subprocess.run(NOBODY + [EXE, "capture", "-o", str(tmp_path / "cap"), "--root", HOST],
                                capture_output=True, text=True, timeout=60)
        assert denied.returncode == 1 and "Permission denied" in denied.stderr
        unwritable = subprocess.run(NOBODY + [EXE, "record", "-o", str(tmp_path / "t.jsonl"),
                                              "--mode", "procfs", "--duration", "1"],
                                    capture_output=True, text=True, timeout=60)
        assert unwritable.returncode == 1 and unwritable.stderr.count("\n") == 1
        assert f"{tmp_path}/t.jsonl: Permission denied" in unwritable.stderr
        assert "Traceback" not in cap.stderr + denied.stderr + unwritable.stderr
    finally:
        shutil.rmtree(top)


# --- outputs: never over a user's files -----------------------------------------------------

def user_files(top):
    os.makedirs(os.path.join(top, "notes"), exist_ok=True)
    for rel in ("README", "notes/today.txt"):
        with open(os.path.join(top, rel), "w") as f:
            f.write(f"the user's {rel}\n")
    return fingerprint(top)


def test_capture_never_deletes_what_it_did_not_write(tmp_path):
    mine = str(tmp_path / "mine")
    before = user_files(mine)
    onto = cli("capture", "-o", mine, "--root", HOST)
    replace = cli("capture", "-o", mine, "--replace", "--root", HOST)
    here = cli("capture", "-o", ".", "--root", HOST, cwd=mine)
    assert [r.returncode for r in (onto, replace, here)] == [1, 1, 1]
    assert "README is not a capture's" in onto.stderr and fingerprint(mine) == before
    # onto the tree it reads, or a directory holding it
    src = str(tmp_path / "src")
    shutil.copytree(HOST, src, symlinks=True)
    tree = fingerprint(src)
    for out, root in ((src, src), (str(tmp_path), src)):
        r = cli("capture", "-o", out, "--root", root, "--replace")
        assert r.returncode == 1 and "refusing to capture into the tree it reads" in r.stderr
    assert fingerprint(src) == tree
    # a failed capture leaves an earlier one as it was; --replace replaces only a capture
    earlier = str(tmp_path / "earlier")
    assert cli("capture", "-o", earlier, "--root", HOST).returncode == 0
    kept = fingerprint(earlier)
    failed = cli("capture", "-o", earlier, "--replace", "--root", str(tmp_path / "nothing"))
    assert failed.returncode == 2 and fingerprint(earlier) == kept
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".memhp")]
    again = cli("capture", "-o", earlier, "--replace", "--root", src)
    assert again.returncode == 0 and set(fingerprint(earlier)) == set(kept)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("capture", "-o", ".", "--root", HOST, cwd=empty).returncode == 0
    assert set(fingerprint(str(empty))) == set(kept)


def test_record_never_writes_over_a_file_and_says_why_it_cannot_write(tmp_path):
    existing = tmp_path / "trace.jsonl"
    existing.write_text("the user's trace\n")
    for out, said in ((str(existing), "exists; record writes a new file"),
                      ("/dev/full", "exists"), ("/proc/version", "exists"),
                      (str(tmp_path / "missing/t.jsonl"), "No such file or directory"),
                      (str(existing / "t.jsonl"), "Not a directory")):
        r = cli("record", "-o", out, "--mode", "procfs", "--duration", "0.2")
        assert (r.returncode, r.stderr.count("\n")) == (1, 1) and said in r.stderr, (out, r.stderr)
        assert "Traceback" not in r.stderr
    assert existing.read_text() == "the user's trace\n"
    # a disk that fills while recording: the lines written so far stay, one line says why
    import resource
    full = tmp_path / "full.jsonl"
    r = subprocess.run([EXE, "record", "-o", str(full), "--mode", "procfs", "--duration", "2",
                        "--snapshot-interval", "0.1"], capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (10000, 10000)))
    assert r.returncode == 1 and "File too large after" in r.stderr and "Traceback" not in r.stderr
    from observer.trace import read_trace
    assert [x["type"] for x in read_trace(str(full))][:2] == ["header", "snapshot"]


# --- the daemon under faults -----------------------------------------------------------------

# the daemon with one fault injected: a reconcile that never returns once HANG exists (a view
# that does not answer: a hung filesystem, which no captured tree can reproduce)
HUNG = ("import os, sys, threading, observer.daemon as d, observer.snapshot as s; "
        "d.STUCK_SECONDS = 1; take = s.take; "
        "s.take = lambda *a: threading.Event().wait() if os.path.exists(os.environ['HANG']) "
        "else take(*a); "
        "from observer.cli import main; sys.exit(main(sys.argv[1:]))")


def test_daemon_with_a_hung_reconcile_says_so_and_stops_on_sigterm(tmp_path):
    from test_daemon import Observer
    hang = tmp_path / "hang"
    env = dict(os.environ, HANG=str(hang))
    o = Observer("--reconcile-interval", "0.2", "--root", HOST,
                 argv0=[sys.executable, "-c", HUNG], env=env)
    assert o.samples()[("memhp_reconcile_running_seconds", ())] == 0
    hang.touch()
    deadline = time.monotonic() + 20
    while o.samples(o.scrape())[("memhp_reconcile_running_seconds", ())] < 1.5:
        assert time.monotonic() < deadline, "the hung reconcile never showed"
        time.sleep(0.2)
    began = time.monotonic()
    code, err = o.stop()
    assert code == 0 and time.monotonic() - began < 2
    assert "a reconcile has run for 1 s: a kernel view does not answer" in err


def test_daemon_keeps_serving_on_views_no_kernel_writes(tmp_path):
    from test_daemon import Observer
    root = tmp_path / "root"
    shutil.copytree(HOST, root, symlinks=True)
    o = Observer("--reconcile-interval", "0.2", "--root", str(root))
    (root / corrupt.BLOCK_SIZE).write_text("8\n")    # below a page: used to kill it (division by 0)
    deadline = time.monotonic() + 20
    while o.samples(o.scrape())[("memhp_reconcile_errors_total", ())] < 2:
        assert time.monotonic() < deadline and o.proc.poll() is None
        time.sleep(0.2)
    (root / corrupt.BLOCK_SIZE).write_text("8000000\n")
    errors = o.samples(o.scrape())[("memhp_reconcile_errors_total", ())]
    time.sleep(1)
    assert o.samples(o.scrape())[("memhp_reconcile_errors_total", ())] <= errors + 1
    code, err = o.stop()
    assert code == 0 and "block size 0x8 is not a power of two of at least 16 MiB" in err
    assert "Traceback" not in err


# --- missing pieces outside the views ---------------------------------------------------------

def test_a_missing_bcc_is_one_line():
    no_bcc = ("import sys; sys.modules['bcc'] = None; "   # import bcc now raises ImportError
              "from observer.cli import main; sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", no_bcc, "probes"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "bcc is not importable: install Debian's python3-bpfcc" in out.stderr


def test_an_installation_without_its_bpf_program_says_which_file(tmp_path):
    """The package copied without bpf/memhp.c beside it (nor under the venv's share/): the start
    fails on the file, and says so, not as a listener or probe failure."""
    shutil.copytree(os.path.join(os.path.dirname(__file__), "..", "observer"),
                    tmp_path / "observer", ignore=shutil.ignore_patterns("__pycache__"))
    run = ("import sys; from observer.cli import main; "
           "sys.exit(main(['run', '--mode', 'bpf', '--probe-method', 'kfunc', "
           "'--listen', '127.0.0.1:9']))")   # never reached
    out = subprocess.run([sys.executable, "-c", run], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    missing = os.path.join(sys.prefix, "share", "memhp-observer", "bpf", "memhp.c")
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert f"the probes' program {missing}: No such file or directory" in out.stderr


def test_a_qmp_failure_is_a_lab_error(tmp_path):
    from observer.lab import LabError
    from observer.lab.qmp import QMP
    with pytest.raises(LabError, match="no QMP socket at"):
        QMP(str(tmp_path / "qmp.sock"), timeout=0.3)


@pytest.mark.parametrize("args, said", [
    (["run", "--reconcile-interval", "nan"], "expected at least 0.1 seconds, got 'nan'"),
    (["run", "--reconcile-interval", "0"], "expected at least 0.1 seconds, got '0'"),
    (["run", "--reconcile-interval", "-1"], "expected at least 0.1 seconds, got '-1'"),
    (["run", "--reconcile-interval", "inf"], "expected at least 0.1 seconds, got 'inf'"),
    (["record", "-o", "/tmp/never.jsonl", "--duration", "nan"], "expected at least 0.1 seconds"),
    (["run", "--listen", "[::1:19511"], "expected [IPV6]:PORT, got '[::1:19511'"),
    (["run", "--listen", "::1:19511"], "an IPv6 address goes in brackets: [::1]:19511"),
    (["run", "--listen", "localhost:0"], "expected HOST:PORT, got 'localhost:0'"),
])
def test_bad_arguments_are_refused_before_anything_runs(args, said):
    out = cli(*args)
    assert out.returncode == 2 and said in out.stderr and "Traceback" not in out.stderr


def test_run_without_privileges_says_what_is_missing_and_serves_procfs():
    from test_daemon import free_port
    proc = subprocess.Popen(NOBODY + [EXE, "run", "--listen", f"127.0.0.1:{free_port()}"],
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    proc.terminate()
    _, rest = proc.communicate(timeout=30)
    assert line.strip() == ("memhp-observer: BPF off: probes need root: CAP_SYS_ADMIN, or CAP_BPF "
                            "with CAP_PERFMON, and this process has neither: procfs mode")
    assert proc.returncode == 0 and "Traceback" not in rest
