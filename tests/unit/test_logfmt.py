"""The one log formatter: no forged lines, no element values from exception text."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from collections.abc import Iterator

import pydicom
import pytest
from pydicom.dataset import Dataset

from shared import logfmt
from shared.logfmt import CONTINUATION, SwitchyardFormatter, describe_exception, escape

SECRET = "Sentinel^Pätient"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger with the formatter installed, writing to a buffer."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    handler = logfmt.install("unit")
    out = io.StringIO()
    handler.setStream(out)
    yield out
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def _records(text: str) -> list[str]:
    """Lines that start a record (not continuation lines)."""
    return [ln for ln in text.splitlines() if not ln.startswith(CONTINUATION)]


def test_escape_controls() -> None:
    assert escape("a\nb\rc\x1b[31md\x00e\u2028f\x85g") == "a\\x0ab\\x0dc\\x1b[31md\\x00e\\u2028f\\x85g"
    assert escape("Müller ok") == "Müller ok"


def test_newline_in_message_and_args_cannot_forge_a_record(captured: io.StringIO) -> None:
    forged = "EVIL\n2026-01-01T00:00:00.000Z INFO    ingest x: forged"
    logging.getLogger("pynetdicom.acse").warning("calling AE %r rejected", forged)
    logging.getLogger("switchyard.x").error("raw\r\n%s", forged)
    lines = captured.getvalue().splitlines()
    assert len(lines) == 2
    assert all(" unit " in ln for ln in lines)
    assert "pynetdicom.acse: calling AE" in lines[0]
    assert "\\x0a2026-01-01" in lines[1]


def test_one_service_name_and_logger_per_line(captured: io.StringIO) -> None:
    logging.getLogger("aiohttp.access").warning("hello")
    (line,) = captured.getvalue().splitlines()
    assert line.split()[2:4] == ["unit", "aiohttp.access:"]
    assert line.count(" unit ") == 1


def _pydicom_value_error() -> BaseException:
    ds = Dataset()
    ds.PatientID = "x"
    try:
        # A DA value that is not a date: pydicom's text names the value.
        ds.PatientBirthDate = pydicom.valuerep.DA(SECRET)  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001
        return exc
    try:
        pydicom.valuerep.IS(SECRET)  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("pydicom accepted the value")


def test_pydicom_exception_logged_by_type_not_message(captured: io.StringIO) -> None:
    exc = _pydicom_value_error()
    assert SECRET in str(exc)  # the case this guards against
    try:
        raise exc
    except Exception:
        logging.getLogger("switchyard.ingest").exception("store failed")
    text = captured.getvalue()
    assert SECRET not in text
    assert type(exc).__name__ in text
    assert "Traceback" in text


def test_wrapper_copying_its_pydicom_cause_is_withheld(captured: io.StringIO) -> None:
    class NotDicom(ValueError):
        pass

    cause = _pydicom_value_error()
    try:
        try:
            raise cause
        except Exception as inner:
            raise NotDicom(str(inner)) from inner
    except NotDicom as outer:
        logging.getLogger("switchyard.ingest").warning("refused: %s", outer)
        logging.getLogger("switchyard.ingest").exception("refused")
    text = captured.getvalue()
    assert SECRET not in text
    assert "NotDicom" in text
    assert "direct cause" in text


def test_bytes_length_exception_keeps_the_tag() -> None:
    from pydicom.errors import BytesLengthException

    exc = BytesLengthException(
        f"Expected total bytes to be an even multiple of bytes per value. "
        f"Instead received b'{SECRET}' with length 17 and struct format 'H' "
        f"for tag (0010, 0020)"
    )
    text = describe_exception(exc)
    assert SECRET not in text
    assert text.startswith("BytesLengthException (tag (0010,0020))")


def test_other_exceptions_keep_their_escaped_message() -> None:
    assert describe_exception(OSError(28, "No space left")) == "OSError: [Errno 28] No space left"
    assert describe_exception(RuntimeError("a\nb")) == "RuntimeError: a\\x0ab"


def test_traceback_continuations_and_exception_group(captured: io.StringIO) -> None:
    try:
        raise ExceptionGroup("two", [RuntimeError("one\nline"), _pydicom_value_error()])  # type: ignore[type-var]
    except ExceptionGroup:
        logging.getLogger("x").exception("group")
    text = captured.getvalue()
    assert len(_records(text)) == 1
    assert SECRET not in text
    assert "RuntimeError: one\\x0aline" in text


def test_json_subclass_reuses_fields() -> None:
    import json

    class JsonFormatter(SwitchyardFormatter):
        def format(self, record: logging.LogRecord) -> str:
            return json.dumps(self.format_fields(record))

    record = logging.LogRecord("a.b", logging.INFO, __file__, 1, "x %s", ("y\n",), None)
    fields = json.loads(JsonFormatter("svc").format(record))
    assert fields["message"] == "x y\\x0a" and fields["service"] == "svc" and fields["logger"] == "a.b"


def test_pynetdicom_records_go_through_the_root_formatter() -> None:
    """In a fresh process: pynetdicom imported after install, its own handlers do not print raw."""
    code = (
        "import logging; from shared.telemetry import setup_logging; setup_logging('svc');"
        "import pynetdicom, aiohttp.web;"
        "logging.getLogger('pynetdicom.assoc').error('AE %s', 'A\\nB');"
        "logging.getLogger('aiohttp.server').error('req %s', 'GET /?patient_id=1\\r\\nX')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    lines = out.stderr.splitlines()
    assert len(lines) == 2, out.stderr
    assert all(" svc " in ln for ln in lines)


def test_uncaught_exception_goes_through_the_formatter() -> None:
    code = (
        "from shared.telemetry import setup_logging; setup_logging('svc');"
        "import pydicom.valuerep; pydicom.valuerep.IS('Sentinel^P\\u00e4tient\\nforged')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "Sentinel" not in out.stderr
    records = _records(out.stderr)
    assert all(" svc " in r for r in records), out.stderr  # pydicom's own warning too, not raw
    assert records[-1].split()[1:4] == ["CRITICAL", "svc", "switchyard.crash:"], out.stderr


def test_own_logger_names_the_service_once(captured: io.StringIO) -> None:
    logging.getLogger("switchyard.unit.scp").info("stored")
    logging.getLogger("switchyard.unit").info("up")
    logging.getLogger("nats").info("library")
    lines = captured.getvalue().splitlines()
    assert [ln.split(None, 2)[2] for ln in lines] == ["unit.scp: stored", "unit: up", "unit nats: library"]
    assert all(ln.count("unit") == 1 for ln in lines)


def test_service_loggers_follow_one_naming_scheme() -> None:
    """Every service logger is ``switchyard.<service>[.<module>]``, so the formatter prints the service once."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "services"
    bad = []
    for path in root.rglob("*.py"):
        service = path.relative_to(root).parts[0]
        for name in re.findall(r"getLogger\(([^)]*)\)", path.read_text()):
            if not name.startswith(f'"switchyard.{service}'):
                bad.append(f"{path.relative_to(root)}: {name}")
    assert not bad, bad
