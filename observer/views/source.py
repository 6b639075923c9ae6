"""Where the readers get their text from, and the one error they raise."""

import os


class ViewError(Exception):
    """A kernel view that cannot be read or parsed: names the file and, when known, the line."""

    def __init__(self, path, message, line=None):
        self.path = path
        self.line = line
        self.message = message
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


def view_path(root, relpath):
    """The path of a kernel file under root (relpath is absolute as the kernel names it)."""
    return os.path.join(root, relpath.lstrip("/"))


def read_view(root, relpath):
    """The whole text of one kernel file under root, or ViewError saying why not."""
    path = view_path(root, relpath)
    try:
        with open(path, encoding="ascii", errors="strict") as f:
            return f.read()
    except FileNotFoundError:
        raise ViewError(path, "missing") from None
    except PermissionError:
        raise ViewError(path, "permission denied") from None
    except UnicodeDecodeError as e:
        raise ViewError(path, f"not ASCII text (byte {e.start})") from None
    except OSError as e:
        raise ViewError(path, e.strerror or str(e)) from None
