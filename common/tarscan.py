"""A strict reader for the one tar dialect bundles use, so that Python's tarfile never parses an
archive that came from outside.

Bundles are written by common.bundle.pack_bundle: POSIX ustar headers, with a PAX extended header
('x') only before a member whose path needs one. This reader accepts exactly that: regular files
and folders, each optionally preceded by one small PAX header holding `path` and/or `size` (plus
the timestamp and owner records tarfile may add, which are ignored). It refuses, from the raw
512-byte header and before reading anything it announces: GNU long names and long links ('L',
'K'), sparse members ('S' or GNU.sparse records), global PAX headers ('g'), PAX headers over
MAX_PAX_BYTES, links, devices and FIFOs, base-256 sizes, bad checksums and non-UTF-8 names. Why:
tarfile's PAX parser is quadratic on hostile headers (CVE-2024-6232 on Python 3.11.7), it reads
GNU long names whole and it follows sparse maps, all before a signature could be checked.

Members are read front to back from a plain binary stream (an upload still arriving works):
nothing seeks. Names in error messages are cut to NAME_IN_ERRORS characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Iterator

from common import errors

BLOCK = 512
MAX_PAX_BYTES = 4096  # a path of a few hundred bytes needs about 300
NAME_IN_ERRORS = 120
_IGNORED_PAX_KEYS = frozenset({"mtime", "atime", "ctime", "uid", "gid", "uname", "gname"})


class TarFormatError(ValueError):
    """The archive is not in the accepted dialect; `unsafe` marks refusals of hostile constructs."""

    exit_code = errors.VERIFY

    def __init__(self, message: str, *, unsafe: bool = False):
        super().__init__(message)
        self.unsafe = unsafe


def short(name: str) -> str:
    """`name` cut for an error or log line."""
    return name if len(name) <= NAME_IN_ERRORS else f"{name[:NAME_IN_ERRORS]}...({len(name)} characters)"


@dataclass(frozen=True)
class TarEntry:
    """One member: its path as written, size in bytes, and kind: "file" or "dir"."""

    name: str
    size: int
    kind: str

    def isreg(self) -> bool:
        return self.kind == "file"

    def isdir(self) -> bool:
        return self.kind == "dir"


class _Body:
    """Exactly `size` bytes of a member from `src`; fewer at a premature end of the stream."""

    def __init__(self, src: BinaryIO, size: int):
        self._src, self._left = src, size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        block = self._src.read(n) if n else b""
        self._left -= len(block)
        if n and not block:
            self._left = 0  # the stream ended: the caller sees fewer bytes than declared
        return block

    def skip(self) -> None:
        while self.read(1 << 16):
            pass


def _read_block(src: BinaryIO) -> bytes:
    block = b""
    while len(block) < BLOCK:
        more = src.read(BLOCK - len(block))
        if not more:
            break
        block += more
    return block


def _octal(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:
        raise TarFormatError(f"tar header: base-256 {what} field", unsafe=True)
    text = field.rstrip(b"\0 ").lstrip(b" ")
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in text):
        raise TarFormatError(f"tar header: {what} field {field[:16]!r} is not octal")
    return int(text, 8)


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _octal(header[148:156], "checksum")
    except TarFormatError:
        return False
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored == unsigned


def _text(field: bytes, what: str) -> str:
    try:
        return field.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise TarFormatError(f"tar header: {what} is not UTF-8") from None


def _parse_pax(data: bytes) -> dict[str, str]:
    """The records "<len> <key>=<value>\\n" of a PAX extended header, strictly."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 8)
        if space < 0 or not data[pos:space].isdigit():
            raise TarFormatError("PAX header: a record does not start with its length")
        length = int(data[pos:space])
        record = data[pos : pos + length]
        if length <= space - pos + 1 or len(record) != length or not record.endswith(b"\n") or b"=" not in record:
            raise TarFormatError("PAX header: malformed record")
        key, _, value = record[space - pos + 1 : -1].partition(b"=")
        try:
            key_text, value_text = key.decode("utf-8"), value.decode("utf-8")
        except UnicodeDecodeError:
            raise TarFormatError("PAX header: a record is not UTF-8") from None
        if key_text.startswith("GNU.sparse"):
            raise TarFormatError("sparse archive members are not allowed", unsafe=True)
        if key_text in ("path", "size"):
            out[key_text] = value_text
        elif key_text not in _IGNORED_PAX_KEYS:
            raise TarFormatError(f"PAX header: record {short(key_text)!r} is not allowed in a bundle", unsafe=True)
        pos += length
    return out


