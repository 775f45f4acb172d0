"""Receiving a PDIS upload: an incremental multipart/form-data parser and the archive receiver.

The upload handler reads the request body only through ``FaultInjector.body(request)`` (so byte counters and
``drop`` faults apply) and feeds it to :class:`MultipartParser`, which turns bytes into events without ever
holding a whole part. We parse multipart ourselves rather than with aiohttp's ``MultipartReader`` because
that reader pulls from ``request.content`` directly, bypassing the fault injector's counted, droppable read.

The ``dataset_file`` part goes to an :class:`ArchiveReceiver` (run in a worker thread: zstd and md5 release
the GIL) which:

* decompresses zstd on the fly when the part starts with the zstd magic ``28 b5 2f fd`` (several
  concatenated frames are accepted, a truncated last frame is refused);
* identifies the inner archive by magic bytes (``pdis_scan.sniff_kind``: tar, tar.gz, tar.bz2, zip);
* computes md5 and size of the inner archive and writes it to a temporary file, which the caller renames
  into place only when everything checked out (so a refused or broken upload leaves nothing stored).

Three stages overlap: the event loop parses, a worker thread decompresses and hashes (zstd and md5 release
the GIL), a writer thread of the receiver's own writes to disk. Memory: the batch being parsed, the one being
decompressed, and at most ``_QUEUE`` decompressed blocks waiting for the disk (each the compression ratio x
the 1 MiB batch).
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
from pathlib import Path

import zstandard

from asyncdepo.sim.pdis_scan import sniff_kind

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SNIFF = 262  # bytes needed to recognise a tar (``ustar`` at 257)
_MAX_HEADERS = 16 * 1024
_QUEUE = 4  # decompressed blocks waiting for the disk writer


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data."""


# events produced by MultipartParser.feed
class PartStart:
    """A part begins; ``name``/``filename`` come from its Content-Disposition."""

    __slots__ = ("filename", "headers", "name")

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers
        disposition = headers.get("content-disposition", "")
        self.name = _param(disposition, "name")
        self.filename = _param(disposition, "filename")


class PartEnd:
    """The current part ended (its closing delimiter was seen)."""

    __slots__ = ()


Event = PartStart | bytes | PartEnd


def _param(header: str, key: str) -> str | None:
    match = re.search(rf'(?:^|;)\s*{key}="((?:[^"\\]|\\.)*)"', header, re.IGNORECASE) or re.search(
        rf"(?:^|;)\s*{key}=([^;\s]+)", header, re.IGNORECASE
    )
    if not match:
        return None
    return re.sub(r"\\(.)", r"\1", match.group(1))


def boundary_of(content_type: str) -> str:
    """The boundary parameter of a ``multipart/form-data`` Content-Type.

    :raises MultipartError: not multipart/form-data, or no boundary.
    """
    if not content_type.lower().startswith("multipart/form-data"):
        raise MultipartError("expected a multipart/form-data body")
    boundary = _param(content_type, "boundary")
    if not boundary or len(boundary) > 200:
        raise MultipartError("multipart/form-data body without a usable boundary")
    return boundary


class MultipartParser:
    """Incremental parser: ``feed(data)`` returns the events the new bytes complete, in order.

    Data events are ``bytes`` slices of the current part's body; a tail shorter than the delimiter is held
    back until the next feed can tell whether it starts the delimiter. ``done`` is true after the closing
    delimiter; bytes after it (the epilogue) are ignored.
    """

    def __init__(self, boundary: str) -> None:
        self._dash = b"--" + boundary.encode("latin-1")
        self._delim = b"\r\n" + self._dash
        self._buf = bytearray()
        self._state = "preamble"
        self.done = False

    def feed(self, data: bytes) -> list[Event]:
        if self.done:
            return []
        self._buf += data
        events: list[Event] = []
        while True:
            if self._state == "preamble":
                if not self._preamble():
                    break
            elif self._state == "after-delim":
                if not self._after_delimiter(events):
                    break
            elif self._state == "headers":
                if not self._headers(events):
                    break
            elif self._state == "body":
                if not self._body(events):
                    break
            else:  # done
                break
        return events

    def close(self) -> None:
        """The body ended; it must have ended with the closing delimiter.

        :raises MultipartError: the body was truncated.
        """
        if not self.done:
            raise MultipartError("multipart body ended before its closing boundary")

    # -- states; each returns True when it consumed something and the loop should go on -----------------
    def _preamble(self) -> bool:
        buf = self._buf
        if buf.startswith(self._dash):
            skip = len(self._dash)
        else:
            at = buf.find(self._delim)
            if at < 0:
                # keep a tail that could hold the start of the first delimiter
                del buf[: max(0, len(buf) - len(self._delim))]
                return False
            skip = at + len(self._delim)
        del buf[:skip]
        self._state = "after-delim"
        return True

    def _after_delimiter(self, events: list[Event]) -> bool:
        if len(self._buf) < 2:
            return False
        if self._buf[:2] == b"--":
            self._state = "done"
            self.done = True
            self._buf.clear()
            return False
        eol = self._buf.find(b"\r\n")  # transport padding (whitespace) may precede the CRLF
        if eol < 0:
            if len(self._buf) > 1024:
                raise MultipartError("garbage after a multipart boundary")
            return False
        del self._buf[: eol + 2]
        self._state = "headers"
        return True

    def _headers(self, events: list[Event]) -> bool:
        buf = self._buf
        if buf.startswith(b"\r\n"):
            end, skip = 0, 2
        else:
            end = buf.find(b"\r\n\r\n")
            skip = 4
        if end < 0:
            if len(buf) > _MAX_HEADERS:
                raise MultipartError("multipart part headers too long")
            return False
        headers: dict[str, str] = {}
        for line in bytes(buf[:end]).decode("utf-8", "replace").split("\r\n"):
            key, sep, value = line.partition(":")
            if not sep:
                raise MultipartError(f"malformed multipart header line {line[:60]!r}")
            headers[key.strip().lower()] = value.strip()
        del buf[: end + skip]
        events.append(PartStart(headers))
        self._state = "body"
        return True

    def _body(self, events: list[Event]) -> bool:
        buf = self._buf
        at = buf.find(self._delim)
        if at < 0:
            keep = len(self._delim) - 1
            if len(buf) > keep:
                events.append(bytes(buf[: len(buf) - keep]))
                del buf[: len(buf) - keep]
            return False
        if at:
            events.append(bytes(buf[:at]))
        del buf[: at + len(self._delim)]
        events.append(PartEnd())
        self._state = "after-delim"
        return True


