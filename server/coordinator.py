"""The coordinator's workspace and its main loop: exchange + SuperLink, then one federation run at quorum.

Layout of the coordinator directory (`--dir`):

    federation.yaml     the federation config (quorum, ports, policy floor, downstream model)
    ca/                 the federation CA (ca.key 0600 never leaves this machine)
    tls/                the coordinator's server certificate for the exchange, the Fleet gateway and the SuperLink
    keys/               coordinator.key (0600) + .pub: signs the trust document, the pool listing and Flower Apps
    clients/            <site>.crt: the client certificate of the latest kit of each site (server.kit);
                        issued/<site>-<serial>.crt: every one issued; revoked.json: the exchange's deny-list
    trust.db            registered site signing keys
    store/              the bundle pool: content-addressed tars + SQLite index (.serving.lock: held by the exchange)
    assets/<sha256>     federation assets the exchange serves (server/assets.py), e.g. extractor weights
    superlink.db        Flower's state, so registrations and run history survive a restart
    flower_nodes/       <site>.pub: the SuperNode keys the Fleet gateway admits; revoked/: revoked sites' keys
    fab_signatures/     <sha256>.json: the coordinator's signature on each Flower App it submitted
    runs/<stamp>/       one folder per federation run: results.json, model.safetensors
                        (cvae/: the federated CVAE's run before it, when cvae_federated)
    events.jsonl        uploads accepted and refused, key rotations and revocations, runs started
                        and ended (common/eventlog.py): what the dashboard lists
    logs/               the SuperLink's log; gateway.log: the Fleet gateway's refusals

Only the Fleet gateway (server/fleet_gateway.py) listens on `superlink_host:superlink_port`; the
SuperLink itself, with its unauthenticated Control API, listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.config import FederationConfig, dump_yaml, load_federation_config
from common.content import ContentSpec
from common.eventlog import append_event
from common.fileio import atomic_write_json, atomic_write_text
from common.procs import stop
from server import federation
from server.authority import init_authority
from server.exchange import serve
from server.fleet_gateway import FleetGateway, GatewayServer, append_line, node_keys
from server.report import write_curves
from server.store import BundleStore
from server.trust import TrustStore


@dataclass(frozen=True)
class CoordinatorDir:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "federation.yaml"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def coordinator_key(self) -> Path:
        return self.root / "keys" / "coordinator.key"

    @property
    def coordinator_pub(self) -> Path:
        return self.root / "keys" / "coordinator.pub"

    @property
    def trust_db(self) -> Path:
        return self.root / "trust.db"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def revoked_certs(self) -> Path:
        """The client certificates the exchange refuses (server/revoked.py)."""
        return self.root / "clients" / "revoked.json"

    def issued_certs(self, site: str) -> list[Path]:
        """Every client certificate issued to `site` that is on record."""
        return sorted({*self.root.glob(f"clients/issued/{site}-*.crt"), *self.root.glob(f"clients/{site}.crt")})

    @property
    def assets(self) -> Path:
        """Federation assets by sha256 (server/assets.py); the exchange serves `assets/` beside `store/`."""
        return self.root / "assets"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def flwr_home(self) -> Path:
        return self.root / ".flwr"

    @property
    def node_keys(self) -> Path:
        """`<site>.pub`: each site's Flower SuperNode public key; `nodes.json`: node id -> site."""
        return self.root / "flower_nodes"

    @property
    def revoked_node_keys(self) -> Path:
        return self.node_keys / "revoked"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def fab_signatures(self) -> Path:
        return self.root / "fab_signatures"

    def add_node_key(self, site: str, public_key_line: str) -> None:
        path = self.node_keys / f"{site}.pub"
        if path.exists() and path.read_text().strip() != public_key_line:
            raise ValueError(f"site {site!r} already has another Flower node key ({path})")
        for revoked in self.revoked_node_keys.glob("*.pub"):
            if revoked.read_text().strip() == public_key_line:
                raise ValueError(f"that Flower node key was revoked ({revoked}); the site must make a new one")
        atomic_write_text(path, public_key_line + "\n")

    def config(self) -> FederationConfig:
        return load_federation_config(self.config_path)

    def trust(self) -> TrustStore:
        return TrustStore(self.trust_db)


