"""The probe layer (DESIGN.md §2): which kernel functions are watched, and whether this kernel
lets BPF watch them. The bcc loader and per-kernel argument shapes land with the probes issue."""
