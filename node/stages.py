"""The node's ML stages, each a function from workspace files to workspace files, run through
the ledger (node.site.workspace.run_stage) so an up-to-date stage is skipped.

stage       inputs                                          outputs
ingest      site.yaml (+ data.path when not phantom)        data/dataset.npz, data/splits.json
train       site.yaml, data/                                models/ (G_ema, G, D, phi_id, phi_class, phi_attack,
                                                            phi_attack_wide + .json, gan_state)
synthesize  site.yaml, models/ weights + sidecars           synth/latest.json, synth/<run>/candidates.npz, synth.json
audit       site.yaml, data/, models/phi_*, D,              synth/<run>/audit.json, accepted.npz
            synth/<run>/candidates.npz                      (+ reports/audit-<run>.html)
local_only  site.yaml, data/                                reports/local_only.json

With synth.route "cvae" the same stages run the CVAE route (node.cvae.stages): train writes
models/cvae, phi_id, phi_attack (heads on embeddings) and caches data/embeddings-*.safetensors;
candidates.npz holds embeddings instead of images.

site.yaml is an input of every stage, so any edit reruns the chain through the ledger; train
and synthesize then compare digests of their own config section and data themselves and
return at once when nothing they depend on changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from common.config import PolicyConfig
from node.audit.run import audit
from node.cvae import stages as cvae_stages
from node.federation.baseline import local_only
from node.routes import site_route
from node.site.ingest import ingest
from node.site.workspace import Workspace, run_stage

STAGES = ("ingest", "train", "synthesize", "audit", "local_only")


def _model_files(ws: Workspace, names) -> list[Path]:
    return [ws.models / f"{n}{ext}" for n in names for ext in (".safetensors", ".json")]


def stage_io(ws: Workspace, stage: str) -> tuple[list[Path], list[Path]]:
    """(inputs, outputs) of a stage, for the ledger."""
    data = [ws.data / "dataset.npz", ws.data / "splits.json"]
    if stage == "ingest":
        cfg = ws.config().data
        src = [Path(cfg.path)] if cfg.source != "phantom" and cfg.path is not None else []
        return [ws.config_path, *src], data
    r = site_route(ws)
    synth_reads = r.synth_reads
    if stage == "train":
        return [ws.config_path, *data], _model_files(ws, r.model_names)
    if stage == "synthesize":
        federated = ws.config().synth.route == "cvae" and ws.config().synth.cvae.federated
        if federated:
            synth_reads = (*synth_reads, cvae_stages.GLOBAL_NAME)  # a new federation decoder re-runs synthesis
        ins = [ws.config_path, *data, *_model_files(ws, synth_reads)]
        known = (ws.models / f"{synth_reads[0]}.json").exists() and (
            not federated or (ws.models / f"{cvae_stages.GLOBAL_NAME}.json").exists()
        )
        run = ws.synth / r.run_id_for(ws) if known else ws.synth / "unknown"
        return ins, [ws.synth / "latest.json", run / "candidates.npz", run / "synth.json"]
    if stage == "audit":
        run = ws.synth / ws.latest_run()
        return (
            [ws.config_path, *data, *_model_files(ws, r.audit_reads), ws.synth / "latest.json", run / "candidates.npz"],
            [run / "audit.json", run / "accepted.npz"],
        )
    if stage == "local_only":
        return [ws.config_path, *data], [ws.reports / "local_only.json"]
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def run_one(
    ws: Workspace, stage: str, *, force: bool = False, policy: PolicyConfig | None = None, note: str | None = None
) -> bool:
    """Run one stage through the ledger; True if it ran, False if it was up to date.

    A `policy` other than the site's (e.g. tightened by a federation floor) always reruns audit;
    `note` goes into the audit attempt (node.site.attempts)."""
    r = site_route(ws)
    fns: dict[str, Callable[[], object]] = {
        "ingest": lambda: ingest(ws),
        "train": lambda: r.train(ws),
        "synthesize": lambda: r.synthesize(ws),
        "audit": lambda: audit(ws, policy=policy, note=note),
        "local_only": lambda: local_only(ws),
    }
    if stage not in fns:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    inputs, outputs = stage_io(ws, stage)
    ran = run_stage(
        ws, stage, fns[stage], inputs=inputs, outputs=outputs, force=force or (stage == "audit" and policy is not None)
    )
    return ran


def run_pipeline(
    ws: Workspace, *, upto: str | None = None, force: bool = False, note: str | None = None
) -> dict[str, bool]:
    """Run ingest -> train -> synthesize -> audit -> local_only (up to and including `upto`);
    `note` for the audit attempt. Returns {stage: ran?}."""
    if upto is not None and upto not in STAGES:
        raise ValueError(f"unknown stage {upto!r}; expected one of {STAGES}")
    ran = {}
    for stage in STAGES:
        ran[stage] = run_one(ws, stage, force=force, note=note)
        if stage == upto:
            break
    return ran
