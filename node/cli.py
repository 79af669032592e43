"""`plan-node`: a site's command line. Each command parses its arguments and calls one stage."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from common import errors
from common.config import ConfigError, commented_yaml
from common.errors import run_cli
from common.fileio import atomic_write_text
from common.procs import exit_on_sigterm
from node.site.create import create_site, site_config
from node.site.workspace import Workspace

app = typer.Typer(
    help="plan-node: train a private generative model on a hospital's images, audit and publish "
    "synthetic data as a signed bundle, and join the Flower federation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals hold configs and key material
)
console = Console(stderr=True, soft_wrap=True)  # messages hold paths: never broken across lines

SiteDir = typer.Option(Path("site"), "--site-dir", help="The site workspace (site.yaml, keys, data, models...).")


def _workspace(site_dir: Path) -> Workspace:
    ws = Workspace(site_dir)
    try:
        ws.config()
    except ConfigError as e:
        errors.fail(e, errors.CONFIG)
    return ws


@app.command()
def init(
    site_dir: Path = SiteDir,
    name: str = typer.Option("site", help="Site name (lower case, digits, - and _), as registered at the coordinator."),
    source: str = typer.Option("phantom", help="Data source: phantom, npz, folder or csv."),
    data_path: Path = typer.Option(None, help="The .npz file, image folder or CSV manifest (not for phantom)."),
    phantom_seed: int = typer.Option(0, help="Seed of the built-in phantom clinic (a different clinic per seed)."),
    exchange: str = typer.Option("127.0.0.1:50051", help="The coordinator's exchange, host:port."),
    superlink: str = typer.Option("127.0.0.1:9092", help="The coordinator's Flower SuperLink, host:port."),
    supernode_port: int = typer.Option(9094, help="Local port this site's SuperNode binds."),
    ca_cert: Path = typer.Option(None, help="The federation CA certificate (copied to keys/ca.crt)."),
    kit: Path = typer.Option(
        None, "--kit", help="Install the site kit from the coordinator into this (initialised) workspace."
    ),
    profile: str = typer.Option(
        "cpu", help="Model sizes: cpu (tiny, trains in minutes on 2 cores) or gpu (a CUDA site)."
    ),
) -> None:
    """Create a site workspace: a commented site.yaml and the site's Ed25519 signing key.

    With --kit, install the coordinator's site kit into an existing workspace instead (node/release/kit.py).
    """
    ws = Workspace(site_dir)
    if kit is not None:
        return _install_kit(ws, kit)
    try:
        cfg = site_config(
            profile, name=name, source=source, data_path=data_path, phantom_seed=phantom_seed, exchange=exchange,
            superlink=superlink, supernode_port=supernode_port,
        )  # fmt: skip
        create_site(ws, cfg, ca_cert=ca_cert)
    except (ValueError, FileExistsError) as e:
        errors.fail(e, errors.CONFIG)
    console.print(
        f"site {name!r} initialised in {ws.root}; register {ws.signing_pub} and {ws.node_pub} at the coordinator"
    )


def _install_kit(ws: Workspace, kit: Path) -> None:
    from common.sitekit import KitError
    from node.release.kit import install_kit

    if not ws.config_path.exists():
        errors.fail(
            f"{ws.config_path} not found: run `plan-node init --site-dir {ws.root} --name NAME` first, send "
            f"keys/signing.pub to the coordinator, then install the kit it returns",
            errors.CONFIG,
        )
    try:
        meta = install_kit(_workspace(ws.root), kit)
    except (KitError, ConfigError) as e:
        errors.fail(e, errors.CONFIG)
    console.print(
        f"site kit of federation {meta['federation']!r} installed in {ws.keys}; exchange {meta['exchange']}, "
        f"SuperLink {meta['superlink']}"
    )


def _pipeline(site_dir: Path, upto: str, force: bool, note: str | None = None) -> Workspace:
    from node.site.attempts import AttemptRefused
    from node.stages import run_pipeline

    ws = _workspace(site_dir)
    try:
        run_pipeline(ws, upto=upto, force=force, note=note)
    except AttemptRefused as e:
        errors.fail(f"refused: {e}", errors.GATE)
    return ws


@app.command()
def train(site_dir: Path = SiteDir, force: bool = typer.Option(False, help="Run even if up to date.")) -> None:
    """Ingest and split the data, then train the GAN, phi_id and phi_class (resumes if interrupted)."""
    _pipeline(site_dir, "train", force)


@app.command()
def synthesize(
    site_dir: Path = SiteDir,
    force: bool = typer.Option(False, help="Run even if up to date."),
    route: str = typer.Option(None, help="plan or cvae: set synth.route in site.yaml first (it stays set)."),
) -> None:
    """PLAN route: invert, k-same anchors, PLAN walks (or linear), render candidate images. CVAE
    route: sample candidate embeddings from the CVAE trained on the pinned extractor's embeddings."""
    if route is not None:
        _set_route(_workspace(site_dir), route)
    _pipeline(site_dir, "synthesize", force)


