"""A new site workspace: its commented site.yaml and its two key pairs."""

from __future__ import annotations

import shutil
from pathlib import Path

from common.config import SiteConfig, commented_yaml, profile_site_config
from common.fileio import atomic_write_text
from common.nodekey import generate_node_key
from common.signing import generate_signing_key
from node.site.workspace import Workspace


def site_config(
    profile: str,
    *,
    name: str,
    source: str,
    data_path: Path | None,
    phantom_seed: int,
    exchange: str,
    superlink: str,
    supernode_port: int,
) -> SiteConfig:
    """The profile's SiteConfig with `plan-node init`'s answers filled in (ValueError names a bad one)."""
    return profile_site_config(
        profile,
        name=name,
        data={"source": source, "path": data_path.resolve() if data_path else None, "phantom": {"seed": phantom_seed}},
        coordinator={"exchange": exchange, "superlink": superlink, "supernode_port": supernode_port},
    )


def create_site(ws: Workspace, cfg: SiteConfig, *, ca_cert: Path | None = None) -> None:
    """Write keys/ (mode 0700: the Ed25519 signing key that signs bundles, the SuperNode's key,
    and a copy of the federation CA when given), then site.yaml last, so a site that exists has
    its keys. Refuses (FileExistsError) to overwrite an existing site."""
    if ws.config_path.exists():
        raise FileExistsError(f"{ws.config_path} already exists; refusing to overwrite a site")
    ws.keys.mkdir(parents=True, exist_ok=True)
    ws.keys.chmod(0o700)
    if ca_cert is not None:
        shutil.copyfile(ca_cert, ws.resolve(cfg.coordinator.ca_cert))
    generate_signing_key(ws.signing_key, ws.signing_pub)
    generate_node_key(ws.node_key, ws.node_pub)
    atomic_write_text(ws.config_path, commented_yaml(cfg, title=f"plan-node site config for {cfg.name!r}"))
