"""Verifying a bundle before anyone uses it: extracted (verify_bundle) or only streamed through
(verify_bundle_stream), with one set of checks.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Mapping, Sequence

from common.bundle.archive import _read_members
from common.bundle.bagcheck import _check_bag
from common.bundle.format import (
    _DATA,
    ATTESTATION,
    BAG,
    BUNDLE_ID,
    DATA_FORMATS,
    EMBEDDINGS,
    MAX_MEMBERS,
    TAG_FILES,
    TAGMANIFEST,
    BundleError,
    VerifiedBundle,
)
from common.bundle.members import _Members, _read_json
from common.bundle.parsers import _check_png_header, _parse_index_labels, _parse_labels


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
