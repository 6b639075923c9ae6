"""memhp-observer: a live observer of Linux memory hotplug.

Its records (Anomaly, Zone, MemoryBlock, State, ...) are namedtuples, not dataclasses: importing
dataclasses (inspect, ast, dis) and the code it compiles for every class were a fifth of the
daemon's imports, the most of its start under TCG."""

__version__ = "0.1.0"
