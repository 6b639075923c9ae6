"""The probes' kprobe program compiled once per kernel and program text, and loaded from then on
without clang: bcc compiles it the first time (seconds under TCG, most of a start), its
instructions and map shapes are kept in a cache directory, and later starts create the maps and
load the instructions through bpf(2) (bpfsys.py).

An image is the program's maps (shapes as the kernel took them) and each function's
instructions, with every map reference (a 64-bit load of a map fd) written as the map's index:
loading puts the new fds there."""

import base64
import ctypes
import json
import os
import struct
import zlib
from collections import namedtuple

from .. import log
from . import bpfsys


FORMAT = 1
DEFAULT_DIR = "/var/cache/memhp-observer"
BPF_LD_IMM64 = 0x18
BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE = 1, 2
BPF_CALL, BPF_PSEUDO_CALL = 0x85, 1


class ImageError(Exception):
    pass


def cache_dir():
    """systemd's CacheDirectory= (CACHE_DIRECTORY), else /var/cache/memhp-observer."""
    return os.environ.get("CACHE_DIRECTORY", "").split(":")[0] or DEFAULT_DIR


def _identity(text):
    """What an image is kept for: the program text (it carries the kernel's struct offsets from
    BTF) and the kernel build."""
    uname = os.uname()
    return "\0".join((text, uname.release, uname.version, uname.machine))


def path_of(directory, text):
    """Where the image for this text and kernel build is kept: named by a checksum of the two,
    which the file holds whole (a checksum, not a digest: hashlib's import alone is a tenth of
    a second under TCG, and the file says whether it is the one)."""
    return os.path.join(directory, f"{os.uname().release}-"
                                   f"{zlib.crc32(_identity(text).encode()):08x}.json")


MapSpec = namedtuple("MapSpec", "name type key_size value_size max_entries flags")


class Image(namedtuple("Image", [
        "license", "kern_version",
        "maps",         # [MapSpec]
        "programs",     # {name: instructions, map references as map indexes}
        "references",   # {name: [(instruction index, map index)]}
])):
    __slots__ = ()

    def to_json(self, text):
        return {"format": FORMAT, "for": _identity(text),
                "license": self.license, "kern_version": self.kern_version,
                "maps": [m._asdict() for m in self.maps],
                "programs": {name: base64.b64encode(insns).decode()
                             for name, insns in self.programs.items()},
                "references": self.references}

    @classmethod
    def from_json(cls, doc, text):
        if doc.get("format") != FORMAT:
            raise ImageError(f"format {doc.get('format')!r}, not {FORMAT}")
        if doc.get("for") != _identity(text):
            raise ImageError("kept for another program or kernel build (the same checksum)")
        try:
            return cls(doc["license"], doc["kern_version"], [MapSpec(**m) for m in doc["maps"]],
                       {name: base64.b64decode(insns) for name, insns in doc["programs"].items()},
                       {name: [tuple(r) for r in refs]
                        for name, refs in doc["references"].items()})
        except (KeyError, TypeError, ValueError) as e:
            raise ImageError(f"malformed: {e!r}") from None


def _libbcc():
    from bcc.libbcc import lib
    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.bpf_table_fd_id.restype = ctypes.c_int
    lib.bpf_table_fd_id.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return lib


def from_bcc(bpf):
    """The image of a program bcc has compiled (not loaded): its maps, which bcc created as it
    compiled and whose fds the instructions hold, read back from the kernel."""
    lib, module = _libbcc(), bpf.module
    maps, index_of = [], {}
    for i in range(lib.bpf_num_tables(module)):
        fd = lib.bpf_table_fd_id(module, i)
        info = bpfsys.map_info(fd)
        index_of[fd] = len(maps)
        maps.append(MapSpec(lib.bpf_table_name(module, i).decode(), info.type, info.key_size,
                            info.value_size, info.max_entries, info.map_flags))
    programs, references = {}, {}
    for i in range(lib.bpf_num_functions(module)):
        name = lib.bpf_function_name(module, i)
        insns = bytearray(ctypes.string_at(lib.bpf_function_start(module, name),
                                           lib.bpf_function_size(module, name)))
        name = name.decode()
        references[name] = _references(name, insns, index_of)
        programs[name] = bytes(insns)
    return Image(lib.bpf_module_license(module).decode(), lib.bpf_module_kern_version(module),
                 maps, programs, references)


