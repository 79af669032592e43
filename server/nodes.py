"""A site's keys at the coordinator: registering its signing key and SuperNode key, the SuperNode
keys at the SuperLink, and revoking one (the Fleet gateway stops admitting it at once; its
registration leaves the SuperLink now or at the next start)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from common.eventlog import append_event
from common.fileio import atomic_write_json
from common.nodekey import check_node_public_key
from common.signing import load_public_key, public_pem
from server import federation
from server.directory import CoordinatorDir


def register_site(cd: CoordinatorDir, site: str, *, key: Path, node_key: Path | None) -> None:
    """Register a site: its Ed25519 signing public key (PEM file `key`; its bundles are accepted)
    and, when given, its SuperNode public key (OpenSSH file `node_key`; it may join runs). Both
    files are read and parsed before anything is written; ValueError names a bad file. A conflict
    with what is registered (another node key, a revoked key) is found by the write that meets it."""
    pem = public_pem(load_public_key(key))
    try:
        node_line = check_node_public_key(node_key.read_text(), source=str(node_key)) if node_key else None
    except OSError as e:
        raise ValueError(f"{e.filename}: cannot read public key ({e.strerror})") from e
    if node_line:
        cd.add_node_key(site, node_line)
    cd.trust().add(site, pem)
    append_event(cd.events, "site_registered", site=site, supernode_key=node_line is not None)


def revoke_node(cd: CoordinatorDir, site: str) -> str | None:
    """Revoke a site's SuperNode key. The Fleet gateway stops admitting it at once (its file moves
    to flower_nodes/revoked/); its registration leaves the SuperLink now if one is running, else
    at the coordinator's next start. Returns what was done, or None when the site had no node key."""
    pub = cd.node_keys / f"{site}.pub"
    if not pub.exists():
        return None
    cd.revoked_node_keys.mkdir(parents=True, exist_ok=True)
    pub.replace(cd.revoked_node_keys / pub.name)
    names_path = cd.node_keys / "nodes.json"
    names = json.loads(names_path.read_text()) if names_path.exists() else {}
    node_ids = [node_id for node_id, name in names.items() if name == site]
    pending = unregister_nodes(cd, node_ids)
    atomic_write_json(names_path, {k: v for k, v in names.items() if k not in set(node_ids) - set(pending)})
    if pending:
        pending_path = cd.revoked_node_keys / "pending.json"
        known = json.loads(pending_path.read_text()) if pending_path.exists() else []
        atomic_write_json(pending_path, sorted(set(known) | set(pending)))
        return (
            f"SuperNode key revoked; node(s) {', '.join(pending)} leave the SuperLink at the coordinator's next start"
        )
    return f"SuperNode key revoked; node(s) {', '.join(node_ids) or 'none'} unregistered"


def unregister_nodes(cd: CoordinatorDir, node_ids: list[str]) -> list[str]:
    """Unregister these nodes at the running SuperLink; returns those it could not reach for."""
    left = []
    for node_id in node_ids:
        try:
            federation.unregister_node(cd.flwr_home, node_id)
        except federation.FlowerError as e:
            if "not found" not in str(e).lower():
                left.append(node_id)
        except (OSError, subprocess.TimeoutExpired):
            left.append(node_id)
    return left


def register_nodes(cd: CoordinatorDir, say) -> None:
    """Register every site's SuperNode key at the SuperLink; remember which node id is which site.
    Revocations made while the SuperLink was down (their registrations persist in superlink.db) are carried out."""
    names_path = cd.node_keys / "nodes.json"
    names = json.loads(names_path.read_text()) if names_path.exists() else {}
    pending_path = cd.revoked_node_keys / "pending.json"
    if pending_path.exists():
        pending = json.loads(pending_path.read_text())
        left = unregister_nodes(cd, pending)
        if left:
            raise federation.FlowerError(
                f"could not unregister the revoked SuperNode(s) {', '.join(left)}; see the SuperLink's log"
            )
        say(f"revoked SuperNode(s) {', '.join(pending)} unregistered")
        names = {k: v for k, v in names.items() if k not in pending}
        atomic_write_json(names_path, names)
        pending_path.unlink()
    for pub in sorted(cd.node_keys.glob("*.pub")):
        node_id = federation.register_node(cd.flwr_home, pub, name=pub.stem)
        if node_id is not None:
            names[node_id] = pub.stem
            say(f"SuperNode key of {pub.stem!r} registered (node {node_id})")
    if names:
        atomic_write_json(names_path, names)
