"""Signed synthetic-data bundles (DESIGN.md section 6): build, pack, extract safely, verify, load.

A bundle directory `<bundle_id>/` holds

    bag/                          a BagIt bag (RFC 8493, bagit package, sha256 manifests)
      bagit.txt, bag-info.txt, manifest-sha256.txt, tagmanifest-sha256.txt
      audit.json                  tag file: the audit result (the same dict is in the attestation)
      datacard.json               tag file: site, route, counts, created_at, code version, config digest
      data/labels.csv             `file,label`, file relative to data/, e.g. images/1/3.png
      data/images/<class>/<i>.png grey 8-bit PNG, <i> the sample's row in labels.csv
    attestation.dsse.json         DSSE envelope of an in-toto Statement v1 whose subject is
                                  bag/tagmanifest-sha256.txt, signed with the site's Ed25519 key

and travels as one uncompressed tar of exactly those regular files (paths relative to the bundle
directory). The tag manifest covers every tag file and, through manifest-sha256.txt, every
payload file, so the one signature covers the whole bag.

bundle_id: the first 32 hex digits of sha256("plan-node-bundle-v1", site, shape, images, labels):
the same accepted set from the same site always gets the same id, so the coordinator's replay
check also catches a set published twice.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping, Sequence

import bagit
import numpy as np
from PIL import Image

from common.dsse import EnvelopeError, sign_envelope, verify_envelope
from common.fileio import sha256_file
from common.signing import SigningKeyError, key_id, load_public_key

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://plan-node.dev/synthetic-release/v1"
TAGMANIFEST = "tagmanifest-sha256.txt"
ATTESTATION = "attestation.dsse.json"
BAG = "bag"
# Every file a bag may hold outside data/: anything else is refused (BagIt allows more; we do not).
TAG_FILES = ("bagit.txt", "bag-info.txt", "manifest-sha256.txt", TAGMANIFEST, "audit.json", "datacard.json")
_PAYLOAD_FILE = re.compile(r"^images/(\d{1,2})/(\d{1,9})\.png$")
_BUNDLE_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_IMAGE_SIDE = 4096  # pixels; a decoded PNG larger than this is refused (decompression bombs)
MAX_JSON_BYTES = 16 * 1024 * 1024  # attestation and tag files are read whole; bound them


class BundleError(ValueError):
    """A bundle is malformed, unsafe, untrusted, too large, or fails policy.

    `reason` is one of "invalid", "unsafe", "untrusted", "too_large", "policy" so a server can
    map it to a status code; the message names the file, field or value at fault.
    """

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed `verify_bundle`, extracted at `dir` (holding bag/ and the attestation)."""

    dir: Path
    site: str
    bundle_id: str
    sequence: int
    statement: dict
    n_samples: int
    key_id: str = ""  # the registered key that verified the signature

    @property
    def predicate(self) -> dict:
        return self.statement["predicate"]


# ---------------------------------------------------------------- build


