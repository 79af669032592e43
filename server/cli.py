"""`plan-server`: the coordinator's command line. It parses arguments and calls server.coordinator."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from common import errors
from common.config import ConfigError
from common.errors import run_cli
from common.procs import exit_on_sigterm
from server.cli_keys import register as _register_key_commands
from server.coordinator import CoordinatorDir, federation_for, init_coordinator, run_coordinator
from server.dashboard import serve_dashboard
from server.nodes import register_site
from server.status import coordinator_status, print_status

app = typer.Typer(
    help="plan-node coordinator: bundle exchange, trust store and Flower federation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)  # locals hold configs and key material
sites = typer.Typer(
    help="Register and list the sites whose signed bundles the coordinator accepts.", no_args_is_help=True
)
app.add_typer(sites, name="sites")
asset = typer.Typer(
    help="Federation assets the exchange serves to sites by sha256 (extractor weights).", no_args_is_help=True
)
app.add_typer(asset, name="asset")
console = Console(stderr=True, soft_wrap=True)  # messages hold paths: never broken across lines

DirOption = typer.Option(Path("coord"), "--dir", help="The coordinator directory.")


@app.command()
def init(
    dir: Path = DirOption,
    name: str = typer.Option("federation", help="Federation name (lower case, digits, - and _)."),
    quorum: int = typer.Option(2, help="Sites with a bundle in the pool before the run starts."),
    min_nodes: int = typer.Option(None, help="SuperNodes online before the run starts (default: the quorum)."),
    rounds: int = typer.Option(3, help="Federated rounds of the downstream classifier."),
    host: list[str] = typer.Option(
        None,
        "--host",
        help=(
            "A name or IP sites dial (repeat): the server certificate covers each; "
            "the first is the kits' default address."
        ),
    ),
    bind: str = typer.Option(
        "127.0.0.1", "--bind", help="Where the exchange and the Fleet gateway listen (0.0.0.0: every interface)."
    ),
) -> None:
    """Create a coordinator directory: federation.yaml, the federation CA and TLS certificate."""
    try:
        cfg = federation_for(name=name, quorum=quorum, min_nodes=min_nodes, rounds=rounds, hosts=host or [], bind=bind)
        cd = init_coordinator(dir, cfg, hosts=host or None)
    except (ValueError, FileExistsError) as e:
        errors.fail(str(e))
    names = ", ".join(cd.server_names())
    console.print(f"coordinator initialised in {cd.root}; listening on {bind}; the server certificate covers {names}")


@app.command()
def start(
    dir: Path = DirOption,
    exit_after_run: bool = typer.Option(False, "--exit-after-run", help="Stop after the first federation run."),
    dashboard_port: int = typer.Option(
        None, "--dashboard-port", help="Also serve the dashboard on 127.0.0.1 at this port (0: any free port)."
    ),
) -> None:
    """Serve the exchange and the Flower SuperLink; run the federation once the pool has a quorum."""
    exit_on_sigterm()
    cd = CoordinatorDir(dir)
    try:
        with _dashboard_beside(cd, dashboard_port):
            results = run_coordinator(cd, exit_after_run=exit_after_run, say=console.print)
    except ConfigError as e:
        errors.fail(str(e))
    if results is not None and not results.get("completed"):
        errors.fail(f"the federation run failed: {results.get('failure', 'it did not complete')}", errors.RUN_FAILED)


@contextmanager
def _dashboard_beside(cd: CoordinatorDir, port: int | None):
    """The dashboard on 127.0.0.1:`port` for as long as the block runs (nothing when port is None)."""
    if port is None:
        yield
        return
    page = serve_dashboard(cd, port=port)
    console.print(f"dashboard: {page.url}")
    try:
        yield
    finally:
        page.stop()


@app.command()
def dashboard(
    dir: Path = DirOption,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; off loopback needs TLS and a token."),
    port: int = typer.Option(8050, "--port", help="Port (0: any free port)."),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="Server certificate (PEM), e.g. tls/server.crt."),
    tls_key: Path = typer.Option(None, "--tls-key", help="Its private key (0600)."),
    token_file: Path = typer.Option(None, "--token-file", help="The operator token (a 0600 file, 16+ characters)."),
) -> None:
    """Serve the read-only federation dashboard: sites, pool, runs and events, updating live."""
    exit_on_sigterm()
    page = serve_dashboard(
        CoordinatorDir(dir), host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, token_file=token_file
    )
    console.print(f"dashboard: {page.url} (Ctrl-C stops it)")
    try:
        page.wait()
    finally:
        page.stop()


@sites.command("add")
def sites_add(
    name: str = typer.Argument(..., help="Site name, as in its site.yaml."),
    key: Path = typer.Option(..., "--key", help="The site's Ed25519 signing public key (PEM)."),
    node_key: Path = typer.Option(None, "--node-key", help="The site's Flower SuperNode public key (OpenSSH)."),
    dir: Path = DirOption,
) -> None:
    """Register a site's signing key (its bundles are accepted) and its SuperNode key (it may join runs)."""
    try:
        register_site(CoordinatorDir(dir), name, key=key, node_key=node_key)
    except ValueError as e:
        errors.fail(str(e))
    console.print(f"site {name!r} registered")


@asset.command("add")
def asset_add(
    file: Path = typer.Argument(..., help="The file to serve, e.g. the feature extractor's weights."),
    dir: Path = DirOption,
    arch: str = typer.Option(None, "--arch", help="The extractor architecture, for the printed federation.yaml lines."),
) -> None:
    """Copy FILE into the coordinator's assets/ under its sha256 and print the lines that pin it in federation.yaml."""
    from server.assets import EXTRACTOR_ARCHS, AssetError, add_asset, extractor_yaml

    if arch is not None and arch not in EXTRACTOR_ARCHS:
        errors.fail(f"--arch {arch!r}: expected one of {', '.join(EXTRACTOR_ARCHS)}")
    try:
        digest, added = add_asset(CoordinatorDir(dir).assets, file)
        lines = extractor_yaml(digest, file.name, arch)
    except (AssetError, OSError, ValueError) as e:
        errors.fail(str(e))
    console.print(f"{file}: {'added as' if added else 'already present as'} {CoordinatorDir(dir).assets / digest}")
    console.print("pin it in federation.yaml (sites fetch it with `plan-node fetch-assets`):")
    print(f"# {file.name}: sha256 {digest}")
    print(lines, end="")


@app.command()
def status(dir: Path = DirOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """Registered sites, pooled bundles with their audit figures, and the current or last federation run."""
    info = coordinator_status(CoordinatorDir(dir))
    if as_json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print_status(info, Console())


# ca init, kit, exchange, sites rotate|revoke|list: the federation's keys (server/cli_keys.py).
_register_key_commands(app, sites)


def main() -> None:
    """The `plan-server` entry point: domain errors as one line and an exit code (common/errors.py)."""
    run_cli(app, prog="plan-server")
