"""A set of integer ranges [lo, hi) (pfns), kept sorted, disjoint and merged where they touch:
add, remove and overlap queries by bisection, so the cost of one follows the log of the number
of ranges, not the pages they hold."""

from bisect import bisect_left, bisect_right


def pfns_of(first_byte, last_byte, page_size):
    """[lo, hi) pfns of an inclusive byte range: a resource's start and end, a pgmap's range."""
    return first_byte // page_size, (last_byte + 1) // page_size


class RangeSet:
    def __init__(self, ranges=()):
        self.los, self.his = [], []
        for lo, hi in ranges:
            self.add(lo, hi)

    @classmethod
    def of_sorted(cls, ranges):
        """The set of ranges given in ascending order of lo: built in one pass."""
        out = cls()
        los, his = out.los, out.his
        for lo, hi in ranges:
            if lo >= hi:
                continue
            if his and lo <= his[-1]:
                his[-1] = max(his[-1], hi)
            else:
                los.append(lo)
                his.append(hi)
        return out

    def add(self, lo, hi):
        if lo >= hi:
            return
        i = bisect_left(self.his, lo)      # first range ending at or after lo: touches or overlaps
        if i < len(self.los) and self.los[i] <= lo and hi <= self.his[i]:
            return                         # in it already (a block onlined again)
        j = bisect_right(self.los, hi)     # first range starting after hi
        if i < j:
            lo, hi = min(lo, self.los[i]), max(hi, self.his[j - 1])
        self.los[i:j], self.his[i:j] = [lo], [hi]

    def remove(self, lo, hi):
        i, j = self._overlapping(lo, hi)
        if lo >= hi or i >= j:
            return
        keep_lo, keep_hi = [], []
        if self.los[i] < lo:
            keep_lo.append(self.los[i])
            keep_hi.append(lo)
        if self.his[j - 1] > hi:
            keep_lo.append(hi)
            keep_hi.append(self.his[j - 1])
        self.los[i:j], self.his[i:j] = keep_lo, keep_hi

    def _overlapping(self, lo, hi):
        return bisect_right(self.his, lo), bisect_left(self.los, hi)

    def overlap(self, lo, hi):
        """The parts of [lo, hi) in the set, in order."""
        i, j = self._overlapping(lo, hi)
        return [(max(self.los[k], lo), min(self.his[k], hi)) for k in range(i, j)]

    def gaps(self, lo, hi):
        """The parts of [lo, hi) not in the set, in order."""
        out, at = [], lo
        for a, b in self.overlap(lo, hi):
            if a > at:
                out.append((at, a))
            at = b
        if at < hi:
            out.append((at, hi))
        return out

    def range_at(self, pfn):
        """The range holding pfn, or None."""
        i = bisect_right(self.his, pfn)
        return (self.los[i], self.his[i]) if i < len(self.los) and self.los[i] <= pfn else None

    def covers(self, lo, hi):
        return lo >= hi or self.overlap(lo, hi) == [(lo, hi)]

    def __contains__(self, pfn):
        return bool(self.overlap(pfn, pfn + 1))

    def __iter__(self):
        return iter(zip(self.los, self.his))

    def __len__(self):
        return len(self.los)