def _references(name, insns, index_of):
    """[(instruction index, map index)] of the map fds in `insns`, each fd replaced by its index
    in place; ImageError for anything a later load could not make true again."""
    refs = []
    for n in range(0, len(insns) // 8):
        code, regs, _off, imm = struct.unpack_from("=BBhi", insns, 8 * n)
        src = regs >> 4
        if code == BPF_LD_IMM64 and src:
            if src not in (BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE) or imm not in index_of:
                raise ImageError(f"{name}: instruction {n} loads kind {src} of {imm}")
            refs.append((n, index_of[imm]))
            struct.pack_into("=i", insns, 8 * n + 4, index_of[imm])
        elif code == BPF_CALL and src not in (0, BPF_PSEUDO_CALL):
            raise ImageError(f"{name}: instruction {n} calls kind {src}")
    return refs


def _trusted(path, st, instead):
    """A file or folder the kernel may be handed code from: ours, and written by us alone."""
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        log.warning("probe image cache: %s is not owned by uid %d or is writable by others: "
                    "%s instead", path, os.geteuid(), instead)
        return False
    return True


def _read_kept(directory, path, parse, instead):
    """parse(the bytes of a file kept in the cache), or None: none kept, or one that cannot be
    trusted or read (said: `instead` is what the start does then)."""
    try:
        if not _trusted(directory, os.stat(directory), instead):
            return None
        with open(path, "rb") as f:
            if not _trusted(path, os.fstat(f.fileno()), instead):
                return None
            return parse(f.read())
    except FileNotFoundError:
        return None
    except Exception as e:   # a file torn or written by something else: its parse raises anything
        log.warning("probe image cache: %s: %s: %s instead", path, e, instead)
        return None


def _write_kept(directory, path, data, again):
    """Write a file for the next start, atomically (a start never reads half a file); True once
    written. A cache that cannot be written is said, and costs only the next start `again`."""
    import tempfile   # only here: a start that loads what is kept needs none
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".kept-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return True
    except OSError as e:
        log.warning("probe image cache %s: %s: the next start %s again", directory,
                    e.strerror or e, again)
        return False


def cached(directory, text):
    """The image kept for this text on this kernel, or None (the program is then compiled)."""
    path = path_of(directory, text)
    kept = _read_kept(directory, path, lambda data: Image.from_json(json.loads(data), text),
                      "compiling")
    if kept is not None:
        log.info("probes compiled for this kernel before: loaded from %s", path)
    return kept


def keep(directory, text, image):
    if _write_kept(directory, path_of(directory, text), json.dumps(image.to_json(text)).encode(),
                   "compiles"):
        log.info("probes compiled, kept for the next start in %s", directory)


def _code_fingerprint():
    """What a plan is made by: this package's sources and the program's template (an upgrade
    changes their sizes or times)."""
    from .program import template_path
    here = os.path.dirname(os.path.abspath(__file__))
    paths = sorted(os.path.join(here, n) for n in os.listdir(here) if n.endswith(".py"))
    return "\0".join(f"{p}:{st.st_size}:{st.st_mtime_ns}"
                      for p in (*paths, template_path()) for st in (os.stat(p),))


def plan_identity(functions, method):
    """What a plan is kept for: the kernel build (its BTF and kallsyms), the functions and
    method asked, and the code that plans."""
    uname = os.uname()
    return "\0".join((uname.release, uname.version, uname.machine, method, *functions,
                      _code_fingerprint()))


def _plan_path(directory, identity):
    return os.path.join(directory, f"{os.uname().release}-plan-"
                                   f"{zlib.crc32(identity.encode()):08x}.pickle")


def cached_plan(directory, identity):
    """The plan kept for this identity ({attribute: value} of loader.Probes), or None (the
    start then plans from BTF and kallsyms)."""
    import pickle

    def parse(data):
        kept = pickle.loads(data)
        if kept.pop("for") != identity:
            raise ImageError("kept for another kernel build or code (the same checksum)")
        return kept
    return _read_kept(directory, _plan_path(directory, identity), parse, "planning")


def keep_plan(directory, identity, state):
    import pickle
    _write_kept(directory, _plan_path(directory, identity),
                pickle.dumps({"for": identity, **state}), "plans")


class Loaded:
    """An image's maps created in the kernel, its programs loaded as they are asked for."""

    def __init__(self, image):
        self.image = image
        self.map_fds = {}
        self._prog_fds = {}
        try:
            for spec in image.maps:
                self.map_fds[spec.name] = bpfsys.map_create(
                    spec.type, spec.key_size, spec.value_size, spec.max_entries, spec.flags,
                    spec.name)
        except bpfsys.BpfError as e:
            self.close()
            raise ImageError(f"map {spec.name}: {e.strerror}") from None

    def program(self, name):
        """The fd of the program `name`, loaded the first time it is asked for."""
        if name not in self._prog_fds:
            insns = bytearray(self.image.programs[name])
            fds = [self.map_fds[m.name] for m in self.image.maps]
            for n, index in self.image.references[name]:
                struct.pack_into("=i", insns, 8 * n + 4, fds[index])
            self._prog_fds[name] = bpfsys.prog_load(bytes(insns), self.image.license,
                                                    self.image.kern_version, name)
        return self._prog_fds[name]

    def close(self):
        for fd in list(self._prog_fds.values()) + list(self.map_fds.values()):
            os.close(fd)
        self._prog_fds, self.map_fds = {}, {}
