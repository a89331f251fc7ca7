"""structlog set-up: JSON lines carrying ``trace_id``/``span_id``, or a console view.

:func:`add_trace_context` is a structlog processor; any structlog chain can use it. The ids are
those of the span current where the log call runs, so a log line of a compile points at the
compile's span in the trace viewer.

structlog's configuration is process-wide; :func:`configure_logging` is for the entry point (the
CLI, an example script, a worker process's initializer), never for library code.

Unless the program configures structlog itself, the library is quiet: importing esper_async
routes structlog through the standard library's ``logging`` (``quiet_by_default``), under the
``esper_async`` logger, which has a ``NullHandler``. ``logging.basicConfig(level=logging.INFO)``
(or a handler on ``logging.getLogger("esper_async")``) shows its lines; :func:`configure_logging`
replaces the set-up with structlog's own output.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog
from opentelemetry import trace
from opentelemetry.trace import format_span_id, format_trace_id

__all__ = ("add_trace_context", "configure_logging", "quiet_by_default")


def add_trace_context(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: add ``trace_id`` and ``span_id`` (hex) of the current span.

    Nothing is added outside a span, and keys the caller set are kept.

    :param logger: the wrapped logger (unused).
    :param method_name: the log method's name (unused).
    :param event_dict: the event being logged.
    :returns: ``event_dict``.
    """
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format_trace_id(ctx.trace_id))
        event_dict.setdefault("span_id", format_span_id(ctx.span_id))
    return event_dict


def configure_logging(
    json: bool | None = None,
    *,
    level: int | str = logging.INFO,
    stream: TextIO | None = None,
    cache_loggers: bool = False,
) -> None:
    """Configure structlog for the process.

    :param json: ``True``: one JSON object per line; ``False``: coloured console output;
        ``None``: console when ``stream`` is a terminal, JSON otherwise.
    :param level: the lowest level written (``logging.INFO`` or ``"debug"`` ...).
    :param stream: where logs go; when omitted, whatever ``sys.stderr`` is at each write (so a
        later redirection of stderr, by a test runner or a notebook, is followed).
    :param cache_loggers: cache bound loggers on first use (faster; later reconfiguration
        does not reach loggers already used).
    :raises ValueError: when ``level`` is not a known level name.
    """
    out: TextIO = stream or cast(TextIO, _CurrentStderr())
    if isinstance(level, str):
        number = logging.getLevelName(level.upper())
        if not isinstance(number, int):
            raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
        level = number
    if json is None:
        json = not (out.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_context,
        structlog.processors.StackInfoRenderer(),
    ]
    if json:
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.UnicodeDecoder(),
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=cache_loggers,
    )


class _CurrentStderr:
    """A text stream that writes to whatever ``sys.stderr`` is when it is written to."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def quiet_by_default() -> None:
    """Route structlog through stdlib ``logging`` and silence the ``esper_async`` logger unless
    the program gives it a handler (called when esper_async is imported).

    Nothing changes when structlog is already configured (the program's set-up wins). Events
    below the stdlib logger's effective level are dropped before they are rendered.
    """
    logging.getLogger("esper_async").addHandler(logging.NullHandler())
    if structlog.is_configured():
        return
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.contextvars.merge_contextvars,
            add_trace_context,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