def code_version() -> str:
    """The installed plan-node version, or "unknown" when running from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("plan-node")
    except PackageNotFoundError:
        return "unknown"


def bundle_id_for(site: str, images: np.ndarray, labels: np.ndarray) -> str:
    """The content-derived bundle id (see the module docstring)."""
    h = hashlib.sha256()
    h.update(b"plan-node-bundle-v1\0" + site.encode() + b"\0")
    h.update(json.dumps(list(images.shape)).encode() + b"\0")
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()[:32]


def _check_arrays(images: np.ndarray, labels: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3:
        raise BundleError(f"images must be uint8 [N,H,W], got {getattr(images, 'dtype', type(images))} "
                          f"shape {getattr(images, 'shape', None)}")
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise BundleError(f"labels must be int64 [N], got {getattr(labels, 'dtype', type(labels))} "
                          f"shape {getattr(labels, 'shape', None)}")
    if len(images) != len(labels) or len(images) == 0:
        raise BundleError(f"need as many labels as images, at least one: {len(images)} images, {len(labels)} labels")
    if labels.min() < 0 or labels.max() > 99:
        raise BundleError(f"labels must be class indices in 0..99, got range {labels.min()}..{labels.max()}")
    if max(images.shape[1:]) > MAX_IMAGE_SIDE:
        raise BundleError(f"images larger than {MAX_IMAGE_SIDE} pixels a side: {images.shape[1:]}")


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tagmanifest(bag_dir: Path) -> str:
    """Rewrite the sha256 tag manifest over every tag file; returns its own sha256.

    Done here rather than with bagit's Bag.save(), which os.chdir()s the whole process.
    """
    lines = []
    for name in sorted(TAG_FILES):
        if name != TAGMANIFEST and (bag_dir / name).is_file():
            lines.append(f"{sha256_file(bag_dir / name)} {name}\n")
    (bag_dir / TAGMANIFEST).write_text("".join(lines))
    return sha256_file(bag_dir / TAGMANIFEST)


def _canonical_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def build_bundle(
    out_dir: Path,
    *,
    images: np.ndarray,
    labels: np.ndarray,
    audit: dict,
    datacard: dict,
    site: str,
    sequence: int,
    signing_key,
    config_digest: str,
    policy: dict | None = None,
    dp_epsilon: float | None = None,
    predicate_type: str = PREDICATE_TYPE,
) -> str:
    """Write the signed bundle `out_dir/<bundle_id>/` and return bundle_id.

    images: uint8 [N,H,W] grey; labels: int [N] class indices. `audit` is the audit result dict
    (it must say passed: true to be accepted anywhere); `policy` defaults to audit["policy"].
    `datacard` is completed with site, bundle_id, sequence, counts, image size, created_at,
    code_version and config_digest. The bundle is assembled in a temporary folder and renamed
    into place, so `out_dir/<bundle_id>` is complete or absent. Refuses if it already exists.
    """
    _check_arrays(images, labels)
    if not isinstance(sequence, int) or sequence < 1:
        raise BundleError(f"sequence must be a positive integer, got {sequence!r}")
    labels = labels.astype(np.int64)
    out_dir = Path(out_dir)
    bundle_id = bundle_id_for(site, images, labels)
    final = out_dir / bundle_id
    if final.exists():
        raise BundleError(f"{final}: bundle already exists")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{bundle_id}."))
    try:
        bag_dir = work / BAG
        bag_dir.mkdir()
        # The payload goes straight into bag/; bagit.make_bag moves it under data/.
        rows = []
        for i, (img, y) in enumerate(zip(images, labels)):
            rel = f"images/{int(y)}/{i}.png"
            (bag_dir / "images" / str(int(y))).mkdir(parents=True, exist_ok=True)
            (bag_dir / rel).write_bytes(_png(img))
            rows.append((rel, int(y)))
        with open(bag_dir / "labels.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["file", "label"])
            w.writerows(rows)
        version = datacard.get("code_version") or code_version()
        bagit.make_bag(
            str(bag_dir),
            bag_info={
                "Source-Organization": site,
                "External-Identifier": bundle_id,
                "Bag-Software-Agent": f"plan-node {version} (bagit.py {bagit.VERSION})",
            },
            checksums=["sha256"],
        )
        classes, counts = np.unique(labels, return_counts=True)
        card = dict(datacard)
        card.update(
            site=site,
            bundle_id=bundle_id,
            sequence=sequence,
            n_samples=int(len(labels)),
            class_counts={str(int(c)): int(n) for c, n in zip(classes, counts)},
            image_shape=[int(images.shape[1]), int(images.shape[2])],
            image_format="png-grey8",
            created_at=card.get("created_at") or dt.datetime.now(dt.timezone.utc).isoformat(),
            code_version=version,
            config_digest=config_digest,
        )
        (bag_dir / "audit.json").write_text(_canonical_json(audit))
        (bag_dir / "datacard.json").write_text(_canonical_json(card))
        tag_digest = _write_tagmanifest(bag_dir)

        statement = {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": TAGMANIFEST, "digest": {"sha256": tag_digest}}],
            "predicateType": predicate_type,
            "predicate": {
                "site": site,
                "bundle_id": bundle_id,
                "sequence": sequence,
                "n_samples": int(len(labels)),
                "audit": audit,
                "policy": policy if policy is not None else audit.get("policy"),
                "config_digest": config_digest,
                "code_version": version,
                "dp_epsilon": dp_epsilon,
            },
        }
        payload = json.dumps(statement, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
        env = sign_envelope(payload, PAYLOAD_TYPE, signing_key, key_id(signing_key.public_key()))
        (work / ATTESTATION).write_text(_canonical_json(env))
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return bundle_id


# ---------------------------------------------------------------- pack and extract


def pack_bundle(bundle_dir: Path) -> Path:
    """Pack `bundle_dir` into `<bundle_dir>.tar` beside it and return that path.

    One uncompressed tar of the regular files only, sorted by path, with owner, group and
    times zeroed, so the same bundle always packs to the same bytes. Written atomically.
    """
    bundle_dir = Path(bundle_dir)
    files = []
    for p in sorted(bundle_dir.rglob("*")):
        st = os.lstat(p)
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{p}: not a regular file; bundles hold regular files only", "unsafe")
        files.append(p)
    out = bundle_dir.with_name(bundle_dir.name + ".tar")
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for p in files:
                info = tarfile.TarInfo(p.relative_to(bundle_dir).as_posix())
                info.size = p.stat().st_size
                info.mode = 0o644
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(p, "rb") as f:
                    tf.addfile(info, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _safe_member_path(name: str) -> tuple[str, ...]:
    if not name or "\x00" in name or "\\" in name or any(ord(c) < 32 for c in name):
        raise BundleError(f"archive member {name!r}: name has control characters or backslashes", "unsafe")
    if name.startswith("/"):
        raise BundleError(f"archive member {name!r}: absolute path", "unsafe")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if not parts:
        raise BundleError(f"archive member {name!r}: empty path", "unsafe")
    if ".." in parts:
        raise BundleError(f"archive member {name!r}: '..' in path", "unsafe")
    return parts


def safe_extract(tar_path: Path, dest: Path, *, max_bytes: int, max_members: int = 200_000) -> list[str]:
    """Extract the uncompressed tar `tar_path` into `dest` (new or empty); return the file paths.

    Only regular files and directories are extracted, each with fresh permissions (0644/0755).
    Refuses (BundleError) absolute paths, '..', symlinks, hard links, devices, FIFOs, duplicate
    names, more than `max_members` members, and more than `max_bytes` bytes of content in total,
    counted while copying: a member never yields more bytes than its header declares.
    On refusal, whatever was extracted stays in `dest` for the caller to remove.
    """
    tar_path, dest = Path(tar_path), Path(dest)
    size = os.path.getsize(tar_path)
    if size > max_bytes + 1024 * 1024:  # tar headers and padding on top of the content budget
        raise BundleError(f"{tar_path.name}: archive is {size} bytes, over the limit of {max_bytes}", "too_large")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise BundleError(f"{dest}: extraction folder is not empty")
    root = dest.resolve()
    budget = max_bytes
    extracted: list[str] = []
    try:
        tf = tarfile.open(tar_path, mode="r:")  # "r:" refuses compressed archives
    except tarfile.TarError as e:
        raise BundleError(f"{tar_path.name}: not an uncompressed tar archive ({e})") from None
    with tf:
        try:
            for n, m in enumerate(tf):
                if n >= max_members:
                    raise BundleError(f"{tar_path.name}: more than {max_members} archive members", "too_large")
                parts = _safe_member_path(m.name)
                rel = "/".join(parts)
                if m.issym() or m.islnk():
                    raise BundleError(f"archive member {m.name!r}: links are not allowed", "unsafe")
                if not (m.isreg() or m.isdir()):
                    raise BundleError(f"archive member {m.name!r}: only regular files and folders are allowed", "unsafe")
                target = root.joinpath(*parts)
                # Parents are created by us, never taken from the archive's own link entries,
                # but check anyway that nothing resolves outside dest.
                if not target.parent.resolve().is_relative_to(root):
                    raise BundleError(f"archive member {m.name!r}: resolves outside the extraction folder", "unsafe")
                if m.isdir():
                    target.mkdir(mode=0o755, parents=True, exist_ok=True)
                    continue
                if m.size > budget:
                    raise BundleError(
                        f"archive member {rel!r}: {m.size} bytes would exceed the limit of {max_bytes} bytes",
                        "too_large",
                    )
                target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                try:
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                except FileExistsError:
                    raise BundleError(f"archive member {rel!r}: appears twice", "unsafe") from None
                src = tf.extractfile(m)
                copied = 0
                with os.fdopen(fd, "wb") as out:
                    while True:
                        block = src.read(min(1 << 20, m.size - copied + 1))
                        if not block:
                            break
                        copied += len(block)
                        if copied > m.size or copied > budget:
                            raise BundleError(f"archive member {rel!r}: more bytes than declared", "unsafe")
                        out.write(block)
                if copied != m.size:
                    raise BundleError(f"archive member {rel!r}: truncated ({copied} of {m.size} bytes)")
                budget -= copied
                extracted.append(rel)
        except tarfile.TarError as e:
            raise BundleError(f"{tar_path.name}: corrupt tar archive ({e})") from None
    return extracted


def read_predicate(tar: Path | BinaryIO) -> dict:
    """The attestation predicate of a bundle tar (a path or an open binary file), NOT verified:
    for addressing an upload, or for showing figures of bundles that were verified when stored."""
    name = tar if isinstance(tar, Path) else getattr(tar, "name", "bundle")
    try:
        with tarfile.open(tar, mode="r:") if isinstance(tar, Path) else tarfile.open(fileobj=tar, mode="r:") as tf:
            m = tf.getmember(ATTESTATION)
            if not m.isreg() or m.size > MAX_JSON_BYTES:
                raise BundleError(f"{name}: {ATTESTATION} is not a regular file of sane size")
            env = json.loads(tf.extractfile(m).read())
        return json.loads(base64.b64decode(env["payload"]))["predicate"]
    except BundleError:
        raise
    except (KeyError, ValueError, TypeError, tarfile.TarError, OSError) as e:
        raise BundleError(f"{name}: cannot read the predicate of {ATTESTATION} ({e})") from None


def read_bundle_site(tar_path: Path) -> str:
    """The site a bundle tar's attestation claims, NOT verified: for addressing an upload only."""
    predicate = read_predicate(Path(tar_path))
    if not isinstance(predicate, dict) or not isinstance(predicate.get("site"), str):
        raise BundleError(f"{tar_path}: cannot read the site from {ATTESTATION} (no site in the predicate)")
    return predicate["site"]


