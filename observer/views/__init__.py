"""One pure reader per kernel file. Each takes a root directory ("/" for the live host, or a
captured or generated tree with the same layout) and returns typed values or raises ViewError."""
