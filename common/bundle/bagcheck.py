"""The BagIt checks (RFC 8493) on streamed members: bagit.txt, the manifests against the digests,
completeness, Payload-Oxum.
"""

from __future__ import annotations

import codecs
import re
from typing import Iterable, Mapping

from common.bundle.format import _DATA, BAG, TAG_FILES, TAGMANIFEST, BundleError
from common.bundle.members import _Members

# The bag is checked by our own code over the member list rather than by bagit's Bag.validate:
# bagit validates a folder (it walks data/ and resolves every manifest path on disk), and the
# store no longer extracts the payload. _check_bag checks at least what bagit checked: bagit.txt
# (no byte-order mark, BagIt-Version M.N, Tag-File-Character-Encoding), bag-info.txt's tags and
# its Payload-Oxum, well-formed manifest lines naming safe paths each once, every payload file
# listed and every listed file present (completeness), every listed digest; and more: sha256
# manifests only, UTF-8 only, every tag file listed in the tag manifest (so that the signature
# over it covers audit.json and datacard.json), no stray entries in either manifest.
_BAGIT_VERSIONS = ((0, 97), (2, 0))  # [from, below): 0.97 is the first whose tag manifest is checked
_MAX_PROBLEMS = 10  # bag problems named in one error; the rest are counted


def _check_bag(members: _Members) -> None:
    """The bag is well formed and complete, and every file its manifests list has the listed sha256."""
    _check_bagit_txt(members)
    payload = {rel[len(BAG) + 1 :]: size for rel, size in members.sizes.items() if rel.startswith(_DATA)}
    if not payload:
        raise BundleError(f"{BAG}: no payload (data/ holds no file)")
    _check_oxum(_read_tags(members, f"{BAG}/bag-info.txt"), payload)
    manifest = _read_manifest(members, "manifest-sha256.txt")
    tagmanifest = _read_manifest(members, TAGMANIFEST)
    for path in manifest:
        if not path.startswith("data/"):
            raise BundleError(f"manifest-sha256.txt: lists {path}, which is not a payload file (data/...)")
    for path in tagmanifest:
        if path not in TAG_FILES or path == TAGMANIFEST:
            raise BundleError(f"{TAGMANIFEST}: lists {path}, which is not one of the tag files {sorted(TAG_FILES)}")
    digests = {rel[len(BAG) + 1 :]: d for rel, d in members.digests.items() if rel.startswith(f"{BAG}/")}
    problems = _manifest_problems(manifest, digests, payload) + _manifest_problems(tagmanifest, digests, ())
    if problems:
        more = len(problems) - _MAX_PROBLEMS
        raise BundleError("; ".join(problems[:_MAX_PROBLEMS]) + (f"; and {more} more" if more > 0 else ""))
    for name in TAG_FILES:
        if name != TAGMANIFEST and name not in tagmanifest:
            raise BundleError(f"{name}: not listed in {TAGMANIFEST}")


def _manifest_problems(entries: Mapping[str, str], digests: Mapping[str, str], present: Iterable[str]) -> list[str]:
    """What is wrong between a manifest's `entries` (path in the bag -> sha256) and the files:
    `digests` (path in the bag -> sha256 as read) and `present`, the files it must list."""
    problems = []
    for path, want in entries.items():
        got = digests.get(path)
        if got is None:
            problems.append(f"{path}: listed in the manifest but missing")
        elif got != want:
            problems.append(f"{path}: sha256 mismatch (manifest {want}, file {got})")
    problems += [f"{path}: not listed in the manifest" for path in present if path not in entries]
    return problems


