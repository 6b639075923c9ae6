"""Where trace records come from: the live kernel (live.py) or a trace file (trace.py)."""
