"""The lab: Debian kernels booted under QEMU/TCG (virtme-ng) with this machine's userland, driven
through real memory-hotplug paths, with the kernel's views captured around every step.

Host side: kernels.py (the bounded cache), guest.py (boot, commands, QMP), scenarios.py (named
step lists). Guest side: agent.py, which refuses to run anywhere but a lab guest."""


class LabError(Exception):
    """The lab cannot go on (a guest, QMP, a step): one line for the user, never a traceback."""
