"""Structured logs: one JSON object per line on stderr, carrying the run, step and attempt in scope.

Code that works on a run binds it once (`with log_context(run_id=..., step_id=..., attempt=...)`);
every record logged inside, in that task, carries those fields without passing them around.
Both services log through `configure_logging`, so their lines have one shape:
`{"ts": ..., "level": ..., "logger": ..., "msg": ..., "run_id": ..., "step_id": ..., "attempt": ...}`.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import sys
import time
from typing import Any

_CONTEXT: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("keel_log_context", default={})  # noqa: B039
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def log_context(**fields: Any) -> LogContext:
    """Add fields (run_id, step_id, attempt, ...) to every record logged in this block."""
    return LogContext(fields)


class LogContext:
    """`log_context`'s block: a class rather than a generator, since every step attempt enters one."""

    __slots__ = ("_fields", "_token")

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields

    def __enter__(self) -> None:
        fields = self._fields
        self._token = _CONTEXT.set({**_CONTEXT.get(), **{k: v for k, v in fields.items() if v is not None}})

    def __exit__(self, *_: object) -> None:
        _CONTEXT.reset(self._token)


def bind_log_fields(**fields: Any) -> None:
    """Add fields to every record logged from here on in the current task (for a task's first line).

    A task runs in its own copy of the context, so this binds for the rest of that task only;
    use `log_context` for a block.
    """
    _CONTEXT.set({**_CONTEXT.get(), **{k: v for k, v in fields.items() if v is not None}})


@functools.lru_cache(maxsize=1)
def _second(epoch_seconds: int) -> str:
    """The UTC time of `epoch_seconds` in ISO 8601, to the second (the lines of one second share it)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_seconds))


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, message, context fields and extras."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object on one line."""
        entry: dict[str, Any] = {
            "ts": f"{_second(int(record.created))}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_CONTEXT.get(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info", *, json_lines: bool = True) -> None:
    """Send the root logger's records to stderr, as JSON lines unless `json_lines` is False.

    Records leave out what no line shows: the caller's file and line (a look up the stack per
    record), the thread and the process (as the logging HOWTO's "Optimization" section says).
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    plain = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JsonFormatter() if json_lines else plain)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