def init_coordinator(root: Path, config: FederationConfig, *, hosts: list[str] | None = None) -> CoordinatorDir:
    """Create a coordinator directory: federation.yaml, the federation CA and the server certificate."""
    cd = CoordinatorDir(Path(root))
    if cd.config_path.exists():
        raise FileExistsError(f"{cd.config_path} already exists; refusing to overwrite a federation")
    cd.root.mkdir(parents=True, exist_ok=True)
    init_authority(cd.root, config.name, hosts=hosts)  # CA, server certificate, coordinator key
    atomic_write_text(cd.config_path, "# plan-node federation config; every key is optional.\n" + dump_yaml(config))
    return cd


def fed_store(cd: CoordinatorDir, fed: FederationConfig) -> BundleStore:
    """The serving coordinator's bundle store, refusing what the federation config rules out; it
    holds the store's serving lock, clears a crash's leftovers and finishes interrupted revocations."""
    store = BundleStore(
        cd.store,
        max_bundle_bytes=fed.max_bundle_bytes,
        policy=fed.policy,
        route=fed.route,
        extractor=fed.extractor.model_dump(mode="json") if fed.route == "cvae" else None,
        site_quota_bytes=fed.site_quota_bytes,
        content=content_spec(fed),
        serving=True,
    )
    purge_revoked(store, cd.trust())
    return store


def purge_revoked(store: BundleStore, trust: TrustStore) -> list[str]:
    """Remove every pooled bundle signed by a revoked key; the ids removed. `sites revoke` does this
    right after revoking; here it completes a revocation that stopped between the two databases."""
    gone = []
    for e in trust.entries():
        if e.revoked_at:
            gone += [r.bundle_id for r in store.remove_signed_by(e.site, [e.key_id], reason="key revoked")]
    return gone


def content_spec(fed: FederationConfig) -> ContentSpec:
    """What every pooled bundle must hold (common/content.py): the federation's classes, image size or
    embedding length."""
    if fed.route == "cvae":
        return ContentSpec(n_classes=fed.n_classes, embedding_dim=fed.extractor.dim)
    return ContentSpec(n_classes=fed.n_classes, image_size=fed.image_size)


def start_exchange(cd: CoordinatorDir, store: BundleStore | None = None):
    """Start the coordinator's exchange (mutual TLS, signed trust store); returns the grpc.Server."""
    fed = cd.config()
    store = store or fed_store(cd, fed)
    return serve(
        store=store,
        trust=cd.trust(),
        host=fed.exchange_host,
        port=fed.exchange_port,
        cert_path=cd.tls_dir / "server.crt",
        key_path=cd.tls_dir / "server.key",
        max_bundle_bytes=fed.max_bundle_bytes,
        client_ca_path=cd.ca_cert,  # mutual TLS: only holders of a site kit get in
        coordinator_key_path=cd.coordinator_key,
        federation=fed.name,
        assets_dir=cd.assets,
        call_timeout_s=fed.exchange_call_timeout_s,
        trust_ttl_s=fed.trust_document_ttl_s,
        revoked_certs_path=cd.revoked_certs,
        idle_timeout_s=fed.exchange_idle_timeout_s,
        calls_per_site=fed.exchange_calls_per_site,
        events_path=cd.events,
    )