# ---------------------------------------------------------------- verify


def _read_json(path: Path, what: str):
    if path.stat().st_size > MAX_JSON_BYTES:
        raise BundleError(f"{what}: larger than {MAX_JSON_BYTES} bytes", "too_large")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{what}: not valid JSON ({e})") from None


def _check_layout(files: list[str]) -> None:
    """Only the attestation and bag/{tag files, data/...} may be present."""
    for rel in files:
        if rel == ATTESTATION:
            continue
        if rel.startswith(f"{BAG}/data/"):
            continue
        if rel.startswith(f"{BAG}/") and rel[len(BAG) + 1:] in TAG_FILES:
            continue
        raise BundleError(f"{rel}: unexpected file in bundle")
    for required in [ATTESTATION] + [f"{BAG}/{t}" for t in TAG_FILES]:
        if required not in files:
            raise BundleError(f"{required}: missing from bundle")


def _key_entries(site: str, entries: Sequence) -> list[tuple[str, object, int, int | None]]:
    """(key id, public key, valid_after, valid_until) of each trusted-key entry of `site`.

    An entry is a PEM (str/bytes), an Ed25519PublicKey (valid for every sequence), or a dict
    {"pem", "valid_after", "valid_until"} as server.trust / common.trustdoc give.
    """
    out = []
    for e in entries:
        after, until, pem = 0, None, e
        if isinstance(e, Mapping):
            pem, after, until = e.get("pem"), e.get("valid_after", 0), e.get("valid_until")
            if not isinstance(after, int) or not (until is None or isinstance(until, int)):
                raise BundleError(f"registered key of site {site!r}: bad validity window {after!r}..{until!r}", "untrusted")
        try:
            # str keys are PEM text: encode so a key is never mistaken for a file name to read.
            k = load_public_key(pem.encode() if isinstance(pem, str) else pem)
        except SigningKeyError as err:
            raise BundleError(f"registered key of site {site!r} is unusable: {err}", "untrusted") from None
        out.append((key_id(k), k, after, until))
    return out


