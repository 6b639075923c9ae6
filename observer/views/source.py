"""Where the readers get their text from, and the one error they raise."""

import os
import stat

# The kernel's own views stay far below this: a sysfs attribute is at most a page, and
# /proc/zoneinfo on a 1024-CPU, 8-node machine is a few MiB. Anything larger is not a view.
MAX_VIEW_BYTES = 64 << 20
EXCERPT_CHARS = 80


class ViewError(Exception):
    """A kernel view that cannot be read or parsed: names the file and, when known, the line."""

    def __init__(self, path, message, line=None):
        self.path = path
        self.line = line
        self.message = message
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


def excerpt(text):
    """A line of input quoted in an error message, cut short: never echo a huge line back."""
    return repr(text) if len(text) <= EXCERPT_CHARS else repr(text[:EXCERPT_CHARS]) + "..."


def view_lines(text):
    """The lines as the kernel wrote them: split on newline only (str.splitlines also splits on
    form feeds and other separators, which would put every later line number off)."""
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def view_path(root, relpath):
    """The path of a kernel file under root (relpath is absolute as the kernel names it)."""
    return os.path.join(root, relpath.lstrip("/"))


def read_view(root, relpath, limit=MAX_VIEW_BYTES):
    """The whole text of one kernel file under root, or ViewError saying why not."""
    path = view_path(root, relpath)
    data = read_file(path, limit)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as e:
        raise ViewError(path, f"not ASCII text (byte {e.start})") from None


def read_file(path, limit=MAX_VIEW_BYTES):
    """The bytes of one regular file (procfs and sysfs files are regular), at most `limit` of
    them, or ViewError: a FIFO or a device such as /dev/zero in a captured tree is refused,
    never waited on or read forever."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ViewError(path, "missing") from None
    except PermissionError:
        raise ViewError(path, "permission denied") from None
    except OSError as e:
        raise ViewError(path, e.strerror or str(e)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ViewError(path, f"not a regular file ({_file_kind(mode)})")
        data = bytearray()
        while len(data) <= limit:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            data += chunk
        if len(data) > limit:
            raise ViewError(path, f"larger than {limit} bytes: not a kernel view")
        return bytes(data)
    except OSError as e:
        raise ViewError(path, e.strerror or str(e)) from None
    finally:
        os.close(fd)


def _file_kind(mode):
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"