def run_coordinator(
    cd: CoordinatorDir,
    *,
    exit_after_run: bool = False,
    say: Callable[[str], None] = print,
) -> dict | None:
    """Serve the exchange and the SuperLink; submit one Flower run once the pool has a quorum.

    Returns the run's results when `exit_after_run`, otherwise serves until interrupted.
    """
    fed = cd.config()
    store = fed_store(cd, fed)
    exchange = start_exchange(cd, store)
    say(f"exchange listening on {fed.exchange_host}:{fed.exchange_port} (mutual TLS)")
    superlink_started = time.time()
    superlink = federation.start_superlink(
        flwr_home=cd.flwr_home,
        port=fed.superlink_internal_port,
        ca_cert=cd.ca_cert,
        cert=cd.tls_dir / "server.crt",
        key=cd.tls_dir / "server.key",
        database=cd.root / "superlink.db",
        log=cd.root / "logs" / "superlink.log",
    )
    gateway = None
    try:
        federation.wait_superlink(cd.flwr_home, superlink)
        say(
            f"SuperLink listening on {federation.LOOPBACK}:{fed.superlink_internal_port} only "
            "(TLS, SuperNode authentication)"
        )
        _register_nodes(cd, say)
        gateway = start_gateway(cd, fed)
        say(
            f"Fleet gateway listening on {fed.superlink_host}:{fed.superlink_port} "
            "(TLS; registered SuperNodes' Fleet calls only)"
        )
        out = cd.runs / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        cvae = None
        if fed.route == "cvae" and fed.cvae_federated:
            # The sites make their bundles from the federation's decoder: first the CVAE run, with
            # every SuperNode needed (no bundle exists yet), then the pool's quorum as usual.
            _wait_for_quorum(cd, store, 0, fed.nodes_needed, superlink, say, since=superlink_started)
            cvae = _run_cvae(cd, fed, out / "cvae", say)
            for line in cvae_outcome(cvae, out / "cvae"):
                say(line)
        _wait_for_quorum(cd, store, fed.quorum, fed.nodes_needed, superlink, say, since=superlink_started)
        results = _run_once(cd, fed, store, say, out=out, cvae=cvae)
        if exit_after_run:
            return results
        say("federation run finished; still serving the exchange (Ctrl-C to stop)")
        while superlink.poll() is None:
            time.sleep(5)
        return results
    finally:
        if gateway is not None:
            gateway.stop()
        stop(superlink)
        exchange.stop(grace=2)


def start_gateway(cd: CoordinatorDir, fed: FederationConfig) -> GatewayServer:
    """The Fleet gateway in front of the loopback SuperLink (server/fleet_gateway.py); its refusals go to
    logs/gateway.log."""
    app = FleetGateway(
        upstream=f"https://{federation.LOOPBACK}:{fed.superlink_internal_port}",
        ca_cert=cd.ca_cert,
        allowed_keys=node_keys(cd.node_keys),
        fab_verifications=federation.fab_verifications(cd.fab_signatures),
        max_body_bytes=fed.fleet_max_body_bytes,
        log=append_line(cd.root / "logs" / "gateway.log"),
    )
    return GatewayServer(
        app,
        host=fed.superlink_host,
        port=fed.superlink_port,
        cert=cd.tls_dir / "server.crt",
        key=cd.tls_dir / "server.key",
    )


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
    pending = _unregister(cd, node_ids)
    atomic_write_json(names_path, {k: v for k, v in names.items() if k not in set(node_ids) - set(pending)})
    if pending:
        pending_path = cd.revoked_node_keys / "pending.json"
        known = json.loads(pending_path.read_text()) if pending_path.exists() else []
        atomic_write_json(pending_path, sorted(set(known) | set(pending)))
        return (
            f"SuperNode key revoked; node(s) {', '.join(pending)} leave the SuperLink at the coordinator's next start"
        )
    return f"SuperNode key revoked; node(s) {', '.join(node_ids) or 'none'} unregistered"


def _unregister(cd: CoordinatorDir, node_ids: list[str]) -> list[str]:
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


def _register_nodes(cd: CoordinatorDir, say) -> None:
    """Register every site's SuperNode key at the SuperLink; remember which node id is which site.
    Revocations made while the SuperLink was down (their registrations persist in superlink.db) are carried out."""
    names_path = cd.node_keys / "nodes.json"
    names = json.loads(names_path.read_text()) if names_path.exists() else {}
    pending_path = cd.revoked_node_keys / "pending.json"
    if pending_path.exists():
        pending = json.loads(pending_path.read_text())
        left = _unregister(cd, pending)
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


def _wait_for_quorum(
    cd: CoordinatorDir, store: BundleStore, quorum: int, nodes_needed: int, superlink, say, *, since: float
) -> None:
    last = None
    while True:
        if superlink.poll() is not None:
            raise federation.FlowerError(f"flower-superlink exited with code {superlink.returncode}")
        pooled = sorted(store.sites_with_bundles())
        online = federation.online_nodes(cd.flwr_home, since=since)
        state = (tuple(pooled), online)
        if state != last:
            say(
                f"pool: {len(pooled)}/{quorum} sites ({', '.join(pooled) or 'none'}); "
                f"SuperNodes online: {online}/{nodes_needed}"
            )
            last = state
        if len(pooled) >= quorum and online >= nodes_needed:
            return
        time.sleep(2)