def _set_route(ws: Workspace, route: str) -> None:
    cfg = ws.config()
    if route not in ("plan", "cvae"):
        errors.fail(f"--route must be plan or cvae, got {route!r}", errors.CONFIG)
    if cfg.synth.route != route:
        cfg.synth.route = route
        atomic_write_text(ws.config_path, commented_yaml(cfg, title=f"plan-node site config for {cfg.name!r}"))
        console.print(f"{ws.config_path}: synth.route is now {route!r}")


@app.command()
def audit(
    site_dir: Path = SiteDir,
    force: bool = typer.Option(False, help="Run even if up to date."),
    note: str = typer.Option(
        None, help="Why this attempt: required, with a new synth.seed, after policy.max_attempts failed audits."
    ),
) -> None:
    """Membership and re-identification audit of the candidates; the release gate."""
    ws = _pipeline(site_dir, "audit", force, note)
    from node.site.status import print_audit

    if not print_audit(ws, console):
        raise typer.Exit(errors.GATE)


@app.command()
def publish(site_dir: Path = SiteDir) -> None:
    """Sign the accepted set as a bundle and upload it to the coordinator (only if the gate passed)."""
    from node.release.publish import publish as publish_stage

    bundle_id = publish_stage(_workspace(site_dir))
    if bundle_id is None:
        errors.fail("nothing published: the audit gate did not pass (see `plan-node audit`)", errors.GATE)
    console.print(f"published bundle {bundle_id}")


@app.command()
def pull(site_dir: Path = SiteDir) -> None:
    """Download and verify every bundle in the coordinator's pool."""
    from node.release.pull import pull as pull_stage

    new = pull_stage(_workspace(site_dir))
    console.print(f"{len(new)} new verified bundle(s) in the pool")


@app.command("fetch-assets")
def fetch_assets(site_dir: Path = SiteDir) -> None:
    """Fetch the federation's pinned feature-extractor weights (synth.extractor) from the coordinator
    into the site's model store, checked against their sha256; nothing to do for arch tiny."""
    from common.modelstore import ModelStoreError
    from node.release.assets import fetch_extractor_weights
    from node.release.exchange_client import ExchangeError

    ws = _workspace(site_dir)
    try:
        path = fetch_extractor_weights(ws, ws.config().synth.extractor, say=console.print)
    except (ExchangeError, ModelStoreError, ValueError, OSError) as e:
        errors.fail(e, errors.exit_code_of(e) or errors.DATA)
    console.print("extractor tiny: no weight file to fetch" if path is None else f"extractor weights ready: {path}")


@app.command()
def start(site_dir: Path = SiteDir) -> None:
    """Run every stage not yet done, publish, pull, then join the federation (flower-supernode)."""
    from node.start import start_node

    exit_on_sigterm()
    raise typer.Exit(start_node(_workspace(site_dir), say=console.print))


@app.command()
def doctor(
    site_dir: Path = SiteDir,
    network: bool = typer.Option(True, help="Also dial the exchange and the SuperLink (TLS handshake, names checked)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Check config, data (and the federation's schema), keys, kit and certificate, the coordinator,
    disk and GPU before any training; exits with the code of the first failure."""
    from node.doctor import as_dicts, check_site, exit_code

    checks = check_site(Workspace(site_dir), network=network)
    if as_json:
        print(json.dumps(as_dicts(checks), indent=2))
    else:
        style = {"ok": "green", "warn": "yellow", "fail": "red"}
        for c in checks:
            console.print(f"{c.status:4}  {c.name:12} {c.detail}", style=style[c.status], markup=False)
    raise typer.Exit(exit_code(checks))


@app.command()
def dashboard(
    site_dir: Path = SiteDir,
    port: int = typer.Option(8051, "--port", help="Port on 127.0.0.1 (0: any free port)."),
) -> None:
    """Serve the site's own page on loopback: stages, ledger, audits and reports, bundles, rounds."""
    from common.procs import exit_on_sigterm
    from node.dashboard import serve_site_dashboard

    exit_on_sigterm()
    page = serve_site_dashboard(_workspace(site_dir), port=port)
    console.print(f"site dashboard: {page.url} (loopback only; Ctrl-C stops it)")
    try:
        page.wait()
    finally:
        page.stop()


@app.command()
def status(site_dir: Path = SiteDir, as_json: bool = typer.Option(False, "--json")) -> None:
    """Stages done, the last audit, published bundles, the pool and the last federation round."""
    from node.site.status import print_status, site_status

    info = site_status(_workspace(site_dir))
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print_status(info, Console())


def main() -> None:
    """The `plan-node` entry point: domain errors as one line and an exit code (common/errors.py)."""
    run_cli(app, prog="plan-node")