class RangeMap:
    """Disjoint integer ranges [lo, hi), each with a value (never None), kept sorted; touching
    ranges of equal value merged: what a run of memory blocks is, by block index."""

    def __init__(self):
        self.los, self.his, self.vals = [], [], []

    @classmethod
    def of_sorted(cls, items):
        """The map of (lo, hi, value) given in ascending order of lo, not overlapping."""
        out = cls()
        for lo, hi, value in items:
            if out.los and out.his[-1] == lo and out.vals[-1] == value:
                out.his[-1] = hi
            elif lo < hi:
                out.los.append(lo)
                out.his.append(hi)
                out.vals.append(value)
        return out

    def assign(self, lo, hi, value):
        """[lo, hi) given the value (None: no value); ranges that then touch with one value
        made one. Replay does this for every online and offline: no list is built but the few
        ranges put back."""
        if lo >= hi:
            return
        los, his, vals = self.los, self.his, self.vals
        i, j = bisect_right(his, lo), bisect_left(los, hi)   # ranges i..j-1 overlap
        head = i < j and los[i] < lo       # the first keeps its part before lo
        tail = i < j and his[j - 1] > hi   # the last its part after hi
        a, b = lo, hi                      # the new range, grown over those of its value
        if head:
            if vals[i] == value:
                a, head = los[i], False
        elif value is not None and i > 0 and his[i - 1] == lo and vals[i - 1] == value:
            i -= 1
            a = los[i]
        if tail:
            if vals[j - 1] == value:
                b, tail = his[j - 1], False
        elif value is not None and j < len(los) and los[j] == hi and vals[j] == value:
            b = his[j]
            j += 1
        new_los, new_his, new_vals = [], [], []
        if head:
            new_los.append(los[i])
            new_his.append(lo)
            new_vals.append(vals[i])
        if value is not None:
            new_los.append(a)
            new_his.append(b)
            new_vals.append(value)
        if tail:
            new_los.append(hi)
            new_his.append(his[j - 1])
            new_vals.append(vals[j - 1])
        los[i:j], his[i:j], vals[i:j] = new_los, new_his, new_vals

    def clear(self, lo, hi):
        self.assign(lo, hi, None)

    def fill(self, lo, hi, value):
        """The value over the parts of [lo, hi) that have none."""
        at = lo
        for a, b, _ in self.items(lo, hi):
            if a > at:
                self.assign(at, a, value)
            at = b
        if at < hi:
            self.assign(at, hi, value)

    def items(self, lo=None, hi=None):
        """(lo, hi, value) of the ranges overlapping [lo, hi) (all without bounds), cut to it."""
        if lo is None:
            return list(zip(self.los, self.his, self.vals))
        i, j = bisect_right(self.his, lo), bisect_left(self.los, hi)
        return [(max(self.los[k], lo), min(self.his[k], hi), self.vals[k]) for k in range(i, j)]

    def diff(self, other):
        """(lo, hi, this value, the other's value) where the two maps differ, in order; None
        where one has no value."""
        points = sorted(set(self.los + self.his + other.los + other.his))
        out = []
        for lo, hi in zip(points, points[1:]):
            mine, theirs = self._at(lo), other._at(lo)
            if mine != theirs:
                if out and out[-1][1] == lo and out[-1][2:] == (mine, theirs):
                    out[-1] = (out[-1][0], hi, mine, theirs)
                else:
                    out.append((lo, hi, mine, theirs))
        return out

    def _at(self, point):
        i = bisect_right(self.los, point) - 1
        return self.vals[i] if i >= 0 and point < self.his[i] else None

    def __eq__(self, other):
        return (self.los, self.his, self.vals) == (other.los, other.his, other.vals)


class BlockMap(RangeMap):
    """A RangeMap that events write block by block (an online or offline is one block): a
    one-block assign is noted, and the ranges take the notes when next read or written wider.
    A cycle's offline and online of a block then cost two notes and one look, not a split
    and a merge. Not for a map several threads read (the daemon's are RangeMaps)."""

    def __init__(self):
        super().__init__()
        self._notes = {}   # block -> the value assigned to it alone since the ranges took notes

    def _take_notes(self):
        notes, self._notes = self._notes, {}
        for block, value in notes.items():
            if self._at(block) != value:
                super().assign(block, block + 1, value)

    def assign(self, lo, hi, value):
        if hi == lo + 1:
            self._notes[lo] = value
            return
        if self._notes:
            self._take_notes()
        super().assign(lo, hi, value)

    def items(self, lo=None, hi=None):
        if self._notes:
            self._take_notes()
        return super().items(lo, hi)

    def diff(self, other):
        for m in (self, other):
            if getattr(m, "_notes", None):
                m._take_notes()
        return super().diff(other)