def _failures(cd: CoordinatorDir, per_site: dict) -> dict:
    """Which site failed or missed which round and phase, and why. Flower calls a run with
    failing ClientApps `completed`, and rounds simply go on without a site that dropped out;
    here such a run is `degraded`, and `missed` lists, for every site with a registered
    SuperNode, the rounds and phases it sent no result for."""
    names_path = cd.node_keys / "nodes.json"
    names = json.loads(names_path.read_text()) if names_path.exists() else {}
    expected = set(names.values())
    errors, missed = [], {}
    for rnd, phases in sorted(per_site.items(), key=lambda kv: int(kv[0])):
        for phase in ("train", "evaluate"):
            sites = phases.get(phase, {})
            replied = set()
            for who, m in sites.items():
                site = names.get(who.removeprefix("node-"), who)
                if "error" in m:
                    errors.append({"round": int(rnd), "phase": phase, "site": site, "error": m["error"]})
                else:
                    replied.add(site)
            for site in sorted((expected | {e["site"] for e in errors}) - replied):
                missed.setdefault(site, []).append({"round": int(rnd), "phase": phase})
    return {"degraded": bool(errors or missed), "errors": errors, "missed": missed}


def _submit_and_wait(
    cd: CoordinatorDir,
    fed: FederationConfig,
    out: Path,
    say,
    *,
    label: str,
    train_on: str | None = None,
    task: str | None = None,
) -> dict:
    """One Flower run of the ServerApp writing to `out`; its results.json with run id, status and failures.
    task "cvae": the federated CVAE's run (fed.cvae_rounds rounds) instead of the downstream classifier's."""
    out.mkdir(parents=True, exist_ok=True)
    run_config = {"federation-config": str(cd.config_path.resolve()), "out-dir": str(out.resolve())}
    if train_on is not None:
        run_config["train-on"] = train_on
    if task is not None:
        run_config["task"] = task
    n_rounds = fed.cvae_rounds if task == "cvae" else fed.downstream.rounds
    run_id = federation.submit_run(
        cd.flwr_home, run_config=run_config, key=cd.coordinator_key, signatures=cd.fab_signatures
    )
    say(f"submitted Flower run {run_id}: {label} ({n_rounds} rounds)")
    append_event(cd.events, "run_started", run_id=run_id, label=label, run_dir=str(out.relative_to(cd.runs)))
    atomic_write_json(
        cd.runs / "latest.json",
        {"run_dir": str(out.relative_to(cd.runs)), "run_id": run_id, "status": "running", "label": label},
    )
    status = federation.wait_run(cd.flwr_home, run_id, timeout=fed.run_timeout_s)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"completed": False}
    results.update({"run_id": run_id, "status": status})
    results.update(_failures(cd, results.get("per_site", {})))
    failure = run_failure(results, n_rounds)
    if failure:
        results["failure"] = failure
    append_event(
        cd.events,
        "run_ended",
        run_id=run_id,
        label=label,
        status=status,
        rounds_completed=results.get("rounds_completed", 0),
        rounds=n_rounds,
        degraded=results["degraded"],
        failure=results.get("failure"),
    )
    say(
        f"run {run_id} ({label}): {status}{' (DEGRADED)' if results['degraded'] else ''}; "
        f"rounds completed {results.get('rounds_completed', 0)}/{n_rounds}"
        + (f"; FAILED: {results['failure']}" if "failure" in results else "")
    )
    for e in results["errors"]:
        say(f"  round {e['round']} {e['phase']}: {e['site']} failed: {e['error']}")
    for site, rounds in results["missed"].items():
        say(f"  {site} missed round(s) {sorted({r['round'] for r in rounds})}")
    return results


def run_failure(results: dict, n_rounds: int) -> str | None:
    """Why a run failed, or None when it completed every round. Flower reports a run whose every
    ClientApp failed as finished:completed, so the rounds completed decide, and the first site
    error says why."""
    if results.get("completed"):
        return None
    first = results["errors"][0] if results.get("errors") else None
    why = (
        f"first error, round {first['round']} {first['phase']} at {first['site']}: {first['error']}"
        if first
        else f"Flower status {results.get('status')}"
    )
    return f"{results.get('rounds_completed', 0)} of {n_rounds} rounds completed; {why}"


