"""An upload as it arrives at the store: counted against its limits chunk by chunk, written and
hashed in a thread of its own, and readable as a file while it is still arriving (what the
store's streaming verification reads)."""

from __future__ import annotations

import hashlib
import io
import os
import queue
import re
import threading
from collections import deque
from typing import Iterator

from common.wire import CHUNK_BYTES

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")  # a digest as the protocol writes it


class StoreRefused(Exception):
    """An upload was refused; nothing was stored.

    `reason`: "invalid" (malformed, digest mismatch), "unsafe" (dangerous archive), "untrusted"
    (unregistered site, bad signature, wrong sender), "too_large", "policy" (audit did not
    pass), "replay" (bundle id already stored, or sequence not above the site's last), or
    "content" (images, labels or embeddings not the federation's: common/content.py).
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Writer:
    """Appends byte chunks to the file open at `fd` and hashes them (sha256), in order, in a
    thread of its own, so that writing the upload overlaps verifying it: the write is the
    upload's largest cost (on a VM every new page-cache page may be fetched from the host), and
    os.write and hashlib release the GIL. At most `depth` chunks wait (memory stays bounded)."""

    def __init__(self, fd: int, depth: int = 16):
        self._fd = fd
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._hash = hashlib.sha256()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="upload-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            try:
                if chunk is None:
                    return
                if self._error is None:  # after a failed write, only drain: put() reports it
                    self._hash.update(chunk)
                    view = memoryview(chunk)
                    while view:  # os.write may write less than asked
                        view = view[os.write(self._fd, view) :]
            except OSError as e:
                self._error = e
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, chunk: bytes) -> None:
        """Queue `chunk` to be written after those before it (waits while `depth` are queued)."""
        self._raise()
        self._queue.put(chunk)

    def flush(self) -> None:
        """Wait until every chunk queued so far is written."""
        self._queue.join()
        self._raise()

    def stop(self) -> None:
        """Write what is queued and stop the thread; again: no-op. A failed write is not raised."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self) -> str:
        """stop(), then the sha256 (hex) of all written; raises the OSError of a failed write."""
        self.stop()
        self._raise()
        return self._hash.hexdigest()


