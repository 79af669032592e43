"""`plan-server` commands for the federation's keys: `ca init`, `kit`, `sites rotate|revoke|list`, `exchange`.

Registered onto the main app by server.cli (`register`). Private keys are never printed; the
commands print paths and key ids only.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from common import errors
from common.config import ConfigError
from common.eventlog import append_event
from common.nodekey import check_node_public_key
from server.coordinator import CoordinatorDir

console = Console(stderr=True, soft_wrap=True)  # messages hold paths: never broken across lines
DirOption = typer.Option(Path("coord"), "--dir", help="The coordinator directory.")


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as e:
        errors.fail(f"{path}: cannot read the {what} ({e.strerror})")


def ca_init(
    dir: Path = DirOption,
    host: list[str] = typer.Option(None, "--host", help="Names/IPs the server certificate is valid for (repeat)."),
) -> None:
    """Create whatever is missing of the federation CA, the server certificate and the coordinator key."""
    from server.authority import init_authority

    cd = CoordinatorDir(dir)
    try:
        name = cd.config().name
    except ConfigError as e:
        errors.fail(f"{e} (run `plan-server init` to create a coordinator directory)")
    made = init_authority(cd.root, name, hosts=host or None)
    for p in made:
        console.print(f"created {p}")
    if any(p.name == "server.crt" for p in made):
        names = ", ".join(cd.server_names())
        console.print(f"the server certificate covers {names}; restart a running `plan-server start` to use it")
    console.print("nothing to do: CA, server certificate and coordinator key exist" if not made else "done")


def kit(
    name: str = typer.Argument(..., help="Site name, as in its site.yaml."),
    key: Path = typer.Option(..., "--key", help="The site's Ed25519 signing public key (keys/signing.pub)."),
    node_key: Path = typer.Option(
        None, "--node-key", help="The site's Flower SuperNode public key (keys/flower_node.pub)."
    ),
    out: Path = typer.Option(None, "--out", help="Where to write the kit (default: <dir>/kits/<name>.kit.tar)."),
    exchange: str = typer.Option(None, help="host:port sites dial for the exchange (default: federation.yaml)."),
    superlink: str = typer.Option(None, help="host:port sites dial for the SuperLink (default: federation.yaml)."),
    days: int = typer.Option(825, min=1, help="Validity of the site's client certificate, in days."),
    dir: Path = DirOption,
) -> None:
    """Register a site's keys and write its site kit (CA, client certificate and key, coordinator key, addresses)."""
    from server.kit import make_kit

    cd = CoordinatorDir(dir)
    out = out or cd.root / "kits" / f"{name}.kit.tar"
    pem = _read(key, "signing public key")
    try:
        line = check_node_public_key(_read(node_key, "node public key"), source=str(node_key)) if node_key else None
        meta = make_kit(cd, name, pem, out, node_key_line=line, exchange=exchange, superlink=superlink, days=days)
    except (ValueError, ConfigError) as e:  # KitError, TrustError, ConfigError are ValueErrors
        errors.fail(str(e))
    console.print(
        f"site {name!r} registered (signing key {meta['signing_key_id'][:16]}); kit written to {out} (mode 0600)"
    )
    console.print(f"send it to the site over a private channel; there: plan-node init --site-dir SITE --kit {out.name}")


def sites_rotate(
    name: str = typer.Argument(..., help="Site name."),
    key: Path = typer.Option(..., "--key", help="The site's new Ed25519 signing public key (PEM)."),
    dir: Path = DirOption,
) -> None:
    """Replace a site's signing key; the old key stays valid for bundles the pool already holds."""
    from server.store import BundleStore

    cd = CoordinatorDir(dir)
    store = BundleStore(cd.store)
    # Under the index's write lock: no upload lands between reading the last sequence and closing
    # the old key's window at it (one that waits re-reads the windows and is refused).
    with store.write_lock():
        last = store.last_sequence(name)
        try:
            kid = cd.trust().rotate(name, _read(key, "signing public key"), last_sequence=last)
        except ValueError as e:
            errors.fail(str(e))
    append_event(cd.events, "key_rotated", site=name, key_id=kid, last_sequence=last)
    console.print(f"site {name!r}: new key {kid[:16]} signs sequences above {last}; the old key covers 1..{last}")


