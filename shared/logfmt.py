"""The one log formatter every Switchyard process installs on its root logger.

Two promises, for every logger in the process (ours, pynetdicom's, aiohttp's):

* No record can forge another: control characters in the message, its
  arguments and exception text are escaped (``\\n`` -> ``\\x0a``); a record's
  first line starts with its timestamp and every further line (a traceback)
  starts with ``CONTINUATION``.
* No DICOM element value reaches a log through an exception's text. An
  exception that may carry input values (``value_bearing``: raised by
  pydicom, or by an HTTP parser on a malformed request, or by code under
  such a module, or caused by such an exception) is printed as its type
  name plus the DICOM tag its message names, never ``str(exc)``. The rule
  applies to exceptions passed as ``%s`` arguments too.

``format_fields`` returns the pieces of a record as a dict: a JSON variant
subclasses the formatter and serialises the same, already-sanitised fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import traceback
import warnings
from types import TracebackType
from typing import Any, TextIO

from opentelemetry import trace

# Where an exception's text may hold bytes from the wire or a file (element
# values, request lines): such exceptions are logged by type and tag only.
VALUE_BEARING_MODULES: tuple[str, ...] = (
    "pydicom",
    "pynetdicom.dsutils",
    "aiohttp.http_exceptions",
    "aiohttp.http_parser",
    "aiohttp._http_parser",
    "aiohttp.web_protocol",
)

CONTINUATION = "    | "

_TAG = re.compile(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)")
# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u0085]")


def escape(text: str) -> str:
    """Make ``text`` safe to print on one log line: control characters as ``\\xNN``/``\\uNNNN``."""

    def sub(m: re.Match[str]) -> str:
        c = ord(m.group())
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"

    return _CONTROL.sub(sub, text)


def _in_modules(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in VALUE_BEARING_MODULES)


def _raised_in_modules(tb: TracebackType | None) -> bool:
    while tb is not None:
        if _in_modules(str(tb.tb_frame.f_globals.get("__name__", ""))):
            return True
        tb = tb.tb_next
    return False


def value_bearing(exc: BaseException, _seen: set[int] | None = None) -> bool:
    """True if the text of ``exc`` may carry input values (see the module docstring)."""
    seen = _seen if _seen is not None else set()
    if id(exc) in seen:
        return False
    seen.add(id(exc))
    if _in_modules(type(exc).__module__) or _raised_in_modules(exc.__traceback__):
        return True
    # A wrapper often copies its cause's text (``raise NotDicom(str(exc)) from exc``).
    for inner in (exc.__cause__, exc.__context__):
        if inner is not None and value_bearing(inner, seen):
            return True
    return False


def describe_exception(exc: BaseException) -> str:
    """``TypeName: message`` (escaped), or ``TypeName (tag (gggg,eeee))`` for a value-bearing one."""
    name = type(exc).__qualname__
    if value_bearing(exc):
        return f"{name} {_withheld(_safe_str(exc))}"
    text = _safe_str(exc)
    return escape(f"{name}: {text}" if text else name)


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not break logging
        return "<unprintable>"


def _chain(exc: BaseException) -> list[tuple[BaseException, str]]:
    """The exception and what it came from, oldest first, as Python prints them."""
    out: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        out.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, "The above exception was the direct cause of the following exception:"
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "During handling of the above exception, another exception occurred:"
        else:
            current = None
    out.reverse()
    # Each link sentence belongs before the exception that follows its cause.
    return [(e, out[i - 1][1] if i else "") for i, (e, _) in enumerate(out)]


def format_exception_lines(exc: BaseException) -> list[str]:
    """A traceback as escaped lines, each exception described by ``describe_exception``."""
    lines: list[str] = []
    for current, link in _chain(exc):
        if link:
            lines.append(link)
        if current.__traceback__ is not None:
            lines.append("Traceback (most recent call last):")
            for chunk in traceback.format_tb(current.__traceback__):
                lines.extend(escape(part) for part in chunk.rstrip("\n").split("\n"))
        lines.append(describe_exception(current))
        if isinstance(current, BaseExceptionGroup):
            for i, sub in enumerate(current.exceptions[:10], 1):
                lines.append(f"  sub-exception {i}: {describe_exception(sub)}")
    return lines


def _sanitise_arg(arg: object) -> object:
    return describe_exception(arg) if isinstance(arg, BaseException) else arg


def _withheld(text: str) -> str:
    tags = sorted({f"({g.upper()},{e.upper()})" for g, e in _TAG.findall(text)})
    suffix = f" (tag {', '.join(tags)})" if tags else ""
    return f"{suffix.lstrip()} [message withheld: may hold element values]".lstrip()


def render_message(record: logging.LogRecord) -> str:
    """The record's message with exception arguments described, escaped onto one line.

    A record logged by a value-bearing library itself (pydicom warns with the
    offending value in the text) keeps only the tags its text names.
    """
    if _in_modules(record.name):
        try:
            return _withheld(record.getMessage())
        except Exception:  # noqa: BLE001
            return _withheld("")
    args: Any = record.args
    if isinstance(args, tuple):
        if any(isinstance(a, BaseException) for a in args):
            args = tuple(_sanitise_arg(a) for a in args)
    elif isinstance(args, dict):
        args = {k: _sanitise_arg(v) for k, v in args.items()}
    msg = (
        record.msg
        if isinstance(record.msg, str)
        else (describe_exception(record.msg) if isinstance(record.msg, BaseException) else str(record.msg))
    )
    if args:
        try:
            msg = msg % args
        except (TypeError, ValueError, KeyError):
            msg = f"{msg} {args!r}"
    return escape(msg)


class SwitchyardFormatter(logging.Formatter):
    """``time LEVEL source: message`` (source: see ``source``); a traceback follows on ``CONTINUATION`` lines."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = escape(service)
        self._second, self._stamp = -1, ""

    def format_fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """The record's sanitised fields: what any rendering (text, JSON) may print."""
        second = int(record.created)
        if second != self._second:  # strftime once per second, not per record
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        fields: dict[str, Any] = {
            "time": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": escape(record.name),
            "message": render_message(record),
        }
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            fields["exception"] = format_exception_lines(exc)
        if record.stack_info:
            fields["stack"] = [escape(line) for line in record.stack_info.splitlines()]
        return fields

    def format(self, record: logging.LogRecord) -> str:
        f = self.format_fields(record)
        line = f"{f['time']} {f['level']:<7} {self.source(f['logger'])}: {f['message']}"
        extra = f.get("exception", []) + f.get("stack", [])
        return "\n".join([line, *(CONTINUATION + x for x in extra)])

    def source(self, logger: str) -> str:
        """The service named once: ``ingest.scp`` for ``switchyard.ingest.scp``, else ``ingest nats``."""
        own = f"switchyard.{self.service}"
        if logger == own or logger.startswith(own + "."):
            return logger.removeprefix("switchyard.")
        return f"{self.service} {logger}"

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        """For any handler that asks the formatter directly: the same sanitised lines."""
        exc = ei[1] if ei else None
        return "\n".join(format_exception_lines(exc)) if exc is not None else ""


