"""The Flower ServerApp the coordinator submits: FedAvg over the sites' downstream classifiers
(a CNN on images, or a head on embeddings when the federation's route is "cvae").

Run config (set by server.federation.submit_run): `federation-config`, the absolute path of the
coordinator's federation.yaml; `out-dir`, where the final model and results go; optionally
`train-on` ("pool", "pool+real" or "real"; default: the federation's downstream.train_on), which
the coordinator sets to "real" for the FedAvg-on-real-data baseline; `pool`, the comma-separated
ids of the bundles the sites train on (the coordinator's pool when it submitted the run); optionally `task`: "cvae"
runs the federated CVAE instead (FederationConfig.cvae_federated): FedAvg over the CVAE's decoder
only, cvae_rounds rounds of cvae_local_epochs local epochs, then one "query.release" message to
every node (each synthesizes, audits and publishes from the final decoder), before the pool is made.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save

from common.config import CvaeConfig, FederationConfig, load_federation_config
from common.fileio import atomic_write_bytes, atomic_write_json
from common.messages import CvaeRelease, CvaeRound, DownstreamRound
from common.models import CVAE, downstream_model, state_sha256
from server.strategy import SiteRecordingFedAvg, SiteRecordingFedProx, site_replies

app = ServerApp()


def _node_limits(fed: FederationConfig, out: Path) -> dict:
    """The strategy's node minimums: every online node is sampled (fraction 1.0), a round needs at
    least fed.round_nodes_needed; and where it records each phase's progress."""
    n = fed.round_nodes_needed
    return {
        "min_train_nodes": n,
        "min_evaluate_nodes": n,
        "min_available_nodes": n,
        "progress_path": out / "progress.json",
    }


def _run(
    grid: Grid, strategy, *, initial: dict, rounds: int, timeout: float, train_config: dict, evaluate_config: dict
) -> tuple[dict, dict]:
    """`rounds` rounds of `strategy` from the `initial` state dict. Returns the final state dict
    (contiguous tensors) and the run's record for results.json: rounds completed, seconds, the
    aggregated and the per-site metrics of every round."""
    t0 = time.time()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=rounds,
        timeout=timeout,
        train_config=ConfigRecord(train_config),
        evaluate_config=ConfigRecord(evaluate_config),
    )
    state = {k: v.contiguous() for k, v in result.arrays.to_torch_state_dict().items()}
    rounds_done = sorted(result.evaluate_metrics_clientapp)
    return state, {
        "rounds_completed": len(rounds_done),
        "completed": len(rounds_done) == rounds,
        "seconds": round(time.time() - t0, 1),
        "evaluate": {str(r): dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
        "train": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "per_site": {str(r): v for r, v in strategy.per_site.items()},
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    fed = load_federation_config(Path(str(context.run_config["federation-config"])))
    out = Path(str(context.run_config["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    if str(context.run_config.get("task", "")) == "cvae":
        return cvae_main(grid, fed, out)
    ds = fed.downstream
    train_on = str(context.run_config.get("train-on") or ds.train_on)
    model = initial_downstream(fed)
    if ds.strategy == "fedprox":
        # FedProx sends `proximal-mu` in every train config; the ClientApp adds the proximal term.
        strategy = SiteRecordingFedProx(proximal_mu=ds.proximal_mu, **_node_limits(fed, out))
    else:
        strategy = SiteRecordingFedAvg(**_node_limits(fed, out))
    # The architecture travels with every message so that a ClientApp builds the same model, and
    # evaluation carries the hyperparameters too: each site trains its local-only yardstick with them.
    pool = [bid for bid in str(context.run_config.get("pool", "")).split(",") if bid]
    config = DownstreamRound.of(fed, train_on=train_on, pool=pool).to_config()
    state, record = _run(
        grid,
        strategy,
        initial=model.state_dict(),
        rounds=ds.rounds,
        timeout=fed.round_timeout_s,
        train_config=config,
        evaluate_config=config,
    )
    atomic_write_bytes(out / "model.safetensors", save(state))
    atomic_write_json(
        out / "results.json", {"rounds": ds.rounds, "strategy": ds.strategy, "train_on": train_on, **record}
    )


def initial_downstream(fed: FederationConfig) -> torch.nn.Module:
    """The federation's downstream classifier with seeded initial weights: two runs over the same
    pool start from the same model, so their figures differ only by what the sites did."""
    ds = fed.downstream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return downstream_model(
            fed.n_classes,
            route=fed.route,
            width=ds.width,
            image_size=fed.image_size,
            embedding_dim=fed.extractor.dim,
            head_hidden=ds.head_hidden,
        )


def federated_cvae(fed: FederationConfig) -> CVAE:
    """The federation's CVAE (its decoder is what the sites average): embeddings of the pinned
    extractor (fed.extractor.dim), fed.n_classes, CvaeConfig's default hidden and latent sizes,
    seeded initial weights."""
    cc = CvaeConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CVAE(fed.extractor.dim, fed.n_classes, hidden=cc.hidden, latent=cc.latent_dim)


def cvae_main(grid: Grid, fed: FederationConfig, out: Path) -> None:
    """The federated CVAE: FedAvg over the decoders, fed.cvae_rounds rounds; the sites keep their
    encoders (node.cvae.federated); then, after a completed run, each node's release (send_release).
    Writes out/decoder.safetensors and out/results.json (its "release": each site's outcome)."""
    model = federated_cvae(fed)
    spec = CvaeRound(
        rounds=fed.cvae_rounds,
        local_epochs=fed.cvae_local_epochs,
        d_in=model.d_in,
        n_classes=model.n_classes,
        hidden=model.hidden,
        latent=model.latent,
    )
    config = spec.to_config()
    state, record = _run(
        grid,
        SiteRecordingFedAvg(**_node_limits(fed, out)),
        initial=model.decoder_state(),
        rounds=fed.cvae_rounds,
        timeout=fed.round_timeout_s,
        train_config=config,
        evaluate_config=config,
    )
    atomic_write_bytes(out / "decoder.safetensors", save(state))
    sha = state_sha256(state)
    if record["completed"]:
        release = CvaeRelease(rounds=fed.cvae_rounds, global_decoder_sha256=sha)
        record["release"] = send_release(grid, release, timeout=fed.round_timeout_s)
    atomic_write_json(
        out / "results.json",
        {
            "task": "cvae",
            "rounds": fed.cvae_rounds,
            "local_epochs": fed.cvae_local_epochs,
            "architecture": spec.arch(),
            "global_decoder_sha256": sha,
            **record,
        },
    )


def send_release(grid: Grid, release: CvaeRelease, *, timeout: float) -> dict[str, dict]:
    """Ask every node to synthesize, audit and publish from the run's final decoder ("query.release").
    Returns {site: {"released": 1.0 / 0.0 / -1.0} or {"error": reason}}; a node that does not
    answer within `timeout` seconds is there as node-<id> with the error saying so."""
    nodes = set(grid.get_node_ids())
    messages = [
        Message(RecordDict({"config": ConfigRecord(release.to_config())}), dst_node_id=n, message_type="query.release")
        for n in sorted(nodes)
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    sites = site_replies(replies, nodes)
    answered = {m.metadata.src_node_id for m in replies}
    for n in sorted(nodes - answered):
        sites.setdefault(f"node-{n}", {"error": f"no reply to query.release within {timeout:g} s"})
    return sites
