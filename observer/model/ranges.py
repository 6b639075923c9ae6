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
