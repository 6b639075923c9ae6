"""The kernel's BPF interface without clang: bpf(2) for maps and programs, perf_event_open(2)
for kprobes, libbpf's ring buffer reader. What a compiled program (image.py) needs to load,
attach and be read, in milliseconds where bcc takes seconds to import and compile.

Layouts are the kernel's uapi (linux/bpf.h `union bpf_attr`, linux/perf_event.h
`struct perf_event_attr`): fields only ever appended, so these offsets hold on every kernel."""

import ctypes
import errno
import os
import select
import struct
import time

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_BPF, SYS_PERF_EVENT_OPEN = 321, 298                 # x86-64
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM = 0, 1, 2
BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY, BPF_PROG_LOAD = 3, 4, 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_TYPE_KPROBE = 2
PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_SET_BPF = 0x2400, 0x40042408
PERF_FLAG_FD_CLOEXEC = 8
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"


class BpfError(OSError):
    pass


def _long(n):
    # syscall(2) takes its arguments as longs: a plain int would leave a register's upper half
    # to chance (pid -1 must arrive as -1)
    return ctypes.c_long(n)


def _bpf(cmd, attr):
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    ret = _libc.syscall(_long(SYS_BPF), _long(cmd), buf, _long(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, os.strerror(err))
    return ret


def map_create(map_type, key_size, value_size, max_entries, flags, name):
    # map_type, key_size, value_size, max_entries, map_flags, inner_map_fd, numa_node, map_name
    attr = struct.pack("=7I16s", map_type, key_size, value_size, max_entries, flags, 0, 0,
                       name.encode()[:15])
    return _bpf(BPF_MAP_CREATE, attr)


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


def map_info(fd):
    info = MapInfo()
    attr = struct.pack("=IIQ", fd, ctypes.sizeof(info), ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return info


def _elem_attr(fd, key, value=None, flags=0):
    """bpf_attr for the element commands: map_fd, key pointer, value (or next key) pointer,
    flags."""
    return struct.pack("=IxxxxQQQ", fd, ctypes.addressof(key),
                       ctypes.addressof(value) if value is not None else 0, flags)


def map_update(fd, key, value):
    _bpf(BPF_MAP_UPDATE_ELEM, _elem_attr(fd, key, value))


def map_lookup(fd, key, value):
    """Fills `value` and says True, or False when the key is not there."""
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, _elem_attr(fd, key, value))
        return True
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise


def map_delete(fd, key):
    try:
        _bpf(BPF_MAP_DELETE_ELEM, _elem_attr(fd, key))
    except BpfError as e:
        if e.errno != errno.ENOENT:
            raise


def map_items(fd, key_type, value_type):
    """[(key, value)] of a hash map, as ctypes objects, walked by key."""
    items, key, following = [], None, key_type()
    while True:
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, struct.pack(
                "=IxxxxQQ", fd, ctypes.addressof(key) if key is not None else 0,
                ctypes.addressof(following)))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return items
            raise
        key = key_type.from_buffer_copy(following)
        value = value_type()
        if map_lookup(fd, key, value):   # gone meanwhile: left out
            items.append((key, value))