class UploadRefused(Exception):
    """The dataset file is not an accepted archive; ``str()`` is the message for the 400 answer."""


class ArchiveReceiver:
    """Takes the ``dataset_file`` bytes (``feed`` from a worker thread, one call at a time), stores the inner
    archive in ``tmp_path`` and computes its md5 and size. After :meth:`finish`: ``md5``, ``size``,
    ``kind``, ``compressed`` (zstd was removed) and ``received`` (bytes of the part as sent).

    :raises UploadRefused: from ``feed``/``finish`` when the data is not an accepted archive.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.received = 0
        self.size = 0
        self.kind: str | None = None
        self.compressed: bool | None = None
        self.md5 = ""
        self._hash = hashlib.md5()
        self._head = bytearray()  # outer bytes until the zstd magic can be checked
        self._inner_head = bytearray()  # inner bytes until the archive kind can be sniffed
        self._dctx = zstandard.ZstdDecompressor()
        self._dobj: zstandard.ZstdDecompressionObj | None = None
        self._fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        # disk writes run in a thread of their own so they overlap decompression and md5 (a bounded queue:
        # at most _QUEUE decompressed blocks wait)
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUE)
        self._write_error: OSError | None = None
        self._writer = threading.Thread(target=self._write_loop, name="pdis-sim-writer", daemon=True)
        self._writer.start()

    def _write_loop(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            if self._write_error is not None:
                continue  # drain until the sentinel
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                self._write_error = exc

    def _write(self, data: bytes) -> None:
        if self._write_error is not None:
            raise UploadRefused(f"dataset_file: the server could not store it ({self._write_error.strerror})")
        self._queue.put(data)

    def _stop_writer(self) -> None:
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.compressed is None:
            self._head += data
            if len(self._head) < len(ZSTD_MAGIC):
                return
            data, self._head = bytes(self._head), bytearray()
            self.compressed = data.startswith(ZSTD_MAGIC)
            if self.compressed:
                self._dobj = self._dctx.decompressobj()
        if self.compressed:
            self._inner(self._decompress(data))
        else:
            self._inner(data)

    def _decompress(self, data: bytes) -> bytes:
        out = []
        try:
            while data:
                assert self._dobj is not None
                if self._dobj.eof:
                    # the previous frame ended: go on with the next one (a stream may be several
                    # concatenated frames, e.g. from `zstd` on a pipe or pzstd)
                    self._dobj = self._dctx.decompressobj()
                out.append(self._dobj.decompress(data))
                data = self._dobj.unused_data if self._dobj.eof else b""
        except zstandard.ZstdError as exc:
            raise UploadRefused(f"dataset_file: corrupt zstd stream ({exc})") from exc
        return b"".join(out)

    def _inner(self, data: bytes) -> None:
        if not data:
            return
        if self.kind is None:
            self._inner_head += data
            if len(self._inner_head) < _SNIFF:
                return
            data, self._inner_head = bytes(self._inner_head), bytearray()
            self._sniff(data)
        self._hash.update(data)
        self.size += len(data)
        self._write(data)

    def _sniff(self, head: bytes) -> None:
        kind = sniff_kind(head)
        if kind is None:
            raise UploadRefused(
                "dataset_file: wrong file format; expected .tar, .tar.gz, .tar.bz2 or .zip "
                "(optionally compressed with zstd)"
            )
        self.kind = kind

    def finish(self) -> None:
        """The part ended: flush, check the zstd stream was complete, close the file."""
        if self.compressed is None:  # fewer than 4 bytes in all
            self.compressed = False
            self._inner(bytes(self._head))
        if self.compressed and self._dobj is not None and not self._dobj.eof:
            raise UploadRefused("dataset_file: truncated zstd stream")
        if self.kind is None:
            head = bytes(self._inner_head)
            self._inner_head = bytearray()
            if not head:
                raise UploadRefused("dataset_file: the file is empty")
            self._sniff(head)
            self._hash.update(head)
            self.size += len(head)
            self._write(head)
        self.md5 = self._hash.hexdigest()
        self.close()
        if self._write_error is not None:
            raise UploadRefused(f"dataset_file: the server could not store it ({self._write_error.strerror})")

    def close(self) -> None:
        """Wait for queued writes, then close the file."""
        self._stop_writer()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Close and remove the temporary file (a refused, failed or dropped upload). Never raises."""
        self.close()
        try:
            self.tmp_path.unlink()
        except OSError:
            pass