def _open_statement(env: dict, trusted_keys: Mapping[str, Sequence]) -> tuple[dict, str]:
    """(the verified in-toto statement, id of the key that signed it).

    Only keys of the site the statement claims, whose sequence window holds the sequence it
    claims, are tried: both claims are inside the signed payload, so once a signature verifies
    they are authentic.
    """
    if not isinstance(env, dict) or not isinstance(env.get("payload"), str):
        raise BundleError(f"{ATTESTATION}: not a DSSE envelope")
    # Read the claimed site and sequence from the (not yet trusted) payload only to pick keys.
    try:
        claimed = json.loads(base64.b64decode(env["payload"], validate=True))
        site = claimed["predicate"]["site"]
        sequence = claimed["predicate"]["sequence"]
    except Exception:
        raise BundleError(f"{ATTESTATION}: payload is not an in-toto statement naming a site and sequence") from None
    if not isinstance(site, str) or site not in trusted_keys or not trusted_keys[site]:
        raise BundleError(f"site {site!r} is not registered (or its keys were revoked)", "untrusted")
    if not isinstance(sequence, int) or isinstance(sequence, bool):
        raise BundleError(f"{ATTESTATION}: predicate.sequence {sequence!r} is not an integer")
    entries = _key_entries(site, trusted_keys[site])
    usable = {kid: k for kid, k, after, until in entries if after < sequence and (until is None or sequence <= until)}
    windows = ", ".join(f"{kid[:12]}: {after + 1}..{'' if until is None else until}" for kid, _, after, until in entries)
    for kid, k in usable.items():
        try:
            payload = verify_envelope(env, {kid: k}, payload_type=PAYLOAD_TYPE)
        except EnvelopeError:
            continue
        break
    else:
        raise BundleError(
            f"signature does not verify against any registered key of site {site!r} valid for sequence "
            f"{sequence} (keys and their sequence windows: {windows})",
            "untrusted",
        )
    statement = json.loads(payload)
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise BundleError(f"{ATTESTATION}: statement _type is {statement.get('_type')!r}, expected {STATEMENT_TYPE!r}")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise BundleError(f"{ATTESTATION}: predicateType {statement.get('predicateType')!r} is not {PREDICATE_TYPE!r}")
    return statement, kid