def _final_per_site(results: dict, keys: tuple[str, ...], *, prefix: str = "") -> dict:
    """{site: {key: value}} from the last round's per-site evaluation replies of a run."""
    per_site = results.get("per_site", {})
    if not per_site:
        return {}
    last = per_site[max(per_site, key=int)].get("evaluate", {})
    return {site: {k: m[prefix + k] for k in keys if prefix + k in m} for site, m in last.items() if "error" not in m}


METRICS = ("accuracy", "balanced-accuracy", "auroc")


def _run_cvae(cd: CoordinatorDir, fed: FederationConfig, out: Path, say) -> dict:
    """The federated CVAE's Flower run (task "cvae"); its results (rounds, per-site train and
    validation losses, the final decoder's sha256) stay in `out`/results.json."""
    results = _submit_and_wait(cd, fed, out, say, label="federated CVAE (FedAvg of the decoders)", task="cvae")
    atomic_write_json(out / "results.json", results)
    return results


def cvae_outcome(results: dict, out: Path) -> list[str]:
    """What each site did with the federation's final decoder, as lines to report. Raises
    FlowerError when the CVAE run did not complete: no site can then synthesize (they sample only
    from the final round's decoder), so waiting for the pool's quorum would wait forever."""
    if not results.get("completed"):
        raise federation.FlowerError(
            f"the federated CVAE run {results.get('run_id')} did not complete ({results.get('status')}, rounds "
            f"{results.get('rounds_completed', 0)}/{results.get('rounds')}): "
            "no site has the federation's final decoder to sample from, so no bundle can follow; "
            f"see {out / 'results.json'} and the sites' logs"
        )
    per_site = results.get("per_site", {})
    final = per_site[max(per_site, key=int)].get("evaluate", {}) if per_site else {}
    said = {
        1.0: "published its bundle",
        0.0: "published nothing: its audit did not pass",
        -1.0: "failed to synthesize, audit or publish (see its reports/cvae_federated.json)",
    }
    return [f"  {site}: {said.get(m.get('released'), 'sent no release result')}" for site, m in sorted(final.items())]


def _cvae_summary(results: dict, out: Path, runs: Path) -> dict:
    """The coordinator results' `cvae_federated` entry: the CVAE run in brief, its folder named."""
    keep = (
        "run_id",
        "status",
        "completed",
        "rounds",
        "rounds_completed",
        "local_epochs",
        "global_decoder_sha256",
        "degraded",
        "errors",
        "missed",
    )
    return {
        **{k: results[k] for k in keep if k in results},
        "results": str((out / "results.json").relative_to(runs)),
        "per_site": results.get("per_site", {}),
    }


def _run_once(
    cd: CoordinatorDir,
    fed: FederationConfig,
    store: BundleStore,
    say,
    *,
    out: Path | None = None,
    cvae: dict | None = None,
) -> dict:
    """The downstream run (and its baselines) into `out` (default runs/<stamp>); `cvae`: the results
    of the federated CVAE run before it (in out/cvae), summarised into these results."""
    out = out or cd.runs / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results = _submit_and_wait(cd, fed, out, say, label=f"downstream on {fed.downstream.train_on}")
    results["pool"] = sorted(store.sites_with_bundles())
    if cvae is not None:
        results["cvae_federated"] = _cvae_summary(cvae, out / "cvae", cd.runs)
    real = None
    if fed.downstream.baselines:
        real = _submit_and_wait(
            cd, fed, out / "baseline-fedavg-real", say, label="baseline: FedAvg on real data", train_on="real"
        )
        results["baselines"] = {
            "fedavg_real": {
                "run_id": real["run_id"],
                "status": real["status"],
                "completed": bool(real.get("completed")),
                "degraded": real["degraded"],
                "errors": real["errors"],
                "missed": real["missed"],
                "final": real.get("evaluate", {}).get(str(real.get("rounds_completed", 0)), {}),
                "per_site": _final_per_site(real, METRICS),
            },
            "local_only": {"per_site": _final_per_site(results, METRICS, prefix="local-only-")},
        }
    results["per_site_final"] = _final_per_site(results, METRICS)
    atomic_write_json(out / "results.json", results)
    write_curves(out / "curves.png", results, real)
    atomic_write_json(cd.runs / "latest.json", {
        "run_dir": out.name, "run_id": results["run_id"], "label": "finished",
        "status": "failed" if "failure" in results else results["status"], "failure": results.get("failure"),
    })  # fmt: skip
    return results
