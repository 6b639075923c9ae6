"""memhp-observer: a live observer of Linux memory hotplug."""

__version__ = "0.1.0"