def _check_bag(bag_dir: Path) -> None:
    try:
        bag = bagit.Bag(str(bag_dir))
        if bag.algorithms != ["sha256"]:
            raise BundleError(f"{BAG}: manifests must be sha256 only, found {bag.algorithms}")
        bag.validate(fast=False)
    except bagit.BagValidationError as e:
        problems = []
        for d in e.details or []:
            if isinstance(d, bagit.ChecksumMismatch):
                problems.append(f"{d.path}: {d.algorithm} mismatch")
            elif isinstance(d, bagit.FileMissing):
                problems.append(f"{d.path}: listed in the manifest but missing")
            elif isinstance(d, bagit.UnexpectedFile):
                problems.append(f"{d.path}: not listed in the manifest")
            else:
                problems.append(str(d))
        raise BundleError("; ".join(problems) or f"{BAG}: {e.message}") from None
    except bagit.BagError as e:
        raise BundleError(f"{BAG}: not a valid BagIt bag ({e})") from None
    # bagit does not require tag files to be listed in the tag manifest; we do, so the signed
    # tag manifest digest covers audit.json and datacard.json.
    listed = set(bag.tagfile_entries())
    for name in TAG_FILES:
        if name != TAGMANIFEST and name not in listed:
            raise BundleError(f"{name}: not listed in {TAGMANIFEST}")


