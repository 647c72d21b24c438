"""``switchyard send PATH...``: C-STORE files and folders to an SCP, each acknowledged or named.

The SCU is shared.ul's asyncio requestor (the forwarder's, TCP_NODELAY set),
not pynetdicom: one association carries the files, its presentation contexts
taken from the files' own SOP classes and transfer syntaxes (the bytes after
the file meta are sent as they are, never re-encoded). Out-of-resources
statuses (0xA7xx) and lost associations are retried with backoff; anything
else the SCP refuses is reported with its status and meaning. Lines name the
file and the status only, never a value from inside it.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from shared import ul
from shared.dicomfile import dataset_offset
from switchyard.progress import Progress

# At most this many presentation contexts per association (the standard allows 128).
MAX_CONTEXTS = 120
# What we announce we can receive: responses only.
RECEIVE_PDU = 16384

OK, WARNING, REFUSED, FAILED = "ok", "warning", "refused", "failed"

# Status -> meaning; a range (high byte) when the exact code is not listed.
MEANINGS = {
    0x0000: "success",
    0x0001: "warning: requested optional attributes are not supported",
    0x0107: "warning: attribute list error",
    0x0116: "warning: attribute value out of range",
    0xB000: "warning: coercion of data elements",
    0xB006: "warning: elements discarded",
    0xB007: "warning: data set does not match SOP class",
    0x0110: "refused: processing failure",
    0x0117: "refused: invalid object instance",
    0x0122: "refused: SOP class not supported",
    0x0124: "refused: not authorized",
    0x0211: "refused: unrecognized operation",
    0x0213: "refused: resource limitation",
    0xC000: "refused: cannot understand (retrying the same file will not help)",
    0xC001: "refused: SOP instance UID differs from the command's (retrying will not help)",
    0xC002: "refused: object too large for this SCP (retrying will not help)",
}


def meaning(status: int) -> str:
    if status in MEANINGS:
        return MEANINGS[status]
    high = status >> 8
    if high == 0xA7:
        return "refused: out of resources (a later retry may help)"
    if high == 0xA9:
        return "refused: data set does not match SOP class (retrying will not help)"
    if high >> 4 == 0xC:
        return "refused: cannot understand (retrying will not help)"
    if high == 0xB0:
        return "warning"
    return "refused: failure"


def outcome_of(status: int) -> str:
    if status == 0x0000:
        return OK
    if status in (0x0001, 0x0107, 0x0116) or status >> 12 == 0xB:
        return WARNING
    return REFUSED


@dataclass
class Item:
    path: Path
    sop_class: str = ""
    sop_instance: str = ""
    transfer_syntax: str = ""
    offset: int = 0
    size: int = 0
    status: int | None = None
    outcome: str = ""
    detail: str = ""
    tries: int = 0  # 0xA7xx answers retried
    losses: int = 0  # associations lost while this file was in flight

    @property
    def context(self) -> tuple[str, str]:
        return (self.sop_class, self.transfer_syntax)


@dataclass
class Options:
    host: str
    port: int
    called_ae: str
    calling_ae: str = "SWITCHYARD_SCU"
    tls: ssl.SSLContext | None = None
    retries: int = 3
    backoff_s: float = 0.5
    timeout_s: float = 30.0
    quiet: bool = False


@dataclass
class Summary:
    items: list[Item] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, outcome: str) -> int:
        return sum(1 for i in self.items if i.outcome == outcome)

    @property
    def sent(self) -> int:
        """C-STOREs the SCP answered (whatever the status)."""
        return sum(1 for i in self.items if i.status is not None)

    @property
    def all_acknowledged(self) -> bool:
        return bool(self.items) and all(i.outcome in (OK, WARNING) for i in self.items)

    def line(self) -> str:
        rate = len(self.items) / self.seconds if self.seconds else 0.0
        return (
            f"send: {len(self.items)} files: sent {self.sent}, ok {self.count(OK)}, warning {self.count(WARNING)}, "
            f"refused {self.count(REFUSED)}, failed {self.count(FAILED)} in {self.seconds:.1f}s ({rate:.1f} files/s)"
        )


def find_files(paths: Iterable[str | Path]) -> list[Path]:
    """Every regular file under ``paths`` (folders recursively, hidden files too), in a stable order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                out.extend(Path(root) / f for f in sorted(files))
        else:
            out.append(p)
    return out


