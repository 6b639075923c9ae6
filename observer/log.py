"""The lines `run` and `record` say on stderr, "memhp-observer: " and the sentence, as Python's
logging.basicConfig would print them: logging itself is not imported, since with traceback,
linecache and tokenize it was a quarter of a second of the daemon's start under TCG. One write
per line, so that threads never interleave within one."""

import sys


def info(message, *args):
    sys.stderr.write(f"memhp-observer: {message % args if args else message}\n")
    sys.stderr.flush()


warning = error = info   # one stream for all: the sentence says what happened
