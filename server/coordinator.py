"""The coordinator's main loop: the exchange, the SuperLink behind the Fleet gateway, then one
federation run at quorum (server/runs.py). The directory's layout is in server/directory.py.

Only the Fleet gateway (server/fleet_gateway.py) listens on `superlink_host:superlink_port`; the
SuperLink itself, with its unauthenticated Control API, listens on 127.0.0.1 only.
"""

from __future__ import annotations

import time
from typing import Callable

from common.config import FederationConfig
from common.content import ContentSpec
from common.procs import stop
from server import federation
from server.directory import CoordinatorDir, federation_for, init_coordinator
from server.exchange import serve
from server.fleet_gateway import FleetGateway, GatewayServer, append_line, node_keys
from server.nodes import register_nodes, revoke_node
from server.runs import cvae_outcome, run_cvae, run_failure, run_once, wait_for_quorum
from server.store import BundleStore
from server.trust import TrustStore

# re-exported: the coordinator's public API in one import
__all__ = ["CoordinatorDir", "federation_for", "init_coordinator", "revoke_node", "run_failure", "cvae_outcome"]


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
        register_nodes(cd, say)
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
            wait_for_quorum(cd, store, 0, fed.nodes_needed, superlink, say, since=superlink_started)
            cvae = run_cvae(cd, fed, out / "cvae", say)
            for line in cvae_outcome(cvae, out / "cvae"):
                say(line)
        wait_for_quorum(cd, store, fed.quorum, fed.nodes_needed, superlink, say, since=superlink_started)
        results = run_once(cd, fed, store, say, out=out, cvae=cvae)
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
