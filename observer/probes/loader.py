"""Compile the program for the running kernel (bcc, or the image kept from an earlier compile),
attach each watched function, and hand decoded events to the caller in call order.

Attach strategy (DESIGN.md §2): a kprobe+kretprobe pair per function where the kernel has
kprobes; else fentry/fexit (bcc's kfunc), tried for real since bcc's support_kfunc() says yes
on kernels that then refuse the load (EPERM, as on the dev host); else the functions are
unobserved, with the reason. A function missing from BTF or kallsyms (absent or inlined) is
unobserved and never stops the others; strict makes any unobserved core function fatal."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
import threading
import time
from collections import namedtuple

from .. import log
from . import bpfsys, image, program, threads
from .availability import has_atomic_fetch, has_kprobes, headers_dir, missing_privilege
from .btf import Btf, BtfError
from .decode import decode
from .functions import ALL, ANNOTATIONS, CORE
from .ksyms import Ksyms, find_symbols
from .order import CallOrder
from .pairing import Pairing
from .shapes import LayoutError, layouts as read_layouts, shape_of


class ProbeError(Exception):
    pass


ProbeStatus = namedtuple("ProbeStatus", [
    "function",
    "present",    # in BTF and kallsyms
    "shape",      # the prototype BTF gives, or None
    "method",     # "kprobe", "kfunc" or "none"
    "attached",
    "reason",     # why not attached
    "symbol",     # the kallsyms name attached: the function's own, never a clone
], defaults=("", None))


# clang's warnings about the kernel's own headers, nothing to act on: 6.12's asm/current.h gives
# __seg_gs twice, and 6.12's and 7.2's asm/ibt.h say nocf_check (ignored: BPF has no CET) — 25
# lines before the daemon's first at every start
CFLAGS = ["-Wno-duplicate-decl-specifier", "-Wno-ignored-attributes"]


@contextlib.contextmanager
def _stderr_kept_quiet():
    """Silence C-level writes to fd 2 (libbpf's own messages) for the duration."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _why(exc):
    """bcc's exception text, made one line; EPERM said plainly."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    if "super-user" in text or "not permitted" in text or "Permission denied" in text:
        return "the kernel refuses fentry programs (EPERM)"
    return text


# the BPF ring buffer's helper: a kernel that has it has the ring buffer (5.8+)
RINGBUF_HELPER = "bpf_ringbuf_output"


class Probes:
    def __init__(self, functions=ALL, strict=False, method="auto",
                 page_size=os.sysconf("SC_PAGE_SIZE"), kallsyms="/proc/kallsyms",
                 cache=None):
        if method not in ("auto", "kprobe", "kfunc"):
            raise ProbeError(f"unknown probe method {method!r}")
        self.functions = functions
        self.kallsyms = kallsyms
        self.strict = strict
        self.method = method
        self.page_size = page_size
        self.cache = image.cache_dir() if cache is None else cache
        self.status = {}
        self.bpf = None              # bcc's object, for fentry and for a kernel without ringbuf
        self.loaded = None           # the kprobe program's image, loaded (image.Loaded)
        self._image = None           # that image, once compiled or found in the cache
        self._map_fds = {}
        self._output = None
        self._perf_fds = []          # one per kprobe: closing it takes the kprobe away
        self._ksyms_begun = False
        self.order = CallOrder(in_flight=self._in_flight)
        self.pairing = Pairing()
        self.ksyms = Ksyms()
        self._counters = None
        self.variables = {}
        self._compiling = None       # compile_soon's thread, until start() has waited for it
        self._compile_error = None
        self.lost_seen = 0

    def plan(self):
        """Status of every function before anything loads: present, shape, method available."""
        lacking = missing_privilege()
        if lacking:
            raise ProbeError(lacking)
        try:
            btf = Btf.load()
        except BtfError as e:
            raise ProbeError(f"no kernel BTF ({e}): probe shapes come from BTF") from None
        with open(self.kallsyms, "rb") as f:
            names, clones_of, self.variables = find_symbols(
                f.read(), (*self.functions, RINGBUF_HELPER))
        kprobes = has_kprobes()
        if self.method == "kprobe" and not kprobes:
            raise ProbeError("--probe-method kprobe: this kernel has no kprobes")
        method = "kprobe" if self.method == "auto" and kprobes else (
            "kfunc" if self.method == "auto" else self.method)
        try:
            self.layouts = read_layouts(btf)
        except LayoutError as e:
            raise ProbeError(f"{e}: the probes cannot know where to read") from None
        self.shapes = {}
        self.ringbuf = RINGBUF_HELPER in names
        self.atomic_fetch = has_atomic_fetch()
        for fn in self.functions:
            shape = shape_of(btf, fn)
            symbol = fn if fn in names else None
            clones = clones_of.get(fn, [])
            if shape is None:
                reason = "not in BTF (absent or inlined in this kernel)"
            elif clones:
                reason = (f"only compiler clones in kallsyms ({', '.join(clones)}): "
                          "their arguments may differ from the prototype")
            elif symbol is None:
                reason = "not in kallsyms (inlined)"
            elif fn in ANNOTATIONS and ANNOTATIONS[fn] not in self.shapes:
                reason = f"it annotates {ANNOTATIONS[fn]}, which is not observed"
            else:
                reason = ""
                self.shapes[fn] = shape
            self.status[fn] = ProbeStatus(fn, shape is not None and symbol is not None,
                                          shape.describe() if shape else None,
                                          "none" if reason else method, False, reason, symbol)
        return self.status

    def text(self, method=None):
        """The C program for this kernel (what --ebpf prints)."""
        if not self.status:
            self.plan()
        method = method or next((st.method for st in self.status.values() if st.method != "none"),
                                "kprobe")
        index = self.functions.index
        indexed = {index(fn): s for fn, s in self.shapes.items()}
        annotations = {index(fn): index(ANNOTATIONS[fn]) for fn in self.shapes if fn in ANNOTATIONS}
        try:
            return program.build(indexed, self.layouts, ringbuf=self.ringbuf, method=method,
                                 annotations=annotations, atomic_fetch=self.atomic_fetch)
        except OSError as e:
            raise ProbeError(f"the probes' program {e.filename}: {e.strerror or e} "
                             "(an installation without its bpf/memhp.c?)") from None

    def _ready_to_compile(self):
        try:
            import bcc  # noqa: F401  (imported here first to say plainly when it is missing)
        except ImportError:
            raise ProbeError("bcc is not importable: install Debian's python3-bpfcc (a venv "
                             "needs --system-site-packages)") from None
        if not os.path.isdir(os.path.join(headers_dir(), "include")):
            # without headers bcc runs `modprobe kheaders` by itself: never let it
            raise ProbeError(f"no kernel headers at {headers_dir()}: install "
                             f"linux-headers-{os.uname().release}")

    def compile_soon(self):
        """Plan (or take the plan kept), compile (or take the image kept) and attach the kprobe
        program in a thread of its own, and return once the plan is made and a compile or the
        attaching has begun (the plan is Python: what the caller does meanwhile would only take
        turns with it). bcc's clang, and the attaching's syscalls, let go of the GIL: `run`
        imports the rest of the daemon meanwhile. start() waits for it, and raises what the
        thread raised."""
        begun = threading.Event()

        def compile_kprobes():
            try:
                self._plan_kept_or_made()
                if self.shapes:
                    self._compile_kprobes(begun)
                    # and attached here too: mostly syscalls, beside the caller's imports
                    begun.set()
                    self._start_kprobes()
            except BaseException as e:
                self._compile_error = e
            finally:
                begun.set()
        self._compiling = threading.Thread(target=compile_kprobes, name="compile", daemon=True)
        self._compiling.start()
        begun.wait()

    PLANNED = ("status", "shapes", "layouts", "ringbuf", "atomic_fetch")

    def _plan_kept_or_made(self):
        """The plan kept for this kernel build and code (no BTF, no kallsyms: over a second
        under TCG), else made and kept."""
        identity = image.plan_identity(self.functions, self.method)
        # a plan made from another kallsyms (a test's) is neither taken nor kept
        this_kernel = self.kallsyms == "/proc/kallsyms"
        kept = image.cached_plan(self.cache, identity) if this_kernel else None
        if kept is None:
            self.plan()
            if this_kernel:
                image.keep_plan(self.cache, identity, {n: getattr(self, n) for n in self.PLANNED})
            return
        lacking = missing_privilege()   # plan() asks it where the plan is made
        if lacking:
            raise ProbeError(lacking)
        for name in self.PLANNED:
            setattr(self, name, kept[name])
        self.variables = None    # per boot: read once the probes are attached

    def _ksyms_soon(self):
        """The first event's stack needs kallsyms: seconds of parsing under TCG (the lab's first
        call-to-metric took 4.9 s). Begun while bcc compiles, which lets go of the GIL, or once
        the probes are attached when nothing compiles: a parse beside a start without a compile
        would only take turns with it."""
        if not self._ksyms_begun:
            self._ksyms_begun = True
            self.ksyms.load_soon()

    def _compile_ended(self):
        if self._compiling is not None:
            self._compiling.join()
            self._compiling = None

    def start(self):
        """Compile (unless compile_soon did) and attach. Returns the status table."""
        self._compile_ended()
        if self._compile_error is not None:
            raise self._compile_error
        if not self.status:
            self.plan()
        if self.shapes and not self._map_fds:
            method = self.status[next(iter(self.shapes))].method
            (self._start_kprobes if method == "kprobe" else self._start_kfuncs)()
        self._strict_check()
        if self._map_fds:
            self._pending = []
            # read in place, not by syscall: a map syscall holds its CPU's bpf_prog_active, and a
            # kprobe that fires there meanwhile (the syscall preempted) is skipped (threads.py)
            self._counters = mmap.mmap(self._map_fds["counters"], mmap.PAGESIZE,
                                       prot=mmap.PROT_READ)
            if self.ringbuf:
                self._output = bpfsys.RingBuffer(
                    self._map_fds["events"], self._on_event,
                    calls_running=lambda: self.calls_begun() > self.calls_returned())
            else:
                self.bpf[b"events"].open_perf_buffer(
                    lambda _cpu, data, size: self._on_event(data, size), page_cnt=64)
            self._ksyms_soon()
        return self.status

    def _compile_kprobes(self, begun=None):
        """The kprobe program: with a ring buffer, its image (kept from an earlier start on this
        kernel, else compiled now and kept); without one (before 5.8), bcc's object, whose perf
        buffer bcc reads. begun is set once what is left is the compile."""
        text = self.text("kprobe")
        if self.ringbuf:
            self._image = image.cached(self.cache, text)
            if self._image is not None:
                return
        self._ready_to_compile()
        self._ksyms_soon()
        from bcc import BPF
        if begun is not None:
            begun.set()
        bpf = BPF(text=text, cflags=CFLAGS)
        if not self.ringbuf:
            self.bpf = bpf
            return
        try:
            self._image = image.from_bcc(bpf)
        except image.ImageError as e:
            raise ProbeError(f"the compiled probes cannot be loaded apart from bcc: {e}") from None
        finally:
            bpf.cleanup()
        image.keep(self.cache, text, self._image)

    def _start_kprobes(self):
        if self._image is None and self.bpf is None:
            self._compile_kprobes()
        if self._image is not None:
            try:
                self.loaded = image.Loaded(self._image)
            except image.ImageError as e:
                raise ProbeError(f"the probes' maps: {e}") from None
            self._map_fds = self.loaded.map_fds
            program_fd = self.loaded.program
        else:
            self._map_fds = self._bcc_map_fds()
            program_fd = lambda name: self.bpf.load_func(name.encode(), self.bpf.KPROBE).fd
        self._fill_kernel_addresses()
        for fn in self.shapes:
            i, st = self.functions.index(fn), self.status[fn]
            pair = []
            try:
                pair.append(bpfsys.attach_kprobe(program_fd(f"enter_{i}"), st.symbol))
                if fn not in ANNOTATIONS:   # an annotation has an entry probe only
                    pair.append(bpfsys.attach_kprobe(program_fd(f"leave_{i}"), st.symbol,
                                                     retprobe=True))
                self.status[fn] = st._replace(attached=True)
                self._perf_fds += pair
            except Exception as e:   # bcc's load_func raises a bare Exception
                self.status[fn] = st._replace(reason=str(e).strip().splitlines()[-1])
                for fd in pair:     # both or neither: a half pair stalls the order
                    os.close(fd)

    def _start_kfuncs(self):
        """fentry/fexit per function. bcc would attach every kfunc__ program as the object loads
        (all or nothing); here each pair is attached on its own, so one refusal names its
        function and leaves the others observed."""
        self._ready_to_compile()
        self._ksyms_soon()
        from bcc import BPF

        class Manual(BPF):
            def _trace_autoload(self):
                pass

        prefix = "" if has_kprobes() else "no kprobes in this kernel; "
        text = self.text("kfunc")
        try:
            self.bpf = Manual(text=text, cflags=CFLAGS)
        except Exception as e:
            self._unobserved(self.shapes, prefix + "fentry: " + _why(e))
            return
        self._map_fds = self._bcc_map_fds()
        self._fill_kernel_addresses()
        for fn in self.shapes:
            try:
                with _stderr_kept_quiet():   # libbpf prints the refusal itself; said once below
                    self.bpf.attach_kfunc(fn_name=fn.encode())
                    if fn not in ANNOTATIONS:
                        self.bpf.attach_kretfunc(fn_name=fn.encode())
                self.status[fn] = self.status[fn]._replace(attached=True)
            except Exception as e:
                for detach in (self.bpf.detach_kfunc, self.bpf.detach_kretfunc):
                    try:
                        detach(fn_name=fn.encode())   # both or neither: a half pair stalls the order
                    except Exception:
                        pass
                self._unobserved([fn], prefix + "fentry: " + _why(e))
        if not any(self.status[fn].attached for fn in self.shapes):
            self.bpf.cleanup()
            self.bpf, self._map_fds = None, {}

    def _bcc_map_fds(self):
        return {name: self.bpf[name.encode()].map_fd
                for name in ("counters", "inflight", "events", "kernel_addresses")}

    def _fill_kernel_addresses(self):
        """x86-64's vmemmap_base (KASLR moves it): a dump_page's pfn is read relative to it.
        A kept plan has not read kallsyms: the stack names' parse reads it, beside the start."""
        fd = self._map_fds["kernel_addresses"]

        def fill():
            if self.variables is None:
                self.variables = self.ksyms.variables_read()
            try:
                bpfsys.map_update(fd, ctypes.c_int(0),
                                  ctypes.c_uint64(self.variables.get("vmemmap_base", 0)))
            except bpfsys.BpfError:   # the probes closed meanwhile
                pass
        if self.variables is None:
            threading.Thread(target=fill, name="kernel addresses", daemon=True).start()
        else:
            fill()

    def _unobserved(self, functions, reason):
        for fn in functions:
            self.status[fn] = self.status[fn]._replace(reason=reason, method="none")

    def _strict_check(self):
        missing = [fn for fn in CORE if fn in self.status and not self.status[fn].attached]
        if self.strict and missing:
            raise ProbeError("core probes not attached: " + "; ".join(
                f"{fn}: {self.status[fn].reason}" for fn in missing))

    def _on_event(self, data, _size):
        # copied: the reader reuses data
        ev = program.Event()
        ctypes.memmove(ctypes.addressof(ev), data, ctypes.sizeof(ev))
        self._pending.append(ev)

    def _decode(self, ev):
        shape = self.shapes[self.functions[ev.fn]]
        frames = self.ksyms.names_of(ev.stack[:max(0, ev.stack_bytes) // 8])
        return decode(ev, shape, self.layouts, self.page_size, frames)

    def _in_flight(self):
        """The entry halves of the calls still running, by seq, once the calls whose thread has
        left are forgotten."""
        self._forget_calls_left()
        running = {}
        for _key, ev in self._inflight_items():
            begun = self._decode(ev)
            for returned in ("ret", "duration_ns", "span_after", "pgmap"):
                begun.pop(returned, None)
            running[ev.seq] = begun
        return running

    def _forget_calls_left(self):
        """Take out of the map of calls in flight each call whose thread has left the function:
        its return probe did not run, and no event will come (the call order writes it
        skipped)."""
        fd, now = self._map_fds["inflight"], program.Event()
        for key, ev in self._inflight_items():
            if threads.left(ev.tid, self.functions[ev.fn], ev.ts_ns):
                # unless it is the same thread's next call meanwhile
                if bpfsys.map_lookup(fd, key, now) and now.seq == ev.seq:
                    bpfsys.map_delete(fd, key)

    def _inflight_items(self):
        return bpfsys.map_items(self._map_fds["inflight"], ctypes.c_uint64, program.Event)

    def calls_begun(self):
        """How many calls have taken a number: every call numbered below it entered before now."""
        return self._counter(0) if self._counters is not None else 0

    def calls_returned(self):
        """How many calls have returned (their return probe ran)."""
        return self._counter(2) if self._counters is not None else 0

    def _counter(self, index):
        """bpf/memhp.c's counters[index]."""
        return struct.unpack_from("=Q", self._counters, 8 * index)[0]

    def holding(self):
        return self.order.holding()

    def released_below(self):
        """Every call numbered below it has been put out by poll (event, begun or skipped)."""
        return self.order.next_seq

    def release_to(self, upto):
        """Records for the calls numbered below `upto`, a call still running as `begun`, now
        rather than after the call order's wait (a read of the views waits for them)."""
        return [self.pairing.feed(r) for r in self.order.release_to(upto)]

    def poll(self, timeout_ms=200):
        """Records now in call order (decoded trace events, and `begun`/`skipped` where a call
        held the order up), and the count of newly lost events."""
        if self._counters is None:
            time.sleep(timeout_ms / 1000)
            return [], 0
        if self._output is not None:
            self._output.poll(timeout_ms)
        else:
            self.bpf.perf_buffer_poll(timeout=timeout_ms)
        now = time.monotonic()
        out = []
        for ev in self._pending:
            out += self.order.feed(self._decode(ev), now)
        self._pending = []
        out += self.order.expire(now)
        out = [self.pairing.feed(r) for r in out]
        lost = self._counter(1)
        new_lost, self.lost_seen = lost - self.lost_seen, lost
        return out, new_lost

    def drain(self):
        return [self.pairing.feed(r) for r in self.order.drain()]

    def close(self):
        self._compile_ended()   # compile_soon's, never started: it ends first
        for fd in self._perf_fds:     # the kprobes first, then what they ran
            os.close(fd)
        self._perf_fds = []
        for held in (self._output, self._counters, self.loaded):
            if held is not None:
                held.close()
        self._output = self._counters = self.loaded = None
        self._map_fds = {}
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


def compile_soon(strict=False, method="auto"):
    """Probes whose kprobe program compiles while the caller goes on (Probes.compile_soon), for
    attach() to take; None where `run` would not compile that program: no kprobes in this
    kernel, fentry asked, or no privilege (the daemon then says why, as it would have)."""
    if method == "kfunc" or missing_privilege() or not has_kprobes():
        return None
    probes = Probes(strict=strict, method=method)
    probes.compile_soon()
    return probes


def attach(mode, strict=False, method="auto", probes=None):
    """(Probes with at least one function attached, or None; the status of every function) for
    `record` and `run`. mode "auto": when nothing attaches, the reason is logged once and the
    caller goes on in procfs mode; mode "bpf": ProbeError instead; strict: ProbeError unless
    every core function attaches. probes: compile_soon's, or None for new ones."""
    probes = probes or Probes(strict=strict, method=method)
    try:
        status = probes.start()
    except ProbeError as e:
        probes.close()
        if mode == "bpf":
            raise
        if strict:
            raise ProbeError(f"--strict: {e}") from None
        log.info("BPF off: %s: procfs mode", e)
        return None, probes.status
    if any(st.attached for st in status.values()):
        return probes, status
    probes.close()
    reason = "; ".join(sorted({st.reason for st in status.values() if st.reason}))
    if mode == "bpf":
        raise ProbeError(f"--mode bpf: no probe attached: {reason}")
    log.info("BPF off: %s: procfs mode", reason)
    return None, status