def _check_bagit_txt(members: _Members) -> None:
    """bagit.txt: no byte-order mark, BagIt-Version M.N from 0.97 below 2, encoding UTF-8."""
    what = f"{BAG}/bagit.txt"
    if members.read_bytes(what).startswith(codecs.BOM_UTF8):
        raise BundleError(f"{what}: must not start with a byte-order mark")
    tags = _read_tags(members, what)
    for name in ("BagIt-Version", "Tag-File-Character-Encoding"):
        if name not in tags:
            raise BundleError(f"{what}: missing required tag {name}")
    version = tags["BagIt-Version"][0]
    try:
        number = tuple(int(v) for v in version.split(".", 1))
    except ValueError:
        raise BundleError(f"{what}: BagIt-Version {version!r} is not MAJOR.MINOR") from None
    if not _BAGIT_VERSIONS[0] <= number < _BAGIT_VERSIONS[1]:
        raise BundleError(f"{what}: BagIt-Version {version} is not supported (0.97 up to 1.x)")
    encoding = tags["Tag-File-Character-Encoding"][0]
    if encoding.upper() != "UTF-8":
        raise BundleError(f"{what}: Tag-File-Character-Encoding is {encoding!r}, expected 'UTF-8'")


def _read_tags(members: _Members, rel: str) -> dict[str, list[str]]:
    """A BagIt tag file's `Name: value` lines (a line starting with blanks continues the value
    before it, RFC 2822 folding), each name's values in order."""
    tags: dict[str, list[str]] = {}
    name = None
    try:
        with members.open_text(rel) as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if line[0].isspace() and name is not None:
                    tags[name][-1] += " " + line.strip()
                    continue
                name, colon, value = line.partition(":")
                if not colon:
                    raise BundleError(f"{rel} line {i}: {line.strip()!r} is not a 'Name: value' tag")
                name = name.strip()
                tags.setdefault(name, []).append(value.strip())
    except UnicodeDecodeError as e:
        raise BundleError(f"{rel}: not UTF-8 text ({e})") from None
    return tags


def _check_oxum(info: Mapping[str, list[str]], payload: Mapping[str, int]) -> None:
    """bag-info.txt's Payload-Oxum (`<bytes>.<files>`), when present, against the payload
    (path -> size in bytes); the first one counts when it is given more than once, as in bagit."""
    if "Payload-Oxum" not in info:
        return
    oxum = info["Payload-Oxum"][0]
    nbytes, _, nfiles = oxum.partition(".")
    if not (nbytes.isdecimal() and nfiles.isdecimal() and nbytes.isascii() and nfiles.isascii()):
        raise BundleError(f"{BAG}/bag-info.txt: malformed Payload-Oxum {oxum!r}, expected <bytes>.<files>")
    found = (sum(payload.values()), len(payload))
    if (int(nbytes), int(nfiles)) != found:
        raise BundleError(
            f"{BAG}/bag-info.txt: Payload-Oxum validation failed: it declares {nbytes} bytes in "
            f"{nfiles} files, the payload holds {found[0]} bytes in {found[1]} files"
        )


def _read_manifest(members: _Members, name: str) -> dict[str, str]:
    """Manifest `name` of the bag: path in the bag -> sha256 (hex, lower case), one per
    `<digest> <path>` line (blank lines and # comments skipped, a leading byte-order mark
    tolerated and %0D/%0A in paths decoded, as bagit does). Refuses a malformed line, an
    absolute path or '..' (bagit: "unsafe"), and a path listed twice."""
    rel = f"{BAG}/{name}"
    entries: dict[str, str] = {}
    try:
        with members.open_text(rel) as f:
            for i, line in enumerate(f, start=1):
                line = line.lstrip("\ufeff").strip() if i == 1 else line.strip()
                if not line or line.startswith("#"):
                    continue
                fields = line.split(None, 1)
                if len(fields) != 2:
                    raise BundleError(f"{name} line {i}: {line!r} is not '<sha256> <path>'")
                path = re.sub("%0A", "\n", re.sub("%0D", "\r", fields[1].lstrip("*"), flags=re.I), flags=re.I)
                parts = [p for p in path.split("/") if p not in ("", ".")]
                if path.startswith("/") or ".." in parts or not parts:
                    raise BundleError(f"{name} line {i}: path {path!r} is unsafe (absolute, '..' or empty)")
                path = "/".join(parts)
                if path in entries:
                    raise BundleError(f"{name} line {i}: {path} is listed twice")
                entries[path] = fields[0].lower()
    except UnicodeDecodeError as e:
        raise BundleError(f"{name}: not UTF-8 text ({e})") from None
    return entries