class JsonFormatter(SwitchyardFormatter):
    """One JSON object per line: the same sanitised fields, plus ``trace_id``/``span_id`` of the active span.

    Logs and traces join on ``trace_id`` (Grafana's derived fields, Loki).
    """

    def format(self, record: logging.LogRecord) -> str:
        fields = self.format_fields(record)
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            fields["trace_id"] = f"{ctx.trace_id:032x}"
            fields["span_id"] = f"{ctx.span_id:016x}"
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


FORMATTERS: dict[str, type[SwitchyardFormatter]] = {"text": SwitchyardFormatter, "json": JsonFormatter}


def install(service: str, level: str = "INFO", log_format: str = "text") -> logging.StreamHandler[TextIO]:
    """Replace the root logger's handlers with one stderr handler using SwitchyardFormatter
    (or JsonFormatter for ``log_format="json"``).

    Every logger propagates to the root, so this formats pynetdicom's and
    aiohttp's records too; libraries that add their own handlers (pynetdicom
    does, on import) are stripped of them so their records are not printed raw.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    if log_format not in FORMATTERS:
        raise ValueError(f"log format {log_format!r}: text or json")
    handler.setFormatter(FORMATTERS[log_format](service))
    root.addHandler(handler)
    root.setLevel(level.upper())
    _route_uncaught()
    for name in ("pynetdicom", "aiohttp", "aiohttp.access", "aiohttp.server", "aiohttp.web", "asyncio", "nats"):
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            if not isinstance(h, logging.NullHandler):
                lib.removeHandler(h)
        lib.propagate = True
    return handler


def _route_uncaught() -> None:
    """Uncaught exceptions (main thread and threads) go through the formatter, not raw to stderr."""
    crash = logging.getLogger("switchyard.crash")

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        crash.critical("stopped by an unhandled %s", exc_type.__qualname__, exc_info=(exc_type, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or issubclass(args.exc_type, SystemExit):
            return
        name = args.thread.name if args.thread is not None else "?"
        crash.critical(
            "thread %s stopped by an unhandled %s",
            name,
            args.exc_type.__qualname__,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    sys.excepthook = hook
    threading.excepthook = thread_hook
    warnings.showwarning = _show_warning


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Warnings become records of ``py.warnings``; one raised inside a value-bearing library is withheld."""
    where = filename.replace("\\", "/")
    text = str(message)
    if any(f"/{m.split('.')[0]}/" in where for m in VALUE_BEARING_MODULES):
        text = _withheld(text)
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, text)