def iter_tar(src: BinaryIO) -> Iterator[tuple[TarEntry, _Body]]:
    """Each member of the tar read from `src`, with a reader of its content (read it, or not:
    what is left is skipped before the next header). Ends at the end-of-archive marker or at the
    end of the stream; raises TarFormatError at the first header outside the dialect."""
    pax: dict[str, str] | None = None
    first = True
    while True:
        header = _read_block(src)
        if 0 < len(header) < BLOCK:
            if first:
                raise TarFormatError("not an uncompressed tar archive (shorter than one header)")
            raise TarFormatError("the archive ends inside a header (truncated)")
        if not header or header == b"\0" * BLOCK:
            if pax is not None:
                raise TarFormatError("the archive ends after a PAX header")
            return
        if not _checksum_ok(header):
            if first:
                raise TarFormatError("not an uncompressed tar archive (its first header does not check)")
            raise TarFormatError("tar header checksum mismatch: a corrupt archive")
        first = False
        if header[257:265] not in (b"ustar\x0000", b"ustar  \0"):
            raise TarFormatError("not a ustar header")
        kind = header[156:157]
        size = _octal(header[124:136], "size")
        if kind == b"x":
            if pax is not None:
                raise TarFormatError("two PAX headers in a row")
            if size > MAX_PAX_BYTES:
                raise TarFormatError(f"PAX header of {size} bytes, over the limit of {MAX_PAX_BYTES}", unsafe=True)
            data = _Body(src, size).read()
            if len(data) != size:
                raise TarFormatError("the archive ends inside a PAX header")
            _skip(src, (-size) % BLOCK)
            pax = _parse_pax(data)
            continue
        name = _text(header[:100], "name")
        prefix = _text(header[345:500], "prefix") if header[257:263] == b"ustar\0" else ""
        name = f"{prefix}/{name}" if prefix else name
        if pax is not None:
            name = pax.get("path", name)
            if "size" in pax:
                if not pax["size"].isdigit():
                    raise TarFormatError(f"PAX header: size {short(pax['size'])!r} is not a number")
                size = int(pax["size"])
            pax = None
        refusal = _REFUSED.get(kind)
        if refusal is not None:
            raise TarFormatError(f"archive member {short(name)!r}: {refusal}", unsafe=True)
        if kind not in (b"0", b"\0", b"5"):
            raise TarFormatError(f"archive member {short(name)!r}: type {kind!r} is not allowed", unsafe=True)
        entry = TarEntry(
            name=name.rstrip("/") if kind == b"5" else name,
            size=size if kind != b"5" else 0,
            kind="dir" if kind == b"5" else "file",
        )
        body = _Body(src, entry.size)
        yield entry, body
        body.skip()
        _skip(src, (-entry.size) % BLOCK)


def _skip(src: BinaryIO, n: int) -> None:
    while n > 0:
        got = src.read(min(n, 1 << 16))
        if not got:
            return
        n -= len(got)


_REFUSED = {
    b"L": "GNU long names are not allowed",
    b"K": "GNU long link names are not allowed",
    b"S": "sparse archive members are not allowed",
    b"g": "global PAX headers are not allowed",
    b"1": "links are not allowed",
    b"2": "links are not allowed",
    b"3": "only regular files and folders are allowed",
    b"4": "only regular files and folders are allowed",
    b"6": "only regular files and folders are allowed",
    b"7": "only regular files and folders are allowed",
}
