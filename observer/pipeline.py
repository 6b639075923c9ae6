"""Source → model → anomalies: the same model for `run` (the live source) and `replay` (a trace
file), so that replaying what `run --record` wrote reports what `run` reported."""

from .formats import RecordError
from .model.model import Model
from .trace import TraceError, read_trace_lines


def replay(path):
    """(the anomalies a trace makes known, in order; the Model at its end). TraceError names the
    file and line of a record the model cannot read."""
    model = Model()
    found = []
    lineno = 0
    feed = model.feed
    for lineno, rec in read_trace_lines(path):
        try:
            said = feed(rec)
        except (RecordError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise TraceError(path, lineno, f"{rec['type']} record the model cannot read: "
                                           f"{type(e).__name__}: {e}") from None
        if said:
            found += said
    try:
        found += model.finish()
    except (RecordError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise TraceError(path, lineno, f"a snapshot record the model cannot read: "
                                       f"{type(e).__name__}: {e}") from None
    if model.header is None:
        raise TraceError(path, 0, "empty: no trace header")
    return found, model
