"""Signed synthetic-data bundles (docs/DESIGN.md 3.6): build, pack, extract safely, verify, load.

A bundle directory `<bundle_id>/` holds

    bag/                          a BagIt bag (RFC 8493, bagit package, sha256 manifests)
      bagit.txt, bag-info.txt, manifest-sha256.txt, tagmanifest-sha256.txt
      audit.json                  tag file: the audit result (the same dict is in the attestation)
      datacard.json               tag file: site, route, data_format, counts, created_at, code version,
                                  config digest, and image_shape or embedding_dim
      data/                       the payload, in one of two layouts (told apart by what it holds):
        PLAN route: images, data_format "png-grey8"
          labels.csv              `file,label`, file relative to data/, e.g. images/1/3.png
          images/<class>/<i>.png  grey 8-bit PNG, <i> the sample's row in labels.csv
        CVAE route: embeddings, data_format "safetensors-float32"
          embeddings.safetensors  exactly one tensor, "embeddings", F32 [N,D]: a foundation-model
                                  feature extractor's synthetic feature vectors
          labels.csv              `index,label`, one row per embedding, index 0..N-1 in order
    attestation.dsse.json         DSSE envelope of an in-toto Statement v1 whose subject is
                                  bag/tagmanifest-sha256.txt, signed with the site's Ed25519 key;
                                  its predicate names the route

and travels as one uncompressed tar of exactly those regular files (paths relative to the bundle
directory). The tag manifest covers every tag file and, through manifest-sha256.txt, every
payload file, so the one signature covers the whole bag.

bundle_id: the first 32 hex digits of sha256("plan-node-bundle-v1", site, shape, images, labels)
for images, of sha256("plan-node-bundle-embeddings-v1", site, dtype and shape, embeddings, labels)
for embeddings: the same accepted set from the same site always gets the same id, so the
coordinator's replay check also catches a set published twice.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import csv
import dataclasses
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
from typing import BinaryIO, Iterable, Mapping, Sequence, TextIO

import bagit
import numpy as np
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file as save_safetensors

from common import errors
from common.dsse import EnvelopeError, sign_envelope, verify_envelope
from common.fileio import sha256_file
from common.signing import SigningKeyError, key_id, load_public_key
from common.tarscan import TarEntry, TarFormatError, iter_tar, short

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://plan-node.dev/synthetic-release/v1"
TAGMANIFEST = "tagmanifest-sha256.txt"
ATTESTATION = "attestation.dsse.json"
BAG = "bag"
# Every file a bag may hold outside data/: anything else is refused (BagIt allows more; we do not).
TAG_FILES = ("bagit.txt", "bag-info.txt", "manifest-sha256.txt", TAGMANIFEST, "audit.json", "datacard.json")
# ASCII digits only: str patterns' \d would also take other scripts' digits.
_PAYLOAD_FILE = re.compile(r"^images/(\d{1,2})/(\d{1,9})\.png$", re.ASCII)
BUNDLE_ID = re.compile(r"[0-9a-f]{32}")  # fullmatch: a bundle id, the name of its folder and object
MAX_IMAGE_SIDE = 4096  # pixels; a decoded PNG larger than this is refused (decompression bombs)
MAX_JSON_BYTES = 16 * 1024 * 1024  # attestation and tag files are read whole; bound them
MAX_ATTESTATION_BYTES = 1024 * 1024  # the signed statement, read and verified before any other member
MAX_SIGNATURES = 4  # signatures an attestation may carry: each costs a verification
MAX_MEMBERS = 200_000  # archive members a bundle tar may hold
EMBEDDINGS = "embeddings.safetensors"  # the CVAE route's payload file in data/, beside labels.csv
EMBEDDINGS_TENSOR = "embeddings"  # the one tensor it holds
# The safetensors header is JSON read whole before anything else; ours is ~80 bytes.
MAX_SAFETENSORS_HEADER = 1024 * 1024
DATA_FORMATS = {"plan": "png-grey8", "cvae": "safetensors-float32"}  # route -> datacard.data_format
_LABEL = re.compile(r"0|[1-9][0-9]?")  # a class index 0..99, canonical decimal (fullmatch)
_DATA = f"{BAG}/data/"  # the payload's folder, as member paths start
# The files the checks parse whole, kept as they stream past (see _Members).
_KEPT = frozenset([ATTESTATION, *(f"{BAG}/{t}" for t in TAG_FILES), f"{_DATA}labels.csv"])
# A kept file up to this size stays in memory; a larger one (labels.csv or the manifest of very
# many samples: they grow with the sample count) goes to a temporary file, so memory stays bounded.
_KEEP_IN_MEMORY = 16 * 1024 * 1024
_PNG_HEAD = 24  # bytes of a PNG that its header check reads: signature, IHDR length and type, width, height
_BLOCK = 1 << 20  # bytes read at a time from an archive member


class BundleError(ValueError):
    """A bundle is malformed, unsafe, untrusted, too large, or fails policy.

    `reason` is one of "invalid", "unsafe", "untrusted", "too_large", "policy" so a server can
    map it to a status code; the message names the file, field or value at fault.
    """

    exit_code = errors.VERIFY

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed `verify_bundle`, extracted at `dir` (holding bag/ and the attestation),
    or `verify_bundle_stream` (dir None: nothing was extracted).

    route: "plan" (the payload is images) or "cvae" (embeddings), as the payload, the signed
    predicate and the data card all agree. datacard: bag/datacard.json's content (checked
    against the signed predicate: site, bundle_id, route, n_samples).
    """

    dir: Path | None
    site: str
    bundle_id: str
    sequence: int
    statement: dict
    n_samples: int
    key_id: str = ""  # the registered key that verified the signature
    route: str = "plan"
    datacard: dict = dataclasses.field(default_factory=dict)

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