def inspect(path: Path) -> Item:
    """The file's SOP class, instance, transfer syntax (file meta) and where its dataset starts."""
    from pydicom.filereader import read_file_meta_info

    item = Item(path)
    try:
        meta = read_file_meta_info(path)
        with open(path, "rb") as f:
            item.offset = dataset_offset(f)
        item.size = path.stat().st_size - item.offset
    except OSError as exc:
        item.outcome, item.detail = FAILED, f"cannot read the file ({type(exc).__name__})"
        return item
    except Exception as exc:  # noqa: BLE001 - by type only: pydicom's text can quote values
        item.outcome, item.detail = FAILED, f"not a DICOM Part 10 file ({type(exc).__name__})"
        return item
    item.sop_class = str(meta.get("MediaStorageSOPClassUID", "")).strip()
    item.sop_instance = str(meta.get("MediaStorageSOPInstanceUID", "")).strip()
    item.transfer_syntax = str(meta.get("TransferSyntaxUID", "")).strip()
    if not (item.sop_class and item.sop_instance and item.transfer_syntax):
        item.outcome, item.detail = FAILED, "file meta lacks SOP class, SOP instance or transfer syntax"
    return item


def groups(items: list[Item]) -> list[list[Item]]:
    """Consecutive runs of files whose distinct contexts fit one association."""
    out: list[list[Item]] = []
    current: list[Item] = []
    contexts: set[tuple[str, str]] = set()
    for item in items:
        if item.context not in contexts and len(contexts) >= MAX_CONTEXTS:
            out.append(current)
            current, contexts = [], set()
        contexts.add(item.context)
        current.append(item)
    if current:
        out.append(current)
    return out


def line_for(item: Item) -> str:
    code = f"0x{item.status:04X}" if item.status is not None else "------"
    text = meaning(item.status) if item.status is not None else f"failed: {item.detail}"
    if item.status is not None and item.detail:
        text += f" ({item.detail})"
    return f"{item.path}: {code} {text}"


# Errors that end an association without an answer for the file in flight.
WIRE_ERRORS = (OSError, TimeoutError, asyncio.IncompleteReadError, ul.ProtocolError)