def prog_load(insns, license, kern_version, name, prog_type=BPF_PROG_TYPE_KPROBE):
    """The program's fd. A refusal is retried with the verifier's log, whose last lines say
    why."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())

    def load(log):
        # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version,
        # prog_flags, prog_name
        attr = struct.pack("=IIQQIIQII16s", prog_type, len(insns) // 8, ctypes.addressof(code),
                           ctypes.addressof(lic), 1 if log else 0, len(log) if log else 0,
                           ctypes.addressof(log) if log else 0, kern_version, 0,
                           name.encode()[:15])
        return _bpf(BPF_PROG_LOAD, attr)
    try:
        return load(None)
    except BpfError as e:
        log = ctypes.create_string_buffer(1 << 20)
        try:
            return load(log)
        except BpfError:
            lines = log.value.decode(errors="replace").strip().splitlines()
            raise BpfError(e.errno, f"{e.strerror}: " + " / ".join(lines[-3:])) from None


def _kprobe_pmu():
    """(the kprobe PMU's perf type, the config bit that makes a kretprobe)."""
    with open(os.path.join(KPROBE_PMU, "type")) as f:
        pmu = int(f.read())
    with open(os.path.join(KPROBE_PMU, "format", "retprobe")) as f:
        bit = int(f.read().strip().split(":")[1])     # "config:0"
    return pmu, bit


def attach_kprobe(prog_fd, symbol, retprobe=False):
    """A kprobe (or kretprobe) on `symbol` running the program, through the kprobe PMU, as bcc
    and libbpf do: the perf event's fd, which holds the probe until it is closed."""
    pmu, bit = _kprobe_pmu()
    func = ctypes.create_string_buffer(symbol.encode())
    attr = bytearray(128)
    # type, size, config (the retprobe bit), sample_period 1; wakeup_events 1; config1: the
    # function's name; config2: the offset in it
    struct.pack_into("=IIQQ", attr, 0, pmu, len(attr), (1 << bit) if retprobe else 0, 1)
    struct.pack_into("=I", attr, 48, 1)
    struct.pack_into("=QQ", attr, 56, ctypes.addressof(func), 0)
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    fd = _libc.syscall(_long(SYS_PERF_EVENT_OPEN), buf, _long(-1), _long(0), _long(-1),
                       _long(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{'kretprobe' if retprobe else 'kprobe'} on {symbol}: "
                            f"{os.strerror(err)}")
    for request, arg in ((PERF_EVENT_IOC_SET_BPF, prog_fd), (PERF_EVENT_IOC_ENABLE, 0)):
        if _libc.ioctl(fd, _long(request), _long(arg)) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise BpfError(err, f"kprobe on {symbol}: {os.strerror(err)}")
    return fd


_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def _libbpf():
    """libbpf (Debian's libbpf1, which bcc's own library depends on; named, not looked for:
    ctypes.util's import alone is a tenth of a second under TCG)."""
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.ring_buffer__new.restype = ctypes.c_void_p
    lib.ring_buffer__new.argtypes = [ctypes.c_int, _SAMPLE_FN, ctypes.c_void_p, ctypes.c_void_p]
    for fn in (lib.ring_buffer__epoll_fd, lib.ring_buffer__consume):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p]
    lib.ring_buffer__free.argtypes = [ctypes.c_void_p]
    return lib


class RingBuffer:
    """A BPF ring buffer map read through libbpf: callback(data pointer, size) per record."""

    # After a wakeup, while calls the probes watch are still running (an inner call's return
    # woke the reader; the outer call's comes next), their records are let gather before any is
    # read, up to this long. The kernel wakes the reader for a record only when every record
    # before it has been read, and under TCG each wakeup (an irq_work, then the reader's) cost
    # the probed call about 40 µs, the probes' dearest part: so an operation's calls wake it
    # once, and its outer call's event is read as soon as it is there.
    GATHER_SECONDS = 0.02

    def __init__(self, map_fd, callback, calls_running=lambda: False):
        self._lib = _libbpf()
        self._fn = _SAMPLE_FN(lambda _ctx, data, size: callback(data, size) or 0)
        self._rb = self._lib.ring_buffer__new(map_fd, self._fn, None, None)
        if not self._rb:
            err = ctypes.get_errno()
            raise BpfError(err, f"ring buffer: {os.strerror(err)}")
        self._epoll_fd = self._lib.ring_buffer__epoll_fd(self._rb)
        self._calls_running = calls_running

    def poll(self, timeout_ms):
        """The records a wakeup within timeout_ms announces and those that gather after it, or
        at the timeout what is there without one (in a 7.2 guest, records sat unread for 10 s
        until the next call's wakeup)."""
        if select.select([self._epoll_fd], [], [], timeout_ms / 1000)[0] and timeout_ms:
            until = time.monotonic() + self.GATHER_SECONDS
            while self._calls_running() and time.monotonic() < until:
                time.sleep(0.001)
        self._lib.ring_buffer__consume(self._rb)

    def close(self):
        if self._rb:
            self._lib.ring_buffer__free(self._rb)
            self._rb = None