def bundle_id_for(site: str, data: np.ndarray, labels: np.ndarray) -> str:
    """The content-derived bundle id (see the module docstring).

    data: uint8 images [N,H,W] or float32 embeddings [N,D]; labels: int [N]. The two kinds hash
    under different domain strings, so an image set and an embedding set never share an id.
    """
    h = hashlib.sha256()
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
        # Unchanged since v1: existing bundles keep their ids.
        h.update(b"plan-node-bundle-v1\0" + site.encode() + b"\0")
        h.update(json.dumps(list(data.shape)).encode() + b"\0")
        h.update(np.ascontiguousarray(data, dtype=np.uint8).tobytes())
    elif isinstance(data, np.ndarray) and data.dtype == np.float32 and data.ndim == 2:
        h.update(b"plan-node-bundle-embeddings-v1\0" + site.encode() + b"\0")
        h.update(json.dumps({"dtype": "<f4", "shape": list(data.shape)}, sort_keys=True).encode() + b"\0")
        h.update(np.ascontiguousarray(data, dtype="<f4").tobytes())
    else:
        raise BundleError(
            f"bundle_id_for: expected uint8 images [N,H,W] or float32 embeddings [N,D], got "
            f"{getattr(data, 'dtype', type(data))} shape {getattr(data, 'shape', None)}"
        )
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()[:32]


def _check_labels(labels: np.ndarray, n: int, what: str) -> None:
    """labels: int [n] class indices 0..99, one per sample of the `n` `what` (at least one)."""
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise BundleError(
            f"labels must be int64 [N], got {getattr(labels, 'dtype', type(labels))} "
            f"shape {getattr(labels, 'shape', None)}"
        )
    if n != len(labels) or n == 0:
        raise BundleError(f"need as many labels as {what}, at least one: {n} {what}, {len(labels)} labels")
    if labels.min() < 0 or labels.max() > 99:
        raise BundleError(f"labels must be class indices in 0..99, got range {labels.min()}..{labels.max()}")


