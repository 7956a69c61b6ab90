"""structlog set-up: JSON with a syslog priority under journald, readable on a tty.

The stdlib loggers (libvirt-python, dbus-next, asyncio) go through the same
processors, so every line kdlabd writes has one format.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

# sd-daemon(3): "<N>" at the start of a line sets its priority in the journal.
_SYSLOG_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
_JSON = structlog.processors.JSONRenderer(sort_keys=True)


def _prefix_priority(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> str:
    priority = _SYSLOG_PRIORITY.get(str(event_dict.get("level")), 6)
    return f"<{priority}>{_JSON(_logger, _method, event_dict)!s}"


def configure(log_format: str = "auto", level: int = logging.INFO) -> None:
    """Send kdlabd's logs to stderr in the format that suits where stderr goes."""
    if log_format == "auto":
        under_journal = bool(os.environ.get("JOURNAL_STREAM"))
        log_format = "json" if under_journal or not sys.stderr.isatty() else "console"
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if log_format == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = _prefix_priority
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
