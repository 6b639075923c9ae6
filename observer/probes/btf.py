"""A small reader of the kernel's BTF (/sys/kernel/btf/vmlinux): function prototypes with their
parameter names and types, struct member offsets, and enum values. Probe shapes, the offsets the
BPF program reads at and enum values come from here, never from `uname -r`, the headers bcc
compiles with, or literals (DESIGN.md §2). Format: Documentation/bpf/btf.rst."""

import struct

BTF_PATH = "/sys/kernel/btf/vmlinux"
MAGIC = 0xEB9F

(INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO,
 VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64) = range(1, 20)
# bytes that follow struct btf_type for each kind: fixed, and per vlen item
_EXTRA = {INT: (4, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8),
          FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12), DECL_TAG: (4, 0), ENUM64: (0, 12)}
_MODIFIERS = {VOLATILE: "volatile", CONST: "const", RESTRICT: "restrict", TYPE_TAG: ""}
_SEE_THROUGH = (TYPEDEF, *_MODIFIERS)   # kinds that name another type and add nothing to its width


class BtfError(Exception):
    pass


class Btf:
    def __init__(self, data, path=BTF_PATH):
        self.path = path
        if len(data) < 24:
            raise BtfError(f"{path}: too short for a BTF header")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise BtfError(f"{path}: not BTF (magic {magic:#x})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self.strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        self.data = data
        # where each type's record begins (type id 0 is void), and the types found by name
        # keyed by the offset of their name: a name is decoded only when asked for, which
        # halves the walk (under TCG it took 2 s of a daemon's start)
        self.offsets = [0]
        self._found = {}     # name -> where it is in the string table (_name_offsets)
        self.funcs, self.enums, self.structs = {}, {}, {}   # name offset -> type id
        named = {FUNC: self.funcs, ENUM: self.enums, ENUM64: self.enums}
        head = struct.Struct("<II").unpack_from
        extra = [_EXTRA.get(kind, (0, 0)) for kind in range(32)]
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        offsets = self.offsets
        while pos < end:
            name_off, info = head(data, pos)
            kind = (info >> 24) & 0x1F
            offsets.append(pos)
            if kind == STRUCT:
                if name_off:
                    self.structs.setdefault(name_off, len(offsets) - 1)   # its first definition
            elif kind in named and name_off:
                named[kind][name_off] = len(offsets) - 1
            fixed, per_item = extra[kind]
            pos += 12 + fixed + per_item * (info & 0xFFFF)

    @classmethod
    def load(cls, path=BTF_PATH):
        try:
            with open(path, "rb") as f:
                return cls(f.read(), path)
        except OSError as e:
            raise BtfError(f"{path}: {e.strerror or e}") from None

    def _str(self, off):
        return self.strings[off:self.strings.index(b"\0", off)].decode()

    def _type(self, tid):
        """(kind, name offset, size or type, vlen, offset of what follows, kind_flag)."""
        pos = self.offsets[tid]
        name_off, info, size_or_type = struct.unpack_from("<III", self.data, pos)
        return (info >> 24) & 0x1F, name_off, size_or_type, info & 0xFFFF, pos + 12, info >> 31

    def _named(self, index, name):
        """The type id of `name` in one of the by-name indexes, or None."""
        return next((index[at] for at in self._name_offsets(name) if at in index), None)

    def _name_offsets(self, name):
        """Where `name` is in the string table (the kernel's strings are deduplicated: once,
        but a copy would be found too); each name is looked for once, as a probe's function
        is asked its parameters, its return and their plain spellings."""
        found = self._found.get(name)
        if found is None:
            wanted, found, at = b"\0" + name.encode() + b"\0", [], -1
            while (at := self.strings.find(wanted, at + 1)) >= 0:
                found.append(at + 1)
            self._found[name] = found
        return found

    def type_name(self, tid):
        """C spelling of a type: "u64", "struct zone *", "int", "const char *"."""
        if tid == 0:
            return "void"
        kind, name_off, ref, _vlen, _body, kind_flag = self._type(tid)
        if kind == PTR:
            inner = self.type_name(ref)
            return inner + ("*" if inner.endswith("*") else " *")
        if kind in _MODIFIERS:
            inner = self.type_name(ref)
            return f"{_MODIFIERS[kind]} {inner}".strip()
        name = self._str(name_off) if name_off else "(anon)"
        prefix = {STRUCT: "struct ", UNION: "union ", ENUM: "enum ", ENUM64: "enum "}.get(kind, "")
        if kind == FWD:   # kind_flag says which: `union u;` or `struct s;`
            prefix = "union " if kind_flag else "struct "
        if kind == FUNC_PROTO:
            return "function"
        return prefix + name

    def plain_type_name(self, tid):
        """A spelling of the type that compiles without the kernel's headers, as wide as it: an
        integer (typedefs and enums followed to it) as u8..u64, s8..s64 or bool; a pointer to a
        struct or union as itself (declared ahead: `struct zone;`), any other pointer void *."""
        if tid == 0:
            return "void"
        kind, name_off, ref, _vlen, body, kind_flag = self._type(tid)
        if kind in _SEE_THROUGH:
            return self.plain_type_name(ref)
        if kind == PTR:
            target = ref
            while target and self._type(target)[0] in _SEE_THROUGH:
                target = self._type(target)[2]
            pointee = self._type(target)[0] if target else None
            return self.type_name(target) + " *" if pointee in (STRUCT, UNION, FWD) else "void *"
        if kind == INT:
            encoding = struct.unpack_from("<I", self.data, body)[0] >> 24
            if encoding & 4:
                return "bool"
            return f"{'s' if encoding & 1 else 'u'}{ref * 8}"
        if kind in (ENUM, ENUM64):
            return f"{'s' if kind_flag else 'u'}{ref * 8}"
        return self.type_name(tid)

    def func_params(self, name, plain=False):
        """[(param name, C type)] of a kernel function, or None when BTF has no such function
        (absent, or inlined everywhere). plain: the types as plain_type_name spells them."""
        fid = self._named(self.funcs, name)
        if fid is None:
            return None
        proto = self._type(fid)[2]
        kind, _n, _ret, vlen, body, _kf = self._type(proto)
        if kind != FUNC_PROTO:
            raise BtfError(f"{self.path}: FUNC {name} does not point at a FUNC_PROTO")
        params = []
        for i in range(vlen):
            name_off, tid = struct.unpack_from("<II", self.data, body + 8 * i)
            params.append((self._str(name_off),
                           (self.plain_type_name if plain else self.type_name)(tid)))
        return params

    def func_return(self, name, plain=False):
        fid = self._named(self.funcs, name)
        spell = self.plain_type_name if plain else self.type_name
        return None if fid is None else spell(self._type(self._type(fid)[2])[2])

    def struct_members(self, name):
        """{member: C type} of `struct name` (anonymous unions' members included), or None."""
        tid = self._named(self.structs, name)
        return None if tid is None else {m: t for m, (_off, t) in self._members(tid, 0).items()}

    def struct_offsets(self, name):
        """{member: byte offset} of `struct name` (anonymous members' own members at their
        place in it), or None: where the running kernel keeps each field."""
        tid = self._named(self.structs, name)
        return None if tid is None else {m: off for m, (off, _t) in self._members(tid, 0).items()}

    def struct_size(self, name):
        tid = self._named(self.structs, name)
        return None if tid is None else self._type(tid)[2]

    def _members(self, tid, base):
        _kind, _n, _size, vlen, body, kind_flag = self._type(tid)
        out = {}
        for i in range(vlen):
            name_off, mtid, bits = struct.unpack_from("<III", self.data, body + 12 * i)
            # with kind_flag the top 8 bits are a bitfield's size, the rest its bit offset
            offset = base + ((bits & 0xFFFFFF) if kind_flag else bits) // 8
            if name_off:
                out[self._str(name_off)] = (offset, self.type_name(mtid))
            elif self._type(mtid)[0] in (STRUCT, UNION):
                out.update(self._members(mtid, offset))
        return out

    def enum_values(self, name):
        """{ENUMERATOR: value} of `enum name`, or None when BTF has no such enum."""
        tid = self._named(self.enums, name)
        if tid is None:
            return None
        kind, _n, _size, vlen, body, _kf = self._type(tid)
        out = {}
        for i in range(vlen):
            if kind == ENUM:
                name_off, val = struct.unpack_from("<Ii", self.data, body + 8 * i)
            else:
                name_off, lo, hi = struct.unpack_from("<III", self.data, body + 12 * i)
                val = lo | hi << 32
            out[self._str(name_off)] = val
        return out