class Arriving:
    """An upload as it arrives, readable as a file (read, seek, tell: what tarfile needs) while it
    is still being received.

    Reading past what has arrived pulls the next chunks from `chunks`: each is counted against
    `limit` and `declared` (bytes) before anything reads or writes it, then handed to a Writer
    (hashed and appended to the file open at `fd`, in the background) and kept in memory until
    the reader has passed it; reads come from there (tarfile reads front to back, seeking only
    forward), or, before it, from the file once written. `name` names it in errors. finish()
    takes in the rest of the stream (what follows the tar's end-of-archive blocks) and fsyncs the
    file; close() stops the writer (finish does; call it on failure too).
    """

    def __init__(self, chunks: Iterator[bytes], fd: int, *, name: str, limit: int, declared: int | None):
        self.name = name
        self._chunks, self._fd = chunks, fd
        self._limit, self._declared = limit, declared
        self._writer = Writer(fd)
        self._kept: deque[bytes] = deque()  # chunks received and not yet read past, in order
        self._kept_from = 0  # offset of the first byte of _kept[0]
        self._size = 0  # bytes received
        self._pos = 0  # read position
        self._ended = False

    def _pull(self) -> bool:
        """Take in the next chunk; False once the stream has ended."""
        chunk = next(self._chunks, None)
        if chunk is None:
            if self._declared is not None and self._size != self._declared:
                raise StoreRefused(f"received {self._size} bytes but {self._declared} were declared", "invalid")
            self._ended = True
            return False
        self._size += len(chunk)
        if self._size > self._limit:
            raise StoreRefused(f"bundle exceeds the limit of {self._limit} bytes", "too_large")
        if self._declared is not None and self._size > self._declared:
            raise StoreRefused(f"received more than the declared {self._declared} bytes", "invalid")
        self._writer.put(chunk)
        self._kept.append(chunk)
        return True

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all the rest when n < 0) from the read position; b"" at the end."""
        while not self._ended and (n < 0 or self._size < self._pos + n) and self._pull():
            pass
        n = self._size - self._pos if n < 0 else min(n, self._size - self._pos)
        if n <= 0:
            return b""
        if self._pos < self._kept_from:  # a seek back before what is kept: read the file
            self._writer.flush()
            data = os.pread(self._fd, n, self._pos)
        else:
            data = self._from_kept(n)
        self._pos += len(data)
        while self._kept and self._kept_from + len(self._kept[0]) <= self._pos:  # read past: drop
            self._kept_from += len(self._kept.popleft())
        return data

    def _from_kept(self, n: int) -> bytes:
        """`n` bytes from the read position, all received and kept."""
        parts, at, need = [], self._pos - self._kept_from, n
        for chunk in self._kept:
            if at >= len(chunk):
                at -= len(chunk)
                continue
            parts.append(chunk[at : at + need])
            need -= len(parts[-1])
            at = 0
            if not need:
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("an arriving upload has no end to seek from yet")
        if offset < 0:
            raise ValueError(f"negative seek position {offset}")
        self._pos = offset
        return offset

    def tell(self) -> int:
        return self._pos

    def finish(self) -> tuple[int, str]:
        """Receive the rest of the stream, write it all and fsync; (size in bytes, sha256 hex)."""
        while self._pull():
            self._kept.clear()  # past the tar: nobody reads it
        digest = self._writer.close()
        os.fsync(self._fd)
        return self._size, digest

    def close(self) -> None:
        """Stop the writer thread (what it has queued is written first); for cleanup, so a
        failed write is not raised here (finish raises it)."""
        self._writer.stop()


class UploadBody:
    """What follows an upload's header. Iterating yields its data chunks, each refused as soon as
    it breaks a limit (`declared` and `limit`, bytes), before it is written, up to the trailer,
    which must end the stream; sha256() is then the digest the trailer declares. `requests` are the
    exchange's UploadChunk messages (common/exchange.proto) after the header."""

    def __init__(self, requests: Iterator, *, declared: int, limit: int, progress=lambda: None):
        self._requests, self._declared, self._limit = requests, declared, limit
        self._progress = progress
        self._trailer: str | None = None

    def __iter__(self) -> Iterator[bytes]:
        received = 0
        for msg in self._requests:
            self._progress()
            kind = msg.WhichOneof("kind")
            if kind == "trailer":
                self._trailer = msg.trailer.sha256
                if next(self._requests, None) is not None:
                    raise StoreRefused("a message after the upload trailer; the trailer must end the upload", "invalid")
                return
            if kind != "data":
                raise StoreRefused(
                    f"unexpected {kind or 'empty'} message after the upload header; expected data "
                    f"chunks, then the trailer",
                    "invalid",
                )
            data = msg.data
            if len(data) > CHUNK_BYTES:
                raise StoreRefused(f"data chunk of {len(data)} bytes exceeds {CHUNK_BYTES}", "invalid")
            received += len(data)
            if received > self._limit:
                raise StoreRefused(f"upload exceeds the limit of {self._limit} bytes", "too_large")
            if received > self._declared:
                raise StoreRefused(f"upload sends more than the declared {self._declared} bytes", "invalid")
            yield data

    def sha256(self) -> str:
        """The tar's sha256 as the trailer declares it (64 lower-case hex digits)."""
        if self._trailer is None:
            raise StoreRefused("the upload ended without its trailer (the tar's sha256, after the data)", "invalid")
        if not SHA256_HEX.match(self._trailer):
            raise StoreRefused(f"trailer sha256 {self._trailer!r} is not 64 lower-case hex digits", "invalid")
        return self._trailer
