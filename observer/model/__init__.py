"""State, reference model and invariants: pure, no I/O. Snapshots and events in, anomalies out."""
