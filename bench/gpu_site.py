"""bench.gpu's end-to-end part: a phantom site made as `plan-node init --profile gpu` makes one,
through every stage and publish, with the profile's step counts cut to fit its share (see
bench/gpu.py's docstring).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench.gpu_parts import Clock
from common.config import commented_yaml, deep_merge, profile_site_config
from common.fileio import atomic_write_text

# the site run's set-level limits: relaxed so that the gate passes and publish runs (the gate decides
# nothing here); copy_fpr and min_pixel_distance, which decide the audit's work, stay the profile's
RELAXED_POLICY = {
    "max_mia_auc": 1.0,
    "max_tpr_at_low_fpr": 1.0,
    "max_reid_rate": 1.0,
    "max_closer_to_train": 1.0,
    "min_accepted": 1,
}


class _NoUpload:
    """Stands in for the exchange in the site run: publish builds, signs and packs the bundle; the
    upload is taken and dropped (a network transfer is not what this benchmark measures)."""

    def upload(self, tar, *, site: str) -> None:
        self.tar = Path(tar)

    def list(self, site: str) -> list:
        return []

    def close(self) -> None:
        pass


def _site_config(args, device: torch.device, budget: float, ctx: dict):
    """(SiteConfig, cuts, relaxed) for the site run: the profile's config with its step counts cut and its
    set-level policy relaxed; cuts and relaxed are {dotted key: [profile value, value used]}."""
    prof = args.profile
    base = profile_site_config(prof, name="gpu-bench", device=device.type)
    if args.quick:
        n_patients = 60
        cut = {
            "models": {"gan": {"steps": 10}, "classifier": {"epochs": 2, "id_epochs": 2}},
            # 60 patients leave ~15 train patients a class: under two anchors a class at the default k
            "synth": {"k": 3, "invert_steps": 5, "target_size": 48, "walk": {"iters": 5}},
        }
    else:
        n_patients = 300
        gan_steps = 500
        rate = ctx.get("gan_steps_per_s", {}).get(args.size)
        if rate:  # at most a quarter of the part's time for the GAN, by the throughput the gan part measured
            gan_steps = int(max(50, min(gan_steps, 0.25 * budget * rate)))
        cut = {
            "models": {"gan": {"steps": gan_steps}, "classifier": {"epochs": 10, "id_epochs": 30}},
            "synth": {"invert_steps": 100, "walk": {"iters": 100}},
        }
    fields = {
        "name": "gpu-bench",
        "device": device.type,
        "data": {"image_size": args.size, "phantom": {"n_patients": n_patients, "seed": 7}},
        "policy": RELAXED_POLICY,
    }
    cfg = profile_site_config(prof, **deep_merge(fields, cut))

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    def get(c, dotted: str):
        for part in dotted.split("."):
            c = getattr(c, part)
        return c

    changed = flat(cut) | {"data.image_size": args.size, "data.phantom.n_patients": n_patients}
    cuts = {k: [get(base, k), get(cfg, k)] for k in changed if get(base, k) != get(cfg, k)}
    relaxed = {f"policy.{k}": [get(base, f"policy.{k}"), v] for k, v in RELAXED_POLICY.items()}
    return cfg, cuts, relaxed


def part_site(args, cfg_unused, device, clock: Clock, budget: float, ctx: dict) -> dict:
    import json

    from common.signing import generate_signing_key
    from node.release.publish import publish
    from node.site.workspace import Workspace
    from node.stages import run_one

    cfg, cuts, relaxed = _site_config(args, device, budget, ctx)
    tmp = None
    if args.site_dir:
        root = Path(args.site_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="plan-gpu-bench-")
        root = Path(tmp.name) / "site"
    try:
        ws = Workspace(root)
        ws.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ws.config_path, commented_yaml(cfg, title=f"bench.gpu site (profile {args.profile}, cut)"))
        if not ws.signing_key.exists():
            ws.keys.mkdir(parents=True, exist_ok=True)
            ws.keys.chmod(0o700)
            generate_signing_key(ws.signing_key, ws.signing_pub)
        clock.reset_peak()
        stages: dict = {}
        t_start = clock()
        for stage in ("ingest", "train", "synthesize", "audit"):
            t0 = clock()
            ran = run_one(ws, stage)
            stages[stage] = {"seconds": round(clock() - t0, 3), "ran": ran}
        audit = json.loads((ws.synth / ws.latest_run() / "audit.json").read_text())
        failed = [c.get("message", "") for c in audit.get("checks", []) if not c.get("passed")]
        t0 = clock()
        bundle = publish(ws, client=_NoUpload())
        stages["publish"] = {
            "seconds": round(clock() - t0, 3),
            "bundle": bundle,
            **({} if bundle else {"skipped": "the audit did not pass: " + "; ".join(failed)}),
        }
        synth = json.loads((ws.synth / ws.latest_run() / "synth.json").read_text())
        total = clock() - t_start
        figure = ", ".join(f"{k} {v['seconds']:.1f}" for k, v in stages.items())
        return {
            "profile": args.profile,
            "workspace": str(root) if args.site_dir else "a temporary folder, removed",
            "cuts": cuts,
            "policy_relaxed": relaxed,
            "stages": stages,
            "synthesize_seconds": synth.get("seconds"),
            "counts": {
                "n_train": synth["counts"]["n_train"],
                "n_paths": synth["counts"]["n_paths"],
                "n_candidates": audit.get("n_candidates"),
                "n_accepted": audit.get("n_accepted"),
                "audit_passed": audit.get("passed"),
            },
            "seconds_stages": round(total, 3),
            **clock.peak(),
            "figure": f"{total:.1f} s: {figure}",
        }
    finally:
        if tmp is not None:
            tmp.cleanup()