def sites_revoke(
    name: str = typer.Argument(..., help="Site name."),
    key_id: str = typer.Option(
        None, "--key-id", help="Revoke only this key (8+ hex digits of its id); default: every key."
    ),
    dir: Path = DirOption,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation (scripts)."),
) -> None:
    """Revoke a site's key(s): every bundle signed with them leaves the pool, and no new one is accepted.
    Without --key-id the whole site is revoked: its SuperNode key too (server.coordinator.revoke_node).
    Asks first unless --yes: nothing of it can be undone."""
    import click

    from server.store import BundleStore

    cd = CoordinatorDir(dir)
    what = (
        f"key {key_id} of site {name!r}"
        if key_id
        else f"every key of site {name!r}, its client certificates and its SuperNode key"
    )
    if not yes:
        try:
            confirmed = typer.confirm(
                f"Revoke {what}? Every bundle signed with them leaves the pool; this cannot be undone."
            )
        except click.exceptions.Abort:  # no terminal to ask on
            confirmed = False
        if not confirmed:
            errors.fail(f"nothing revoked: confirm at the prompt, or add --yes to revoke {what}")
    try:
        revoked = cd.trust().revoke(name, key_id)
    except ValueError as e:
        errors.fail(str(e))
    gone = BundleStore(cd.store).remove_signed_by(name, revoked, reason="key revoked")
    append_event(
        cd.events,
        "key_revoked",
        site=name,
        key_ids=revoked,
        whole_site=key_id is None,
        bundles_removed=[b.bundle_id for b in gone],
    )
    console.print(
        f"site {name!r}: revoked key(s) {', '.join(k[:16] for k in revoked)}; "
        f"{len(gone)} bundle(s) removed from the pool"
    )
    if key_id is None:  # the whole site is out: its TLS certificates and Flower too
        from server.coordinator import revoke_node
        from server.revoked import revoke_certificates

        serials = revoke_certificates(cd.revoked_certs, name, cd.issued_certs(name))
        console.print(f"site {name!r}: {len(serials)} client certificate(s) revoked at the exchange")
        console.print(f"site {name!r}: {revoke_node(cd, name) or 'had no SuperNode key'}")


def sites_list(dir: Path = DirOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """Every registered key: site, key id, status (current, retired, revoked) and sequence window."""
    entries = CoordinatorDir(dir).trust().entries()
    if as_json:
        print(json.dumps([{k: v for k, v in e.as_dict().items() if k != "pem"} for e in entries], indent=2))
        return
    table = Table("site", "key id", "status", "sequences", "added")
    for e in entries:
        window = f"{e.valid_after + 1}..{'' if e.valid_until is None else e.valid_until}"
        table.add_row(e.site, e.key_id[:16], e.status, window, e.added_at[:19])
    Console().print(table)


def exchange(dir: Path = DirOption) -> None:
    """Serve only the exchange (mutual TLS) until interrupted."""
    from server.exchange_main import serve_forever

    try:
        serve_forever(dir, say=console.print)
    except ConfigError as e:
        errors.fail(str(e))


def register(app: typer.Typer, sites: typer.Typer) -> None:
    """Add these commands to `plan-server` (app) and its `sites` group."""
    ca = typer.Typer(help="The federation's certificate authority.", no_args_is_help=True)
    ca.command("init")(ca_init)
    app.add_typer(ca, name="ca")
    app.command("kit")(kit)
    app.command("exchange")(exchange)
    sites.command("rotate")(sites_rotate)
    sites.command("revoke")(sites_revoke)
    sites.command("list")(sites_list)