def _check_arrays(images: np.ndarray, labels: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3:
        raise BundleError(
            f"images must be uint8 [N,H,W], got {getattr(images, 'dtype', type(images))} "
            f"shape {getattr(images, 'shape', None)}"
        )
    _check_labels(labels, len(images), "images")
    if max(images.shape[1:]) > MAX_IMAGE_SIDE:
        raise BundleError(f"images larger than {MAX_IMAGE_SIDE} pixels a side: {images.shape[1:]}")


def _check_embeddings(embeddings: np.ndarray, labels: np.ndarray) -> None:
    # float32 exactly (native little-endian): anything else would be silently cast, and the
    # bundle id and the safetensors bytes would then describe different numbers.
    if (
        not isinstance(embeddings, np.ndarray)
        or embeddings.dtype != np.dtype("<f4")
        or embeddings.ndim != 2
        or embeddings.shape[1] == 0
    ):
        raise BundleError(
            f"embeddings must be float32 [N,D] with D >= 1, got "
            f"{getattr(embeddings, 'dtype', type(embeddings))} shape {getattr(embeddings, 'shape', None)}"
        )
    _check_labels(labels, len(embeddings), "embeddings")
    finite = np.isfinite(embeddings)
    if not finite.all():
        r, c = (int(i) for i in np.argwhere(~finite)[0])
        raise BundleError(
            f"embeddings must be finite: [{r},{c}] is {embeddings[r, c]} ({int((~finite).sum())} non-finite values)"
        )


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


def _canonical_json(obj, what: str = "value") -> str:
    try:
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise BundleError(f"{what}: not plain JSON without NaN/Infinity ({e})") from None


def _write_image_payload(bag_dir: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """images/<class>/<i>.png and labels.csv (`file,label`) straight into `bag_dir`."""
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


def _write_embedding_payload(bag_dir: Path, embeddings: np.ndarray, labels: np.ndarray) -> None:
    """embeddings.safetensors (one F32 [N,D] tensor) and labels.csv (`index,label`) into `bag_dir`."""
    path = bag_dir / EMBEDDINGS
    save_safetensors({EMBEDDINGS_TENSOR: np.ascontiguousarray(embeddings, dtype="<f4")}, str(path))
    # Read back what the library wrote with the verifier's own parser: a build that could not
    # verify fails here, not at every receiver.
    _read_safetensors_header(path, f"data/{EMBEDDINGS}")
    with open(bag_dir / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["index", "label"])
        w.writerows((i, int(y)) for i, y in enumerate(labels))


def build_bundle(
    out_dir: Path,
    *,
    images: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
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

    Exactly one payload: images, uint8 [N,H,W] grey (the PLAN route), or embeddings, float32
    [N,D] finite (the CVAE route); labels: int [N] class indices 0..99. `audit` is the audit
    result dict (it must say passed: true to be accepted anywhere); `policy` defaults to
    audit["policy"]. `datacard` is completed with site, bundle_id, sequence, counts, route (the
    payload's; a datacard naming another route is refused), data_format, image_shape or
    embedding_dim, created_at, code_version and config_digest; the route also goes into the
    signed predicate. Everything is checked before anything is written. The bundle is assembled
    in a temporary folder and renamed into place, so `out_dir/<bundle_id>` is complete or absent.
    Refuses if it already exists.
    """
    if (images is None) == (embeddings is None):
        raise BundleError(
            "give exactly one payload: images (PLAN route) or embeddings (CVAE route), got "
            + ("both" if images is not None else "neither")
        )
    if images is not None:
        _check_arrays(images, labels)
        route, data = "plan", images
    else:
        _check_embeddings(embeddings, labels)
        route, data = "cvae", embeddings
    if not isinstance(datacard, Mapping):
        raise BundleError(f"datacard must be a mapping, got {type(datacard).__name__}")
    if datacard.get("route") is not None and datacard["route"] != route:
        raise BundleError(
            f"datacard route {datacard['route']!r} contradicts the payload: "
            f"{'images' if route == 'plan' else 'embeddings'} are the {route!r} route's"
        )
    if not isinstance(sequence, int) or sequence < 1:
        raise BundleError(f"sequence must be a positive integer, got {sequence!r}")
    labels = labels.astype(np.int64)
    out_dir = Path(out_dir)
    bundle_id = bundle_id_for(site, data, labels)
    final = out_dir / bundle_id
    if final.exists():
        raise BundleError(f"{final}: bundle already exists")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{bundle_id}."))
    try:
        bag_dir = work / BAG
        bag_dir.mkdir()
        # The payload goes straight into bag/; bagit.make_bag moves it under data/.
        if route == "plan":
            _write_image_payload(bag_dir, images, labels)
        else:
            _write_embedding_payload(bag_dir, embeddings, labels)
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
            route=route,
            data_format=DATA_FORMATS[route],
            created_at=card.get("created_at") or dt.datetime.now(dt.timezone.utc).isoformat(),
            code_version=version,
            config_digest=config_digest,
        )
        if route == "plan":
            card.update(image_shape=[int(images.shape[1]), int(images.shape[2])], image_format="png-grey8")
            card.pop("embedding_dim", None)
        else:  # a caller's image fields would describe a payload this bundle does not hold
            card.update(embedding_dim=int(embeddings.shape[1]))
            card.pop("image_shape", None)
            card.pop("image_format", None)
        (bag_dir / "audit.json").write_text(_canonical_json(audit, "audit"))
        (bag_dir / "datacard.json").write_text(_canonical_json(card, "datacard"))
        tag_digest = _write_tagmanifest(bag_dir)

        statement = {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": TAGMANIFEST, "digest": {"sha256": tag_digest}}],
            "predicateType": predicate_type,
            "predicate": {
                "site": site,
                "bundle_id": bundle_id,
                "sequence": sequence,
                "route": route,
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
        raise BundleError(f"archive member {short(name)!r}: name has control characters or backslashes", "unsafe")
    if name.startswith("/"):
        raise BundleError(f"archive member {short(name)!r}: absolute path", "unsafe")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if not parts:
        raise BundleError(f"archive member {short(name)!r}: empty path", "unsafe")
    if ".." in parts:
        raise BundleError(f"archive member {short(name)!r}: '..' in path", "unsafe")
    return parts


def safe_extract(tar: Path | BinaryIO, dest: Path, *, max_bytes: int, max_members: int = MAX_MEMBERS) -> list[str]:
    """Extract the uncompressed tar `tar` into `dest` (new or empty); return the file paths.

    `tar`: a path, or a binary file read front to back (tarfile seeks in it, forward and within
    the member it reads), e.g. an upload still arriving; its size is then the caller's to bound.
    Only regular files and directories are extracted, each with fresh permissions (0644/0755).
    Refuses (BundleError) absolute paths, '..', symlinks, hard links, devices, FIFOs, duplicate
    names, more than `max_members` members, and more than `max_bytes` bytes of content in total,
    counted while copying: a member never yields more bytes than its header declares.
    On refusal, whatever was extracted stays in `dest` for the caller to remove.
    """
    with _Members(spill_dir=None) as members:
        _read_members(tar, members, max_bytes=max_bytes, max_members=max_members, dest=Path(dest), trusted_keys=None)
        return list(members.digests)


def _tar_name(tar: Path | BinaryIO) -> str:
    return Path(tar).name if isinstance(tar, (str, Path)) else Path(getattr(tar, "name", "bundle.tar")).name


def _read_members(
    tar: Path | BinaryIO,
    members: "_Members",
    *,
    max_bytes: int,
    max_members: int,
    dest: Path | None,
    trusted_keys: Mapping[str, Sequence] | None,
) -> None:
    """Walk the tar's members once, front to back, under the safety rules of safe_extract, and
    gather into `members` what the checks need (each file's sha256, see _Members); with a `dest`
    (new or empty), also extract them there. Without one nothing is written but `members`' spill
    files: the same walk and the same refusals, so a bundle the store verifies in flight is held
    to exactly the rules of one a node extracts.

    The archive is read by common.tarscan, never by tarfile. With `trusted_keys` (a bundle, not
    any archive) the first member must be the attestation, and its signature is verified
    (members.open_statement) before the next member is read: nothing unsigned is parsed beyond
    the tar headers."""
    if isinstance(tar, (str, Path)):
        size = os.path.getsize(tar)
        if size > max_bytes + 1024 * 1024:  # tar headers and padding on top of the content budget
            raise BundleError(f"{_tar_name(tar)}: archive is {size} bytes, over the limit of {max_bytes}", "too_large")
    root = None
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise BundleError(f"{dest}: extraction folder is not empty")
        root = str(dest.resolve())
    budget = max_bytes
    files: set[str] = set()
    folders: set[str] = set()
    made: set[str] = set()  # folders made under root
    with open(tar, "rb") if isinstance(tar, (str, Path)) else contextlib.nullcontext(tar) as src:
        try:
            for n, (m, body) in enumerate(iter_tar(src)):
                if n >= max_members:
                    raise BundleError(f"{_tar_name(tar)}: more than {max_members} archive members", "too_large")
                rel = _claim_member(m, files, folders)
                if n == 0 and trusted_keys is not None:
                    _check_first_member(rel, m, tar)
                if m.isdir():
                    if root is not None:
                        _make_folders(root, rel, m.name, made)
                    continue
                if m.size > budget:
                    raise BundleError(
                        f"archive member {rel!r}: {m.size} bytes would exceed the limit of {max_bytes} bytes",
                        "too_large",
                    )
                out = None if root is None else _create_file(root, rel, m.name, made)
                with out or contextlib.nullcontext():
                    members.take(_MemberReader(body, m.size, rel, out))
                budget -= m.size
                if n == 0 and trusted_keys is not None:
                    members.open_statement(trusted_keys)  # before one byte of the payload is read
        except TarFormatError as e:
            if e.unsafe:
                raise BundleError(str(e), "unsafe") from None
            raise BundleError(f"{_tar_name(tar)}: corrupt tar archive ({e})") from None


def _check_first_member(rel: str, m: TarEntry, tar: Path | BinaryIO) -> None:
    """The signed statement comes first, small, so it is verified before the payload is parsed."""
    if rel != ATTESTATION or not m.isreg():
        raise BundleError(
            f"{_tar_name(tar)}: the first archive member is {short(rel)!r}, not {ATTESTATION} "
            f"(the signed statement comes first and is checked before anything else)",
            "unsafe",
        )
    if m.size > MAX_ATTESTATION_BYTES:
        raise BundleError(f"{ATTESTATION}: {m.size} bytes, over the limit of {MAX_ATTESTATION_BYTES}", "too_large")


def _claim_member(m: TarEntry, files: set[str], folders: set[str]) -> str:
    """The normalised path of member `m` ("a/b"), recorded in `files` or `folders` (the paths
    claimed so far, folders with every folder above them); refused unless `m` is a regular file
    or a folder, its path is safe (_safe_member_path), no folder above it is a file of the
    archive, and a file's path was not claimed before. Checked on paths, not on disk, so that
    the walk that extracts nothing refuses exactly what extraction would."""
    parts = _safe_member_path(m.name)  # links, devices and FIFOs never get here: common.tarscan refuses them
    rel = "/".join(parts)
    above = parts if m.isdir() else parts[:-1]
    # A folder already in `folders` had every folder above it checked when it was added, and
    # no file can take a folder's path afterwards: only new folders need checking.
    if above and "/".join(above) not in folders:
        for i in range(1, len(above) + 1):
            folder = "/".join(above[:i])
            if folder in files:
                raise BundleError(f"archive member {m.name!r}: its folder {folder} is a file of the archive", "unsafe")
            folders.add(folder)
    if m.isreg():
        if rel in files or rel in folders:
            raise BundleError(f"archive member {rel!r}: appears twice", "unsafe")
        files.add(rel)
    return rel


def _make_folders(root: str, rel: str, name: str, made: set[str]) -> None:
    """Make the folder `rel` (0755, with its parents) under the extraction folder `root`, unless
    it is in `made` (the folders made so far), then add it there; `name` (the member's) names it
    in errors.

    No path resolution: `rel` passed _claim_member (relative, no '..', no folder of it is a
    file), the extraction folder was empty, every folder in it is made here and only regular
    files and folders are ever created in it (links are refused), so no path under `root` can
    lead outside it. Resolving each folder (realpath) cost more than the rest of extraction."""
    if rel in made:
        return
    try:
        os.makedirs(f"{root}/{rel}", mode=0o755, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # _claim_member refuses this first; kept as a guard
        raise BundleError(f"archive member {name!r}: a folder of {rel} is a file of the archive", "unsafe") from None
    made.add(rel)


def _create_file(root: str, rel: str, name: str, made: set[str]) -> BinaryIO:
    """The new file `rel` under the extraction folder `root`, open for writing (0644), its
    folder made first; O_EXCL and O_NOFOLLOW guard the file itself (see _make_folders)."""
    folder = rel.rpartition("/")[0]
    if folder:
        _make_folders(root, folder, name, made)
    try:
        fd = os.open(f"{root}/{rel}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:  # _claim_member refuses this first; kept as a guard
        raise BundleError(f"archive member {rel!r}: appears twice", "unsafe") from None
    return os.fdopen(fd, "wb")


class _MemberReader:
    """One archive member of `size` bytes (declared by its header) read from `src`, each byte
    hashed (sha256) and, with an `out` file, copied there as it is read: whoever inspects the
    member reads it through this, so that it is read once. `rel` names it in errors."""

    def __init__(self, src: BinaryIO, size: int, rel: str, out: BinaryIO | None):
        self._src, self._out = src, out
        self.size, self.rel = size, rel
        self._hash = hashlib.sha256()
        self._done = 0  # bytes read

    def read(self, n: int = _BLOCK) -> bytes:
        """Up to `n` bytes (n >= 0); b"" at the member's end. More bytes than declared are refused."""
        if self._done > self.size:  # refused before: say so again to whoever reads on
            raise BundleError(f"archive member {self.rel!r}: more bytes than declared", "unsafe")
        block = self._src.read(min(n, self.size - self._done + 1))  # +1: a longer member shows
        self._done += len(block)
        if self._done > self.size:
            raise BundleError(f"archive member {self.rel!r}: more bytes than declared", "unsafe")
        self._hash.update(block)
        if self._out is not None:
            self._out.write(block)
        return block

    def finish(self) -> str:
        """Read the rest; the sha256 (hex) of all the member's bytes. Refuses a truncated one."""
        while self.read():
            pass
        if self._done != self.size:
            raise BundleError(f"archive member {self.rel!r}: truncated ({self._done} of {self.size} bytes)")
        return self._hash.hexdigest()


def read_predicate(tar: Path | BinaryIO) -> dict:
    """The attestation predicate of a bundle tar (a path or an open binary file), NOT verified:
    for addressing an upload, or for showing figures of bundles that were verified when stored.
    Only the first member, the attestation, is read (common.tarscan)."""
    name = _tar_name(tar)
    try:
        with open(tar, "rb") if isinstance(tar, (str, Path)) else contextlib.nullcontext(tar) as src:
            m, body = next(iter_tar(src))
            _check_first_member("/".join(_safe_member_path(m.name)), m, tar)
            env = json.loads(body.read())
        return json.loads(base64.b64decode(env["payload"]))["predicate"]
    except BundleError:
        raise
    except (StopIteration, KeyError, ValueError, TypeError, OSError) as e:  # TarFormatError is a ValueError
        raise BundleError(f"{name}: cannot read the predicate of {ATTESTATION} ({e})") from None


def read_bundle_site(tar_path: Path) -> str:
    """The site a bundle tar's attestation claims, NOT verified: for addressing an upload only."""
    predicate = read_predicate(Path(tar_path))
    if not isinstance(predicate, dict) or not isinstance(predicate.get("site"), str):
        raise BundleError(f"{tar_path}: cannot read the site from {ATTESTATION} (no site in the predicate)")
    return predicate["site"]


# ---------------------------------------------------------------- verify


class _Members:
    """What the checks need of a bundle tar, gathered while its members stream past once
    (_read_members). The checks read only this, never extracted files, so one set of checks
    serves a bundle extracted to disk (verify_bundle) and one that is only streamed through
    (verify_bundle_stream).

    digests: sha256 (hex) of every regular file by its normalised path ("bag/data/labels.csv");
    sizes: their sizes in bytes; heads: the first _PNG_HEAD bytes of each other payload file, by
    its path in data/ (for the PNG header check); embeddings: the scan of
    data/embeddings.safetensors, if there is one. The files the checks parse (_KEPT) are kept
    whole: in memory up to _KEEP_IN_MEMORY bytes each, beyond that (a manifest or labels.csv of
    many samples) in a temporary file under `spill_dir`, removed by close().
    """

    def __init__(self, spill_dir: Path | None):
        self.digests: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.heads: dict[str, bytes] = {}
        self.embeddings: _EmbeddingScan | None = None
        self._kept: dict[str, bytes | Path] = {}
        self._spill_dir = spill_dir
        self.statement: tuple[dict, str] | None = None  # (statement, signer key id) once verified

    def open_statement(self, trusted_keys: Mapping[str, Sequence]) -> tuple[dict, str]:
        """Verify the attestation read so far (_open_statement); remember and return (statement, signer)."""
        self.statement = _open_statement(_read_json(self, ATTESTATION, ATTESTATION), trusted_keys)
        return self.statement

    def __enter__(self) -> "_Members":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the spill files."""
        for kept in self._kept.values():
            if isinstance(kept, Path):
                kept.unlink(missing_ok=True)

    def take(self, member: _MemberReader) -> None:
        """Read `member` to its end, keeping what the checks need of it."""
        rel = member.rel
        if rel in _KEPT:
            self._keep(member)
        elif rel == f"{_DATA}{EMBEDDINGS}":
            self.embeddings = _EmbeddingScan.of(member, f"data/{EMBEDDINGS}")
        elif rel.startswith(_DATA):
            self.heads[rel[len(_DATA) :]] = member.read(_PNG_HEAD)
        self.digests[rel] = member.finish()
        self.sizes[rel] = member.size

    def _keep(self, member: _MemberReader) -> None:
        if member.size <= _KEEP_IN_MEMORY:
            self._kept[member.rel] = b"".join(iter(member.read, b""))
            return
        fd, name = tempfile.mkstemp(dir=self._spill_dir, prefix="member-")
        self._kept[member.rel] = Path(name)
        with os.fdopen(fd, "wb") as f:
            for block in iter(member.read, b""):
                f.write(block)

    def read_bytes(self, rel: str) -> bytes:
        """The whole content of kept file `rel` (KeyError if it was not in the archive)."""
        kept = self._kept[rel]
        return kept if isinstance(kept, bytes) else kept.read_bytes()

    def open_text(self, rel: str) -> TextIO:
        """Kept file `rel` open as UTF-8 text (newlines untranslated, for csv)."""
        kept = self._kept[rel]
        if isinstance(kept, bytes):
            return io.TextIOWrapper(io.BytesIO(kept), encoding="utf-8", newline="")
        return open(kept, encoding="utf-8", newline="")


@dataclass(frozen=True)
class _EmbeddingScan:
    """data/embeddings.safetensors as checked while it streamed: `shape` (N, D), or the first
    `fault` found (header, then values). A fault is kept, not raised, so that the checks report
    it in its usual place: after the signature and the bag, like every other payload check."""

    shape: tuple[int, int] | None
    fault: BundleError | None

    @classmethod
    def of(cls, member: _MemberReader, what: str) -> "_EmbeddingScan":
        """Scan `member` from its start: the header parsed and bounded (_parse_safetensors_header),
        then every value checked finite (_check_finite); leaves the rest for the caller to read."""
        try:
            n, d, _ = _parse_safetensors_header(member, member.size, what)
            _check_finite(member, what, n, d)
        except BundleError as e:
            return cls(None, e)
        return cls((n, d), None)

    def result(self) -> tuple[int, int]:
        """(N, D), or raise the fault."""
        if self.fault is not None:
            raise self.fault
        return self.shape


def _read_json(members: _Members, rel: str, what: str):
    """The JSON content of kept file `rel`; `what` names it in errors."""
    if members.sizes[rel] > MAX_JSON_BYTES:
        raise BundleError(f"{what}: larger than {MAX_JSON_BYTES} bytes", "too_large")
    try:
        return json.loads(members.read_bytes(rel).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: [[[[...
        raise BundleError(f"{what}: not valid JSON ({type(e).__name__}: {e})") from None


def _check_layout(files: list[str]) -> None:
    """Only the attestation and bag/{tag files, data/...} may be present."""
    for rel in files:
        if rel == ATTESTATION:
            continue
        if rel.startswith(_DATA):
            continue
        if rel.startswith(f"{BAG}/") and rel[len(BAG) + 1 :] in TAG_FILES:
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
                raise BundleError(
                    f"registered key of site {site!r}: bad validity window {after!r}..{until!r}", "untrusted"
                )
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
    signatures = env.get("signatures")
    if isinstance(signatures, list) and len(signatures) > MAX_SIGNATURES:
        raise BundleError(
            f"{ATTESTATION}: {len(signatures)} signatures; a bundle carries at most {MAX_SIGNATURES}", "unsafe"
        )
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
    windows = ", ".join(
        f"{kid[:12]}: {after + 1}..{'' if until is None else until}" for kid, _, after, until in entries
    )
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


def _read_labels(data_dir: Path) -> list[tuple[str, int]]:
    """labels.csv rows of the image bundle at `data_dir` (see _parse_labels)."""
    with open(data_dir / "labels.csv", newline="", encoding="utf-8") as f:
        return _parse_labels(f)


def _parse_labels(f: TextIO) -> list[tuple[str, int]]:
    """labels.csv rows, each checked: a payload path of the expected form matching its label."""
    rows = []
    try:
        reader = csv.reader(f)
        if next(reader, None) != ["file", "label"]:
            raise BundleError("data/labels.csv: header must be 'file,label'")
        for i, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise BundleError(f"data/labels.csv line {i}: expected 2 fields, got {len(row)}")
            m = _PAYLOAD_FILE.match(row[0])
            if not m or not _LABEL.fullmatch(row[1]) or int(row[1]) != int(m.group(1)):
                raise BundleError(f"data/labels.csv line {i}: bad row {row!r}")
            rows.append((row[0], int(row[1])))
    except (UnicodeDecodeError, csv.Error) as e:
        raise BundleError(f"data/labels.csv: not a readable CSV file ({type(e).__name__}: {e})") from None
    if not rows:
        raise BundleError("data/labels.csv: no samples")
    return rows


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: refuse duplicate keys, which parsers resolve differently (the
    safetensors library and we must see the same header)."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _is_count(v) -> bool:
    return type(v) is int and v >= 0  # not bool, not float: JSON 24.0 == 24 in Python


def _read_safetensors_header(path: Path, what: str) -> tuple[int, int, int]:
    """(N, D, byte offset of the data) of the embeddings file at `path` (see _parse_safetensors_header)."""
    with open(path, "rb") as f:
        return _parse_safetensors_header(f, path.stat().st_size, what)


def _parse_safetensors_header(f: BinaryIO, size: int, what: str) -> tuple[int, int, int]:
    """(N, D, byte offset of the data) of an embeddings file of `size` bytes, from its header
    alone, read from `f` (at the file's start; left just past the header).

    The header is parsed here, bounded, before any library touches the file: the first 8 bytes
    are its length (little-endian u64), then that many bytes of JSON. Only exactly one tensor
    "embeddings" of dtype F32 and shape [N,D] (N, D >= 1), whose data_offsets are [0, 4*N*D] and
    which ends the file, is accepted; an optional "__metadata__" must be a str -> str object.
    `what` names the file in errors.
    """
    head = f.read(8)
    if len(head) < 8:
        raise BundleError(f"{what}: {size} bytes, too short for a safetensors file (an 8-byte header length first)")
    (hlen,) = struct.unpack("<Q", head)
    if hlen > MAX_SAFETENSORS_HEADER:
        raise BundleError(
            f"{what}: declares a {hlen}-byte header, over the limit of {MAX_SAFETENSORS_HEADER} bytes", "too_large"
        )
    if hlen < 2 or 8 + hlen > size:
        raise BundleError(f"{what}: declares a {hlen}-byte header but the file has {size} bytes")
    raw = f.read(hlen)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"{what}: header is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise BundleError(f"{what}: header must be a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise BundleError(f"{what}: __metadata__ must be an object of strings")
    if list(header) != [EMBEDDINGS_TENSOR]:
        raise BundleError(f"{what}: must hold exactly one tensor {EMBEDDINGS_TENSOR!r}, holds {sorted(header)}")
    t = header[EMBEDDINGS_TENSOR]
    if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
        raise BundleError(
            f"{what}: tensor {EMBEDDINGS_TENSOR!r} must have exactly dtype, shape and data_offsets, "
            f"has {sorted(t) if isinstance(t, dict) else type(t).__name__}"
        )
    if t["dtype"] != "F32":
        raise BundleError(f"{what}: tensor {EMBEDDINGS_TENSOR!r} has dtype {t['dtype']!r}, expected 'F32'")
    shape = t["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_count(v) and v >= 1 for v in shape)):
        raise BundleError(f"{what}: tensor {EMBEDDINGS_TENSOR!r} has shape {shape!r}, expected [N, D] with N, D >= 1")
    n, d = shape
    nbytes = 4 * n * d
    offsets = t["data_offsets"]
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(v) for v in offsets)
        and offsets == [0, nbytes]
    ):
        raise BundleError(
            f"{what}: tensor {EMBEDDINGS_TENSOR!r} has data_offsets {offsets!r}, expected [0, {nbytes}] for F32 {shape}"
        )
    if 8 + hlen + nbytes != size:
        raise BundleError(
            f"{what}: {size} bytes, but its {hlen}-byte header and F32 {shape} data make {8 + hlen + nbytes}"
        )
    return n, d, 8 + hlen


def _check_finite(f: BinaryIO, what: str, n: int, d: int) -> None:
    """Every one of the N*D little-endian float32 values read from `f` (at the data's start) is
    finite; read in blocks, so checking costs no more memory than a block."""
    block = 1 << 18  # values: 1 MiB, as the member is read
    done, total = 0, n * d
    while done < total:
        k = min(block, total - done)
        buf = f.read(4 * k)
        if len(buf) != 4 * k:
            raise BundleError(f"{what}: truncated data ({done + len(buf) // 4} of {total} values)")
        x = np.frombuffer(buf, dtype="<f4")
        bad = ~np.isfinite(x)
        if bad.any():
            i = done + int(np.argmax(bad))
            raise BundleError(f"{what}: embedding [{i // d},{i % d}] is {x[i - done]}, expected a finite value")
        done += k


def _read_index_labels(path: Path, n: int, what: str) -> np.ndarray:
    """int64 [n] labels from the embedding bundle's labels.csv at `path` (see _parse_index_labels)."""
    with open(path, newline="", encoding="utf-8") as f:
        return _parse_index_labels(f, n, what)


def _parse_index_labels(f: TextIO, n: int, what: str = "data/labels.csv") -> np.ndarray:
    """int64 [n] labels from an embedding bundle's labels.csv: header `index,label`, then exactly
    n rows whose index is 0..n-1 in order (canonical decimal) and whose label is 0..99."""
    labels = np.empty(n, np.int64)
    count = 0
    try:
        reader = csv.reader(f)
        if next(reader, None) != ["index", "label"]:
            raise BundleError(f"{what}: header must be 'index,label'")
        for line, row in enumerate(reader, start=2):
            if count >= n:
                raise BundleError(f"{what} line {line}: more rows than the {n} embeddings")
            if len(row) != 2 or not _LABEL.fullmatch(row[1]):
                raise BundleError(f"{what} line {line}: bad row {row!r}, expected 'index,label' with a label 0..99")
            if row[0] != str(count):
                raise BundleError(
                    f"{what} line {line}: index {row[0]!r}, expected {count} "
                    f"(one row per embedding, indices 0..N-1 in order)"
                )
            labels[count] = int(row[1])
            count += 1
    except (UnicodeDecodeError, csv.Error) as e:
        raise BundleError(f"{what}: not a readable CSV file ({type(e).__name__}: {e})") from None
    if count != n:
        raise BundleError(f"{what}: {count} rows but {EMBEDDINGS} holds {n} embeddings")
    return labels


def _check_png_header(head: bytes, rel: str) -> None:
    """Refuse payload file `rel` (in data/) if its first bytes `head` are not a PNG's or its header
    declares more than MAX_IMAGE_SIDE pixels a side: a few compressed bytes can decode to
    gigabytes (decompression bomb), so this is checked from the 24-byte header, before anyone
    decodes it."""
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise BundleError(f"data/{rel}: not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    if not (0 < width <= MAX_IMAGE_SIDE and 0 < height <= MAX_IMAGE_SIDE):
        raise BundleError(
            f"data/{rel}: PNG declares {width}x{height} pixels, over the limit of {MAX_IMAGE_SIDE} a side "
            f"(decompression bomb?)",
            "too_large",
        )


def _check_image_payload(members: _Members, payload: set[str]) -> int:
    """N: labels.csv lists exactly the PNGs present (`payload`: the paths in data/), each with a
    sane header."""
    with members.open_text(f"{_DATA}labels.csv") as f:
        rows = _parse_labels(f)
    listed = {r for r, _ in rows}
    if len(listed) != len(rows):
        raise BundleError("data/labels.csv: a file is listed twice")
    if payload != listed | {"labels.csv"}:
        extra = sorted(payload - listed - {"labels.csv"}) or sorted(listed - payload)
        raise BundleError(f"data/{extra[0]}: payload and labels.csv disagree")
    for rel, _ in rows:
        _check_png_header(members.heads[rel], rel)
    return len(rows)


def _check_embedding_payload(members: _Members, payload: set[str]) -> tuple[int, int]:
    """(N, D): the payload (`payload`: the paths in data/) is exactly labels.csv and a
    well-formed, all-finite embeddings.safetensors, and they agree."""
    expected = {"labels.csv", EMBEDDINGS}
    if payload != expected:
        extra = sorted(payload - expected)
        if extra:
            raise BundleError(
                f"data/{extra[0]}: unexpected in an embedding bundle (its payload is exactly "
                f"data/labels.csv and data/{EMBEDDINGS})"
            )
        raise BundleError(f"data/{sorted(expected - payload)[0]}: missing from the embedding bundle")
    n, d = members.embeddings.result()
    with members.open_text(f"{_DATA}labels.csv") as f:
        _parse_index_labels(f, n)
    return n, d


def _check_route(route: str, pred: dict, card: dict, dim: int | None) -> None:
    """The signed predicate and the data card must name the route the payload is.

    An image bundle may lack predicate.route (signed before the predicate carried one); an
    embedding bundle never does, and its data card must also state data_format and embedding_dim.
    """
    kind = "images" if route == "plan" else "embeddings"
    if pred.get("route") != route and not (route == "plan" and "route" not in pred):
        raise BundleError(
            f"{ATTESTATION}: predicate.route is {pred.get('route')!r} but the payload holds {kind} (route {route!r})"
        )
    if card.get("route") != route and not (route == "plan" and "route" not in card):
        raise BundleError(
            f"datacard.json: route is {card.get('route')!r} but the payload holds {kind} (route {route!r})"
        )
    fmt = card.get("data_format")
    if fmt != DATA_FORMATS[route] and not (route == "plan" and "data_format" not in card):
        raise BundleError(f"datacard.json: data_format is {fmt!r}, expected {DATA_FORMATS[route]!r} for {kind}")
    if route == "cvae" and (type(card.get("embedding_dim")) is not int or card["embedding_dim"] != dim):
        raise BundleError(
            f"datacard.json: embedding_dim is {card.get('embedding_dim')!r} but {EMBEDDINGS} holds "
            f"{dim}-dimensional embeddings"
        )


def _check_members(members: _Members, trusted_keys: Mapping[str, Sequence]) -> VerifiedBundle:
    """Every check of verify_bundle after the walk, on what the walk gathered (`members`); the
    VerifiedBundle it returns has no dir (the caller sets it when it extracted)."""
    _check_layout(list(members.digests))
    statement, signer = members.statement or members.open_statement(trusted_keys)
    _check_bag(members)

    subject = statement.get("subject")
    if (
        not isinstance(subject, list)
        or len(subject) != 1
        or not isinstance(subject[0], dict)
        or subject[0].get("name") != TAGMANIFEST
    ):
        raise BundleError(f"{ATTESTATION}: subject must be exactly [{TAGMANIFEST}]")
    signed_digest = (subject[0].get("digest") or {}).get("sha256")
    actual = members.digests[f"{BAG}/{TAGMANIFEST}"]
    if signed_digest != actual:
        raise BundleError(f"{TAGMANIFEST}: sha256 {actual} does not match the signed subject digest {signed_digest}")

    pred = statement.get("predicate")
    if not isinstance(pred, dict):
        raise BundleError(f"{ATTESTATION}: predicate must be an object")
    site, bundle_id, sequence = pred.get("site"), pred.get("bundle_id"), pred.get("sequence")
    if not isinstance(bundle_id, str) or not BUNDLE_ID.fullmatch(bundle_id):
        raise BundleError(f"{ATTESTATION}: predicate.bundle_id {bundle_id!r} is not 32 hex digits")
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 1:
        raise BundleError(f"{ATTESTATION}: predicate.sequence {sequence!r} is not a positive integer")
    audit = pred.get("audit")
    if not isinstance(audit, dict):
        raise BundleError(f"{ATTESTATION}: predicate.audit must be an object")
    if _read_json(members, f"{BAG}/audit.json", "audit.json") != audit:
        raise BundleError("audit.json: differs from the signed predicate.audit")
    card = _read_json(members, f"{BAG}/datacard.json", "datacard.json")
    if not isinstance(card, dict) or card.get("site") != site or card.get("bundle_id") != bundle_id:
        raise BundleError("datacard.json: site or bundle_id differs from the signed predicate")

    payload = {rel[len(_DATA) :] for rel in members.digests if rel.startswith(_DATA)}
    # The layout is told by what the payload holds, never by a (signed but) claimed route;
    # the claims are then checked against it.
    if EMBEDDINGS in payload:
        route = "cvae"
        n, dim = _check_embedding_payload(members, payload)
        if card.get("n_samples") != n:
            raise BundleError(f"datacard.json: n_samples is {card.get('n_samples')!r} but {EMBEDDINGS} holds {n}")
    else:
        route, n, dim = "plan", _check_image_payload(members, payload), None
    _check_route(route, pred, card, dim)
    if pred.get("n_samples") != n or isinstance(pred.get("n_samples"), bool):
        raise BundleError(f"{ATTESTATION}: predicate.n_samples {pred.get('n_samples')!r} but the payload holds {n}")

    if audit.get("passed") is not True:
        raise BundleError(f"audit did not pass (predicate.audit.passed is {audit.get('passed')!r})", "policy")
    return VerifiedBundle(
        dir=None,
        site=site,
        bundle_id=bundle_id,
        sequence=sequence,
        statement=statement,
        n_samples=n,
        key_id=signer,
        route=route,
        datacard=card,
    )


def verify_bundle(
    tar: Path | BinaryIO,
    trusted_keys: Mapping[str, Sequence],
    *,
    max_bytes: int,
    dest: Path | None = None,
) -> VerifiedBundle:
    """Extract the bundle tar `tar` safely and check everything before anyone uses it.

    `tar`: a path, or a binary file read front to back (an upload still arriving, say: see
    safe_extract); every byte is read once, its digests computed as it is extracted.

    trusted_keys: site -> that site's keys: PEM text, Ed25519PublicKey, or {"pem", "valid_after",
    "valid_until"} (server.trust's sequence windows; only a key whose window holds the bundle's
    signed sequence may verify it).
    Checks: safe extraction within `max_bytes`; exactly the expected files; the DSSE signature
    against a registered key of the site the statement names; the bag (every payload and tag
    digest, completeness: _check_bag); the statement's subject digest against the actual tag
    manifest; predicate fields; audit.json and datacard.json consistent with the signed predicate;
    the payload, by its layout: images (labels.csv against the PNGs present, each PNG header)
    or embeddings (exactly labels.csv and embeddings.safetensors, its header parsed here and
    bounded before anything else reads it, every value finite, labels.csv indices 0..N-1); the
    route that the payload is, against predicate.route and the data card; predicate.n_samples;
    predicate.audit.passed is true.

    Extracts into `dest` (must be new or empty) or a new temporary folder; the caller owns and
    removes `VerifiedBundle.dir`. On failure, raises BundleError and removes what it extracted.
    verify_bundle_stream makes the same checks without extracting.
    """
    if dest is not None and Path(dest).exists() and any(Path(dest).iterdir()):
        raise BundleError(f"{dest}: extraction folder is not empty")  # before we own anything in it
    created = dest is None or not Path(dest).exists()
    out = Path(tempfile.mkdtemp(prefix="plan-bundle-")) if dest is None else Path(dest)
    try:
        with _Members(spill_dir=None) as members:
            _read_members(
                tar, members, max_bytes=max_bytes, max_members=MAX_MEMBERS, dest=out, trusted_keys=trusted_keys
            )
            return dataclasses.replace(_check_members(members, trusted_keys), dir=out)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        raise


def verify_bundle_stream(
    tar: Path | BinaryIO,
    trusted_keys: Mapping[str, Sequence],
    *,
    max_bytes: int,
    spill_dir: Path | None = None,
) -> VerifiedBundle:
    """verify_bundle's checks, every one, without extracting: the members are read once as they
    stream past, hashed, PNG headers and the embeddings checked on the way, and only the small
    files the checks parse kept (in memory; one over 16 MiB, a manifest or labels.csv of very
    many samples, in a temporary file under `spill_dir`, removed before returning).

    For a receiver that keeps the tar, not the files (the coordinator's store): the returned
    VerifiedBundle has dir None and the data card in `datacard`. Raises BundleError as
    verify_bundle does.
    """
    with _Members(spill_dir=spill_dir) as members:
        _read_members(tar, members, max_bytes=max_bytes, max_members=MAX_MEMBERS, dest=None, trusted_keys=trusted_keys)
        return _check_members(members, trusted_keys)


# ---------------------------------------------------------------- load


def _data_dir(dir: Path) -> Path:
    """data/ of a bundle folder (holding bag/) or of the bag itself."""
    dir = Path(dir)
    return (dir / BAG if (dir / BAG).is_dir() else dir) / "data"


def bundle_route(dir: Path) -> str:
    """ "cvae" if the bundle (folder or bag) holds embeddings, else "plan": the layout decides."""
    return "cvae" if os.path.lexists(_data_dir(dir) / EMBEDDINGS) else "plan"


def load_bundle_images(dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,H,W], labels int64 [N]) of a verified bundle, in labels.csv order.

    `dir` is a bundle folder (holding bag/) or the bag itself. Paths come from labels.csv only
    after matching `images/<label>/<i>.png`; images must all be grey and of one size.
    """
    data_dir = _data_dir(dir)
    if bundle_route(dir) != "plan":
        raise BundleError(
            f"{data_dir / EMBEDDINGS}: the bundle holds embeddings (CVAE route), not images; "
            f"use load_bundle_embeddings or load_bundle_data"
        )
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


def load_bundle_embeddings(dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 [N,D], labels int64 [N]) of a verified bundle, row i labelled by
    labels.csv's index i.

    `dir` is a bundle folder (holding bag/) or the bag itself. The header is checked with the
    verifier's own bounded parser before the safetensors library reads the file (numpy
    framework: nothing is unpickled); shape, dtype and finiteness are checked again after.
    """
    data_dir = _data_dir(dir)
    path = data_dir / EMBEDDINGS
    if not path.is_file() or path.is_symlink():
        raise BundleError(f"{path}: missing; the bundle holds no embeddings (an image bundle? use load_bundle_data)")
    n, d, _ = _read_safetensors_header(path, str(path))
    labels = _read_index_labels(data_dir / "labels.csv", n, str(data_dir / "labels.csv"))
    try:
        with safe_open(str(path), framework="np") as f:
            names = list(f.keys())
            if names != [EMBEDDINGS_TENSOR]:
                raise BundleError(f"{path}: must hold exactly one tensor {EMBEDDINGS_TENSOR!r}, holds {names}")
            x = f.get_tensor(EMBEDDINGS_TENSOR)
    except SafetensorError as e:
        raise BundleError(f"{path}: the safetensors library cannot read it ({e})") from None
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape != (n, d):
        raise BundleError(
            f"{path}: loaded {getattr(x, 'dtype', type(x))} {getattr(x, 'shape', None)}, expected float32 [{n},{d}]"
        )
    if not np.isfinite(x).all():
        raise BundleError(f"{path}: holds non-finite values")
    return np.require(x, np.float32, ["C", "W"]), labels


def key_vouches(trusted_keys: Mapping[str, Sequence], site: str, kid: str, sequence: int) -> bool:
    """Whether key `kid` of `site` is among `trusted_keys` with a window holding `sequence`."""
    return any(
        k == kid and after < sequence and (until is None or sequence <= until)
        for k, _, after, until in _key_entries(site, trusted_keys.get(site, []))
    )


def recheck_signer(bundle_dir: Path, trusted_keys: Mapping[str, Sequence]) -> str:
    """The id of a registered key that still vouches for the verified bundle at `bundle_dir` (as
    verify_bundle placed it: bag/ and the attestation). Raises BundleError (reason "untrusted") when
    none does any more: the signer's key was revoked, or its window no longer holds the bundle's
    sequence. The payload's digests were checked when the bundle was verified; only trust changes."""
    path = Path(bundle_dir) / ATTESTATION
    try:
        env = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable ({e})") from None
    return _open_statement(env, trusted_keys)[1]


def load_bundle_data(dir: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """(route, data, labels int64 [N]) of a verified bundle, by its layout: ("plan", images
    uint8 [N,H,W], labels) or ("cvae", embeddings float32 [N,D], labels)."""
    if bundle_route(dir) == "cvae":
        return ("cvae", *load_bundle_embeddings(dir))
    return ("plan", *load_bundle_images(dir))