def _read_labels(data_dir: Path) -> list[tuple[str, int]]:
    """labels.csv rows, each checked: a payload path of the expected form matching its label."""
    rows = []
    with open(data_dir / "labels.csv", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        if next(reader, None) != ["file", "label"]:
            raise BundleError("data/labels.csv: header must be 'file,label'")
        for i, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise BundleError(f"data/labels.csv line {i}: expected 2 fields, got {len(row)}")
            m = _PAYLOAD_FILE.match(row[0])
            if not m or not row[1].isdigit() or int(row[1]) != int(m.group(1)):
                raise BundleError(f"data/labels.csv line {i}: bad row {row!r}")
            rows.append((row[0], int(row[1])))
    if not rows:
        raise BundleError("data/labels.csv: no samples")
    return rows


def _check_png_header(path: Path, rel: str) -> None:
    """Refuse a payload file that is not a PNG or whose header declares more than MAX_IMAGE_SIDE
    pixels a side: a few compressed bytes can decode to gigabytes (decompression bomb), so this is
    checked from the 24-byte header, before anyone decodes it."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise BundleError(f"data/{rel}: not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    if not (0 < width <= MAX_IMAGE_SIDE and 0 < height <= MAX_IMAGE_SIDE):
        raise BundleError(
            f"data/{rel}: PNG declares {width}x{height} pixels, over the limit of {MAX_IMAGE_SIDE} a side "
            f"(decompression bomb?)",
            "too_large",
        )


def verify_bundle(
    tar_path: Path,
    trusted_keys: Mapping[str, Sequence],
    *,
    max_bytes: int,
    dest: Path | None = None,
) -> VerifiedBundle:
    """Extract `tar_path` safely and check everything before anyone uses it.

    trusted_keys: site -> that site's keys: PEM text, Ed25519PublicKey, or {"pem", "valid_after",
    "valid_until"} (server.trust's sequence windows; only a key whose window holds the bundle's
    signed sequence may verify it).
    Checks: safe extraction within `max_bytes`; exactly the expected files; the DSSE signature
    against a registered key of the site the statement names; the bag (every payload and tag
    digest, completeness); the statement's subject digest against the actual tag manifest;
    predicate fields; audit.json and datacard.json consistent with the signed predicate;
    labels.csv against the payload; predicate.audit.passed is true.

    Extracts into `dest` (must be new or empty) or a new temporary folder; the caller owns and
    removes `VerifiedBundle.dir`. On failure, raises BundleError and removes what it extracted.
    """
    tar_path = Path(tar_path)
    if dest is not None and Path(dest).exists() and any(Path(dest).iterdir()):
        raise BundleError(f"{dest}: extraction folder is not empty")  # before we own anything in it
    created = dest is None or not Path(dest).exists()
    out = Path(tempfile.mkdtemp(prefix="plan-bundle-")) if dest is None else Path(dest)
    try:
        files = safe_extract(tar_path, out, max_bytes=max_bytes)
        _check_layout(files)
        env = _read_json(out / ATTESTATION, ATTESTATION)
        statement, signer = _open_statement(env, trusted_keys)
        bag_dir = out / BAG
        _check_bag(bag_dir)

        subject = statement.get("subject")
        if (
            not isinstance(subject, list)
            or len(subject) != 1
            or not isinstance(subject[0], dict)
            or subject[0].get("name") != TAGMANIFEST
        ):
            raise BundleError(f"{ATTESTATION}: subject must be exactly [{TAGMANIFEST}]")
        signed_digest = (subject[0].get("digest") or {}).get("sha256")
        actual = sha256_file(bag_dir / TAGMANIFEST)
        if signed_digest != actual:
            raise BundleError(
                f"{TAGMANIFEST}: sha256 {actual} does not match the signed subject digest {signed_digest}"
            )

        pred = statement.get("predicate")
        if not isinstance(pred, dict):
            raise BundleError(f"{ATTESTATION}: predicate must be an object")
        site, bundle_id, sequence = pred.get("site"), pred.get("bundle_id"), pred.get("sequence")
        if not isinstance(bundle_id, str) or not _BUNDLE_ID.match(bundle_id):
            raise BundleError(f"{ATTESTATION}: predicate.bundle_id {bundle_id!r} is not 32 hex digits")
        if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 1:
            raise BundleError(f"{ATTESTATION}: predicate.sequence {sequence!r} is not a positive integer")
        audit = pred.get("audit")
        if not isinstance(audit, dict):
            raise BundleError(f"{ATTESTATION}: predicate.audit must be an object")
        if _read_json(bag_dir / "audit.json", "audit.json") != audit:
            raise BundleError("audit.json: differs from the signed predicate.audit")
        card = _read_json(bag_dir / "datacard.json", "datacard.json")
        if not isinstance(card, dict) or card.get("site") != site or card.get("bundle_id") != bundle_id:
            raise BundleError("datacard.json: site or bundle_id differs from the signed predicate")

        rows = _read_labels(bag_dir / "data")
        payload = {p.relative_to(bag_dir / "data").as_posix() for p in (bag_dir / "data").rglob("*") if p.is_file()}
        listed = {r for r, _ in rows}
        if len(listed) != len(rows):
            raise BundleError("data/labels.csv: a file is listed twice")
        if payload != listed | {"labels.csv"}:
            extra = sorted(payload - listed - {"labels.csv"}) or sorted(listed - payload)
            raise BundleError(f"data/{extra[0]}: payload and labels.csv disagree")
        for rel, _ in rows:
            _check_png_header(bag_dir / "data" / rel, rel)
        if pred.get("n_samples") != len(rows):
            raise BundleError(f"{ATTESTATION}: predicate.n_samples {pred.get('n_samples')!r} but labels.csv has {len(rows)}")

        if audit.get("passed") is not True:
            raise BundleError(f"audit did not pass (predicate.audit.passed is {audit.get('passed')!r})", "policy")
        return VerifiedBundle(
            dir=out, site=site, bundle_id=bundle_id, sequence=sequence, statement=statement, n_samples=len(rows),
            key_id=signer,
        )
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        raise


# ---------------------------------------------------------------- load


def load_bundle_images(dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,H,W], labels int64 [N]) of a verified bundle, in labels.csv order.

    `dir` is a bundle folder (holding bag/) or the bag itself. Paths come from labels.csv only
    after matching `images/<label>/<i>.png`; images must all be grey and of one size.
    """
    dir = Path(dir)
    bag_dir = dir / BAG if (dir / BAG).is_dir() else dir
    data_dir = bag_dir / "data"
    rows = _read_labels(data_dir)
    images, labels, shape = [], [], None
    for rel, y in rows:
        path = data_dir / rel
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode != "L":
                raise BundleError(f"{path}: expected a grey 8-bit PNG, got {im.format} {im.mode}")
            if max(im.size) > MAX_IMAGE_SIDE:
                raise BundleError(f"{path}: {im.size} exceeds {MAX_IMAGE_SIDE} pixels a side")
            arr = np.asarray(im, dtype=np.uint8)
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise BundleError(f"{path}: size {arr.shape} differs from the first image's {shape}")
        images.append(arr)
        labels.append(y)
    return np.stack(images), np.asarray(labels, dtype=np.int64)
