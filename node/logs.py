"""structlog JSON logging, PHI-free by construction.

`configure_logging(level)` sets structlog to emit one JSON object per line on stderr, each line in one write (so
processes sharing stderr never interleave within a line), and routes the stdlib loggers (pynetdicom, apscheduler,
SQLAlchemy, dicomweb-client) through the same renderer, those libraries' only from WARNING.
`get_logger(**context)` returns a bound logger. A processor drops any key that names a patient-identifying
attribute, so a careless call site cannot leak one: events carry UIDs, AE titles and sizes, never patient name, ID
or birth date. pydicom and highdicom quote the values they complain about ("Invalid value for VR IS: 'DOE'",
highdicom's single-component person name warning): their lines, and Python warnings (captured into the log as JSON,
never raw lines on stderr), keep the complaint with every quoted part removed (`unquoted`).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

PHI_KEYS = frozenset(
    {
        "patient_name", "patientname", "patient_id", "patientid", "patient_birth_date", "patientbirthdate",
        "birth_date", "birthdate", "other_patient_ids", "patient_address", "accession_number", "accessionnumber",
        "referring_physician_name", "institution_name",
    }
)


# Loggers whose messages quote header values: pydicom's warn_and_log (which also `warnings.warn`s the same text),
# highdicom, and Python warnings (py.warnings: highdicom warns with a person name in it).
_VALUE_QUOTING_LOGGERS = frozenset({"pydicom", "highdicom", "py.warnings"})
_QUOTES = re.compile(r"""['"]""")


def unquoted(text: str) -> str:
    """``text`` with everything from its first quote character to its last (or to the end, for a lone one)
    replaced by ``[removed]``: whatever a library quoted, and any quote inside the value, goes with it."""
    marks = [m.start() for m in _QUOTES.finditer(text)]
    if not marks:
        return text
    end = marks[-1] + 1 if len(marks) > 1 else len(text)
    return f"{text[: marks[0]]}[removed]{text[end:]}"


class _LibraryValues(logging.Filter):
    """Rewrites the records of `_VALUE_QUOTING_LOGGERS` before they are rendered: their message `unquoted`, and an
    attached exception reduced to its type (its message may quote a value too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in _VALUE_QUOTING_LOGGERS or record.name.split(".")[0] in _VALUE_QUOTING_LOGGERS:
            text = unquoted(record.getMessage().strip())
            if record.exc_info and record.exc_info[0] is not None:
                text += f" ({record.exc_info[0].__name__})"
            record.msg, record.args, record.exc_info, record.exc_text = text, None, None, None
        return True


def _drop_phi(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in [k for k in event_dict if k.lower() in PHI_KEYS]:
        event_dict[key] = "[removed]"
    return event_dict


_dropped_lock = threading.Lock()
_dropped = 0
_on_dropped: Callable[[], None] | None = None


def on_dropped_line(callback: Callable[[], None] | None) -> None:
    """Call ``callback`` (a metric's increment) for each log line a failing stream dropped."""
    global _on_dropped
    _on_dropped = callback


def dropped_lines() -> int:
    """Log lines dropped by this process because their stream failed (full disk, closed pipe)."""
    return _dropped


class _SafeWriteLogger(structlog.WriteLogger):
    """structlog's WriteLogger, except that a failing stream drops the line instead of raising into the caller: a
    full log disk made a listener answer a C-STORE it had stored and indexed with a failure status (found by
    review), so the sender stopped the series. Dropped lines are counted (`on_dropped_line`)."""

    def msg(self, message: str) -> None:
        global _dropped
        try:
            super().msg(message)
        except (OSError, ValueError):  # ValueError: the stream was closed
            with _dropped_lock:
                _dropped += 1
            if (callback := _on_dropped) is not None:
                callback()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _SafeWriteLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _SafeWriteLogger:
        return _SafeWriteLogger(self._file)


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """Configure structlog and stdlib logging for JSON lines on ``stream`` (stderr by default)."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_phi,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # one write per line (print() writes the newline apart): with PYTHONUNBUFFERED (the Docker image) the
        # role processes sharing stderr would otherwise glue each other's lines together
        logger_factory=_SafeWriteLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    handler.addFilter(_LibraryValues())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Python warnings go through the handler (JSON, values removed), not to stderr as raw text; pydicom's are
    # dropped there, as its warn_and_log logs each one already (logger "pydicom").
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")
    # highdicom's note on a source's single-component PatientName: one line per patient, nothing to act on
    warnings.filterwarnings("ignore", message="The string .* is unlikely to represent the intended person name",
                            category=UserWarning)
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at DEBUG/INFO; only its warnings matter to an operator. dicomweb-client logs each
    # request's URL (with a user:password in it) and headers at DEBUG: never credentials in the logs.
    for noisy in ("pynetdicom", "apscheduler", "sqlalchemy", "alembic", "h5py", "tensorflow", "absl",
                  "dicomweb_client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(**context: Any) -> Any:
    """A structlog logger bound to ``context`` (UIDs, calling AE, job id ...)."""
    return structlog.get_logger("pacsnode").bind(**context)
