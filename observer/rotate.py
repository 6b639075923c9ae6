"""Size rotation shared by the daemon's files (the anomaly journal, the --record trace): PATH
moves to PATH.1, PATH.1 to PATH.2, … PATH.KEEP-1 to PATH.KEEP (the oldest beyond it goes)."""

import os


def rotate(path, keep):
    for n in range(keep - 1, 0, -1):
        if os.path.exists(f"{path}.{n}"):
            os.replace(f"{path}.{n}", f"{path}.{n + 1}")
    os.replace(path, f"{path}.1")