class Sender:
    def __init__(self, opts: Options, progress: Progress, out: IO[str], stop: threading.Event | None = None) -> None:
        self.opts, self.progress, self.out = opts, progress, out
        self.stop = stop
        self.position = 0  # the next file of the group being sent

    @property
    def stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def backoff(self, attempt: int) -> float:
        return min(self.opts.backoff_s * 2 ** (attempt - 1), 10.0)

    def finish(self, item: Item, outcome: str, status: int | None = None, detail: str = "") -> None:
        item.outcome, item.status, item.detail = outcome, status, detail
        if not (self.opts.quiet and outcome == OK):
            self.progress.echo(line_for(item), self.out)
        self.progress.advance()

    async def connect(self, contexts: list[tuple[str, str]]) -> ul.Association:
        o = self.opts
        return await ul.Association.request(
            o.host, o.port, o.calling_ae, o.called_ae, contexts, RECEIVE_PDU, o.timeout_s, ssl=o.tls
        )

    async def send_group(self, group: list[Item]) -> None:
        """Associate (again after a loss) until every file of ``group`` has its outcome.

        Association failures in a row are retried ``retries`` times, then the rest of the
        group fails; a file in flight when an association was lost is sent again, and fails
        alone once it was in flight for ``retries`` + 1 losses (a file the SCP aborts on
        must not take the files after it down).
        """
        contexts = list(dict.fromkeys(i.context for i in group))
        self.position, failures = 0, 0
        while self.position < len(group):
            if self.stopping:
                for item in group[self.position :]:
                    self.finish(item, FAILED, detail="not sent: stopped")
                return
            try:
                assoc = await self.connect(contexts)
            except ul.Rejected as exc:
                if exc.result == 1:  # permanent: the same request will be rejected again
                    for item in group[self.position :]:
                        self.finish(item, FAILED, detail=f"association rejected permanently ({exc})")
                    return
                reason: str = str(exc)
            except WIRE_ERRORS as exc:
                # Unreachable chains the cause: refused, timed out, or a TLS handshake that failed.
                reason = f"association failed ({type(exc.__cause__ or exc).__name__})"
            else:
                failures = 0
                try:
                    await self.store_on(assoc, group)
                    await assoc.close()
                    continue
                except WIRE_ERRORS as exc:
                    await assoc.close(abort=True)
                    item = group[self.position]
                    item.losses += 1
                    reason = f"association lost while sending {item.path.name} ({type(exc).__name__})"
                    if item.losses > self.opts.retries:
                        self.finish(item, FAILED, detail=f"{reason}, {item.losses} times")
                        self.position += 1
                        continue
                    wait = self.backoff(item.losses)
                    self.progress.echo(f"send: {reason}; sending it again in {wait:.1f}s", sys.stderr)
                    await asyncio.sleep(wait)
                    continue
            failures += 1
            if failures > self.opts.retries:
                for item in group[self.position :]:
                    self.finish(item, FAILED, detail=f"{reason}; gave up after {self.opts.retries} retries")
                return
            self.progress.echo(
                f"send: {reason}; retry {failures}/{self.opts.retries} in {self.backoff(failures):.1f}s", sys.stderr
            )
            await asyncio.sleep(self.backoff(failures))

    async def store_on(self, assoc: ul.Association, group: list[Item]) -> None:
        """C-STORE group[position:] on one association, advancing ``position`` as files get their outcome."""
        while self.position < len(group) and not self.stopping:
            item = group[self.position]
            context_id = assoc.accepted.get(item.context)
            if context_id is None:
                self.finish(item, REFUSED, detail="presentation context (SOP class, transfer syntax) not accepted")
                self.position += 1
                continue
            try:
                f = open(item.path, "rb")  # noqa: SIM115 - closed below; an open failure is the file's alone
            except OSError as exc:
                self.finish(item, FAILED, detail=f"cannot read the file ({type(exc).__name__})")
                self.position += 1
                continue
            with f:
                f.seek(item.offset)
                status = await assoc.c_store(context_id, item.sop_class, item.sop_instance, f, item.size)
            if status >> 8 == 0xA7 and item.tries < self.opts.retries:
                item.tries += 1
                await asyncio.sleep(self.backoff(item.tries))
                continue
            self.finish(item, outcome_of(status), status, f"after {item.tries} retries" if item.tries else "")
            self.position += 1

    async def run(self, items: list[Item]) -> None:
        for group in groups(items):
            await self.send_group(group)


def send(
    paths: list[str],
    opts: Options,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    stop: threading.Event | None = None,
) -> Summary:
    """Send every file under ``paths``; the summary is printed and returned. ``stop`` ends it between files."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    started = time.monotonic()
    files = find_files(paths)
    summary = Summary([inspect(p) for p in files])
    with Progress("send", len(files), "files", stream=err) as progress:
        sender = Sender(opts, progress, out, stop)
        for item in summary.items:
            if item.outcome == FAILED:
                sender.finish(item, FAILED, detail=item.detail)
        asyncio.run(sender.run([i for i in summary.items if not i.outcome]))
    summary.seconds = time.monotonic() - started
    out.write(summary.line() + "\n")
    out.flush()
    return summary


def tls_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    """Verify the SCP (against ``ca_file``, else the system's CAs); present a client certificate if given."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file or None)
    return ctx
