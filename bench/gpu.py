"""The node's heavy steps on one GPU (issue 18, item 4), in under 8 minutes: GAN training
throughput, inversion, the batched walk against the authors' one-path-at-a-time walk, the full
audit at scale and a short end-to-end site run, each with its seconds and, on CUDA, its peak
allocated GPU memory. Writes bench/results/gpu.json (after every part, so a run cut short still
leaves what it measured).

Parts (--parts, default all, in this order):
  gan     node.plan.gan_training.train_gan with the "gpu" profile's G and D (W 256, 256 channels at 4x4,
          batch 32, lazy R1, EMA, DiffAugment) at each of --gan-sizes: a warm-up call, then a
          timed call of --gan-steps steps (a multiple of R1_EVERY, so R1 runs its usual share).
  invert  node.plan.invert.project, the synthesize stage's inversion (phi_class perceptual term, the
          node's chunk of 512 images), on 512 phantom images: seconds per image at the profile's
          500 steps.
  walk    node.plan.walk.plan_paths (all paths as one tensor) against bench.walk_reference.reference_walk
          (the authors' method, one path at a time) on the same device, same anchors, steps and
          weights: the profile's 2000 candidates are 334 paths of 8 points; the reference runs
          on as many of those paths as its share of the time allows and is projected to all of
          them (it is sequential over paths: its time is linear in the paths).
  audit   node.audit.images.audit_images, the full audit (copy detector, every attack, bootstrap
          intervals, the downstream-model attack), on phantom images with randomly initialised
          models (the timing does not depend on the weights): --audit-n candidates x --audit-n
          train images, half as many holdout images. It climbs a ladder of sizes (the target
          halved down to ~600) and runs each next size only while its quadratic projection fits
          the part's time; it reports where the time goes (copy detector, distinct, nearest-record
          figures, ...) and the projection to the target when the target itself does not fit.
  site    a phantom site made as `plan-node init --profile gpu` makes one, through ingest, train,
          synthesize, audit (node.stages.run_one) and publish (bundle built, signed and packed; the
          upload goes to a stand-in that takes nothing), with the profile's step counts cut to fit
          (the JSON lists every cut, profile value -> value used). Its policy's set-level limits are
          relaxed so that the gate passes and publish has something to do; the per-sample filter
          (copy_fpr, min_pixel_distance) and so the audit's work are the profile's.

Images of invert, walk, audit and the site run are --size px (default 64: the gpu profile leaves
data.image_size at 32, the CPU default; a GPU site can afford more).

--quick is a check of the script, not a measurement: the "cpu" profile's models at 32 px, a few steps,
4 paths, a 100 x 100 audit and a tiny site (about a minute on 2 CPU cores).

Every part has a share of --budget (default 420 s); a part whose share is spent is skipped with
the reason recorded, and the adaptive parts (gan, invert, walk, audit) size their timed runs from
a short pilot so that they stay inside their share. Timers synchronise CUDA before they are read.

    python -m bench.gpu                                    # on a CUDA machine
    python -m bench.gpu --device cpu --quick --out /tmp/gpu_quick.json   # a 1-2 minute CPU check of the script
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench._site import ROOT, command, machine
from bench.audit_scale import phantom
from common.config import PROFILES, commented_yaml, deep_merge, profile_site_config
from common.fileio import atomic_write_json, atomic_write_text
from node.plan.train import new_gan

PARTS = ("gan", "invert", "walk", "audit", "site")
# shares of the budget, renormalised over the parts asked for; what a part leaves unspent goes to the later ones
SHARES = {"gan": 0.13, "invert": 0.10, "walk": 0.20, "audit": 0.27, "site": 0.30}
# below this many seconds a part is skipped rather than run cut to nothing (the site run is not adaptive)
MIN_SECONDS = {"gan": 10.0, "invert": 8.0, "walk": 15.0, "audit": 15.0, "site": 45.0}
MIB = 2**20
# the site run's set-level limits: relaxed so that the gate passes and publish runs (the gate decides
# nothing here); copy_fpr and min_pixel_distance, which decide the audit's work, stay the profile's
RELAXED_POLICY = {
    "max_mia_auc": 1.0,
    "max_tpr_at_low_fpr": 1.0,
    "max_reid_rate": 1.0,
    "max_closer_to_train": 1.0,
    "min_accepted": 1,
}


# ---------------------------------------------------------------- timing and memory


class Clock:
    """perf_counter after a CUDA synchronize, so a reading includes the kernels queued before it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> dict:
        """{"max_memory_allocated_mib"} since the last reset_peak (empty on the CPU)."""
        if not self.cuda:
            return {}
        return {"max_memory_allocated_mib": round(torch.cuda.max_memory_allocated(self.device) / MIB, 1)}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- inputs


def _cnn(n_out: int, width: int, size: int, device, seed: int):
    from node.plan.classifiers import SmallCNN

    torch.manual_seed(seed)
    return SmallCNN(n_out, width=width, image_size=size).to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------- parts


def part_gan(args, cfg, device, clock: Clock, budget: float, ctx: dict) -> dict:
    from node.plan.gan_training import R1_EVERY, train_gan
    from node.site.pixels import to_tensor

    gcfg = cfg.models.gan
    kw = dict(
        batch_size=gcfg.batch_size,
        lr=gcfg.lr,
        r1_gamma=gcfg.r1_gamma,
        ema_beta=gcfg.ema_beta,
        checkpoint_every=10**9,  # the forced last checkpoint is a no-op without a state path
        state_path=None,
        state_key="bench",
        seed=0,
        device=device,
    )
    out: dict = {
        "function": "node.plan.gan_training.train_gan",
        "settings": {k: getattr(gcfg, k) for k in ("z_dim", "w_dim", "mapping_layers", "channels", "batch_size")},
        "r1_every": R1_EVERY,
        "sizes": {},
    }
    t_part = clock()
    for k, size in enumerate(args.gan_sizes):
        left = budget - (clock() - t_part)
        size_budget = left / (len(args.gan_sizes) - k)
        real = to_tensor(phantom(256, size, seed=1, tag="g")[0])
        G, D = new_gan(gcfg, image_size=size, seed=0)
        clock.reset_peak()
        t0 = clock()
        res = train_gan(real, G=G, D=D, steps=args.gan_warmup, **kw)  # cudnn autotuning, allocator warm-up
        t_warm = clock() - t0
        per_step = t_warm / args.gan_warmup  # an over-estimate: the first steps carry the warm-up
        fit = int(0.8 * (size_budget - t_warm) / per_step) // R1_EVERY * R1_EVERY
        steps = max(min(args.gan_steps, fit), min(args.gan_steps, R1_EVERY))
        t0 = clock()
        res = train_gan(real, G=res.G, D=res.D, steps=steps, **kw)
        t = clock() - t0
        out["sizes"][str(size)] = {
            "steps_timed": steps,
            "steps_asked": args.gan_steps,
            "warmup_steps": args.gan_warmup,
            "seconds_warmup": round(t_warm, 3),
            "seconds": round(t, 3),
            "steps_per_s": round(steps / t, 2),
            "images_per_s": round(steps * gcfg.batch_size / t, 1),
            "seconds_for_profile_steps": round(cfg.models.gan.steps * t / steps, 1),
            "loss_G": res.loss_G,
            "loss_D": res.loss_D,
            "parameters_G": sum(p.numel() for p in res.G.parameters()),
            "parameters_D": sum(p.numel() for p in res.D.parameters()),
            **clock.peak(),
        }
        ctx.setdefault("gan_steps_per_s", {})[size] = steps / t
        del real, G, D, res
        _free(device)
    out["figure"] = "; ".join(
        f"{s}px {v['steps_per_s']:.1f} steps/s, {v['images_per_s']:.0f} img/s" for s, v in out["sizes"].items()
    )
    return out


def part_invert(args, cfg, device, clock: Clock, budget: float, ctx: dict) -> dict:
    from node.plan.invert import project
    from node.site.pixels import to_tensor

    sc, size = cfg.synth, args.size
    G, _ = new_gan(cfg.models.gan, image_size=size, seed=0)
    phi_class = _cnn(2, cfg.models.classifier.width, size, device, seed=3)
    target = to_tensor(phantom(args.invert_images, size, seed=2, tag="i")[0])
    kw = dict(lr=sc.invert_lr, device=device, features=phi_class.features, perceptual_weight=sc.invert_perceptual)
    clock.reset_peak()
    t_start = clock()
    project(G, target, num_steps=2, **kw)  # warm-up
    t0 = clock()
    project(G, target, num_steps=args.invert_pilot, **kw)
    per_step = (clock() - t0) / args.invert_pilot
    left = budget - (clock() - t_start)
    steps = int(max(args.invert_pilot, min(args.invert_steps or sc.invert_steps, 0.85 * left / per_step)))
    t0 = clock()
    w = project(G, target, num_steps=steps, **kw)
    t = clock() - t0
    n = len(target)
    per_image = t / n
    at_profile = per_image * sc.invert_steps / steps
    return {
        "function": "node.plan.invert.project",
        "images": n,
        "image_size": size,
        "chunk": 512,
        "steps_timed": steps,
        "profile_steps": sc.invert_steps,
        "perceptual_weight": sc.invert_perceptual,
        "seconds_timed": round(t, 3),
        "seconds_per_image": round(per_image, 5),
        "seconds_per_image_at_profile_steps": round(at_profile, 5),
        "codes_shape": list(w.shape),
        **clock.peak(),
        "figure": f"{at_profile * 1000:.1f} ms/image at {sc.invert_steps} steps ({n} images, {size}px)",
    }


def part_walk(args, cfg, device, clock: Clock, budget: float, ctx: dict) -> dict:
    from bench.walk_reference import reference_objective, reference_walk
    from node.plan.walk import path_loss, plan_paths

    sc, wc, size = cfg.synth, cfg.synth.walk, args.size
    P = args.walk_paths or math.ceil(sc.target_size / (wc.points - 2))
    G, _ = new_gan(cfg.models.gan, image_size=size, seed=0)
    G = G.eval().requires_grad_(False)
    phi_id = _cnn(args.walk_identities, cfg.models.classifier.width, size, device, seed=2)
    phi_class = _cnn(2, cfg.models.classifier.width, size, device, seed=3)
    models = (G, phi_id, phi_class)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # anchors where G's codes live: mapped random latents
        codes = G.mapping(torch.randn(2 * P, G.z_dim, generator=g))
    start, end = codes[:P].clone(), codes[P:].clone()
    labels = torch.randint(0, 2, (P,), generator=g)
    weights = dict(weight_identity=wc.weight_identity, weight_smooth=wc.weight_smooth, weight_class=wc.weight_class)
    kw = dict(points=wc.points, lr=wc.lr, device=device, **weights)

    def layout(fmt) -> None:
        for m in models:
            m.to(device, memory_format=fmt)

    def batched(n: int, iters: int):
        t0 = clock()
        res = plan_paths(*models, start[:n], end[:n], labels[:n], iters=iters, patience=None, keep_best=False, **kw)
        return clock() - t0, res

    def reference(n: int, iters: int):
        layout(torch.contiguous_format)  # the authors' code runs in PyTorch's default layout; plan_paths switches
        t0 = clock()
        paths, loss = reference_walk(*models, start[:n], end[:n], labels[:n], iters=iters, **kw)
        return clock() - t0, paths, loss

    clock.reset_peak()
    t_start = clock()
    # pilots: warm up each method (autotuning per shape), then time a few steps to size the real runs
    pilot = args.walk_pilot
    batched(P, 2)
    per_iter_batched = batched(P, pilot)[0] / pilot
    reference(1, 2)
    per_path_iter_ref = reference(1, pilot)[0] / pilot
    left = budget - (clock() - t_start)
    iters = int(max(pilot, min(args.walk_iters or wc.iters, 0.4 * left / per_iter_batched)))
    n_ref = int(max(1, min(P, args.walk_reference_paths, 0.45 * left / (iters * per_path_iter_ref))))

    clock.reset_peak()
    t_ref, ref_paths, ref_loss = reference(n_ref, iters)
    peak_ref = clock.peak()
    clock.reset_peak()
    t_sub, res_sub = batched(n_ref, iters)
    t_all, res_all = batched(P, iters)
    peak_all = clock.peak()

    # the objectives of both results on the common paths: the authors' (chunks of 4) and the node's
    with torch.no_grad():
        authors = {
            name: float(
                torch.stack(
                    [reference_objective(*models, p.to(device), int(labels[i]), **weights) for i, p in enumerate(paths)]
                ).mean()
            )
            for name, paths in (("reference", ref_paths), ("batched", res_sub.paths))
        }
        node = {
            name: float(path_loss(*models, paths.to(device), labels[:n_ref].to(device), **weights)[0].mean())
            for name, paths in (("reference", ref_paths), ("batched", res_sub.paths))
        }
    ref_all = t_ref / n_ref * P  # sequential over paths: linear in their number
    at_profile = wc.iters / iters
    return {
        "batched": "node.plan.walk.plan_paths",
        "reference": "bench.walk_reference.reference_walk",
        "stopping_rule": "none: patience None and the last iterate, for both",
        "paths": P,
        "points": wc.points,
        "images_per_step_batched": P * (wc.points - 2),
        "iters_timed": iters,
        "profile_iters": wc.iters,
        "identities": args.walk_identities,
        "image_size": size,
        "reference_paths_timed": n_ref,
        "seconds_reference": round(t_ref, 3),
        "seconds_batched_same_paths": round(t_sub, 3),
        "seconds_batched_all_paths": round(t_all, 3),
        "seconds_reference_all_paths_projected": round(ref_all, 1),
        "speedup_same_paths": round(t_ref / t_sub, 2),
        "speedup_all_paths_projected": round(ref_all / t_all, 1),
        "seconds_batched_all_paths_at_profile_iters": round(t_all * at_profile, 1),
        "seconds_reference_all_paths_at_profile_iters_projected": round(ref_all * at_profile, 1),
        "mean_loss_same_paths": {"authors_objective": authors, "node_objective": node},
        "mean_final_loss_reference_returned": float(ref_loss.mean()),
        "mean_initial_loss_batched_all": float(res_all.initial_loss.mean()),
        "mean_final_loss_batched_all": float(res_all.loss.mean()),
        "peak_reference": peak_ref,
        "peak_batched": peak_all,
        **(
            {"max_memory_allocated_mib": max(d["max_memory_allocated_mib"] for d in (peak_ref, peak_all))}
            if clock.cuda
            else {}
        ),
        "figure": (
            f"{P} paths x {iters} iters: batched {t_all:.1f} s, reference {ref_all:.0f} s projected "
            f"({n_ref} timed), {ref_all / t_all:.1f}x"
        ),
    }


def _audit_once(n: int, size: int, args, device: torch.device) -> dict:
    """bench.audit_scale's run (the node's full audit, LPIPS included, n x n with n // 2 holdout) on `device`."""
    from bench.audit_scale import one_run

    defaults = {"n_boot": None, "downstream_epochs": None}  # None: audit_images' own
    return one_run(n, size, argparse.Namespace(device=str(device), profile=args.profile, no_lpips=False, **defaults))


def part_audit(args, cfg, device, clock: Clock, budget: float, ctx: dict) -> dict:
    size, target = args.size, args.audit_n
    h_target = target // 2
    rungs = [target]
    while rungs[0] // 2 >= args.audit_min_rung:
        rungs.insert(0, rungs[0] // 2)
    t_start = clock()
    measured: list[dict] = []
    stopped = None
    for n in rungs:
        left = budget - (clock() - t_start)
        if measured:
            last = measured[-1]
            predicted = (last["seconds"] + last["seconds_setup"]) * (n / last["n_candidates"]) ** 2
            if predicted > left:
                stopped = (
                    f"{n} x {n} not run: its quadratic projection from {last['n_candidates']} is {predicted:.0f} s, "
                    f"{left:.0f} s of the part's budget left"
                )
                break
        measured.append(_audit_once(n, size, args, device))
        _free(device)
    last = measured[-1]
    exponent = None
    if len(measured) >= 2:
        a, b = measured[-2], measured[-1]
        exponent = round(math.log(b["seconds"] / a["seconds"]) / math.log(b["n_candidates"] / a["n_candidates"]), 2)
    reached = last["n_candidates"] == target
    ratio = target / last["n_candidates"]
    # every pairwise step (copy detector, nearest records, DOMIAS, ROC) is at most quadratic in the size, the
    # per-image ones (warps, embeddings, the downstream model) linear: the two bound the time at the target
    projected = {
        "linear": round(last["seconds"] * ratio, 0),
        "quadratic": round(last["seconds"] * ratio**2, 0),
        **({"measured_exponent": round(last["seconds"] * ratio**exponent, 0)} if exponent else {}),
    }
    out = {
        "function": "node.audit.images.audit_images",
        "target": {"n_candidates": target, "n_train": target, "n_holdout": h_target},
        "image_size": size,
        "models": "phi_id, attacker, attacker_wide (SmallCNN), D: randomly initialised, profile widths",
        "lpips": "AlexNet, random backbone (the cost of the weights a site has)",
        "policy": "PolicyConfig() defaults (copy_fpr 0.02: the copy detector runs)",
        "rungs": measured,
        "target_reached": reached,
        "stopped": stopped,
        "time_exponent_last_two_rungs": exponent,
        "seconds_audits": round(sum(r["seconds"] for r in measured), 3),
    }
    if clock.cuda:
        out["max_memory_allocated_mib"] = max(r["cuda_peak_allocated_mb"] for r in measured)
    if reached:
        out["seconds_at_target"] = last["seconds"]
        out["figure"] = f"{target} x {target}: {last['seconds']:.1f} s"
    else:
        out["seconds_at_target_projected"] = projected
        out["figure"] = (
            f"{last['n_candidates']} x {last['n_candidates']}: {last['seconds']:.1f} s; {target} x {target} projected "
            f"{projected['linear']:.0f}-{projected['quadratic']:.0f} s (linear-quadratic)"
            + (f", {projected['measured_exponent']:.0f} s at n^{exponent}" if exponent else "")
        )
    return out


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
            "synth": {"invert_steps": 5, "target_size": 48, "walk": {"iters": 5}},
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


RUNNERS = {"gan": part_gan, "invert": part_invert, "walk": part_walk, "audit": part_audit, "site": part_site}


# ---------------------------------------------------------------- main


def _device(name: str | None) -> torch.device:
    if name is None:
        if not torch.cuda.is_available():
            raise SystemExit(
                "bench.gpu: no CUDA device on this machine (torch.cuda.is_available() is False); "
                "pass --device cpu to run it on the CPU anyway (with --quick, a check of the script)"
            )
        return torch.device("cuda")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench.gpu: --device {name} asked for, but CUDA is not available on this machine")
    return dev


def _environment(device: torch.device) -> dict:
    env = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        env.update(
            gpu=torch.cuda.get_device_name(idx),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    return env


def _print(out: dict) -> None:
    print(f"{'part':<8}{'status':<9}{'seconds':>9}{'GPU MiB':>10}  result")
    for name, r in out["parts"].items():
        mib = r.get("max_memory_allocated_mib")
        mib_s = f"{mib:>10.0f}" if isinstance(mib, (int, float)) else f"{'-':>10}"
        what = r.get("figure") or r.get("reason") or r.get("error", "")
        print(f"{name:<8}{r['status']:<9}{r.get('seconds', 0):>9.1f}{mib_s}  {what}")
    env = out["environment"]
    where = env.get("gpu") or f"CPU ({env['cpu_count']} cores, {env['torch_threads']} threads)"
    print(
        f"{where}, torch {env['torch']}, CUDA {env['cuda']}; profile {out['profile']}; "
        f"{out['seconds_total']:.1f} s in all (budget {out['budget_s']:.0f} s)"
    )
    site = out["parts"].get("site", {})
    if site.get("cuts"):
        print("site run cuts: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in site["cuts"].items()))


def main(argv: list[str] | None = None) -> dict:
    t_main = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda; an error without it)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the cpu profile: a 1-2 minute check on 2 cores")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all parts together (default 420)")
    ap.add_argument("--size", type=int, default=64, help="image side for invert, walk, audit and the site run")
    ap.add_argument("--gan-sizes", default="64,128", help="image sides of the GAN throughput part")
    ap.add_argument("--gan-steps", type=int, default=160, help="timed GAN steps per size (at most)")
    ap.add_argument("--gan-warmup", type=int, default=16, help="GAN steps of the warm-up call per size")
    ap.add_argument("--invert-images", type=int, default=512, help="images inverted (one chunk of the node's 512)")
    ap.add_argument(
        "--invert-steps", type=int, default=None, help="most inversion steps timed (default: the profile's)"
    )
    ap.add_argument("--invert-pilot", type=int, default=10, help="steps of the inversion pilot")
    ap.add_argument("--walk-paths", type=int, default=None, help="default: the profile's target_size / (points - 2)")
    ap.add_argument("--walk-iters", type=int, default=None, help="most walk iterations timed (default: the profile's)")
    ap.add_argument("--walk-identities", type=int, default=500, help="phi_id's classes (train patients)")
    ap.add_argument("--walk-reference-paths", type=int, default=16, help="most paths the reference is timed on")
    ap.add_argument("--walk-pilot", type=int, default=5, help="iterations of each walk pilot")
    ap.add_argument("--audit-n", type=int, default=20000, help="candidates and train images of the full audit")
    ap.add_argument("--audit-min-rung", type=int, default=600, help="smallest audit size of the ladder")
    ap.add_argument("--site-dir", default=None, help="keep the site run's workspace here (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    args = ap.parse_args(argv)
    device = _device(args.device)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {unknown}; expected a subset of {list(PARTS)}")
    parts = [p for p in PARTS if p in parts]
    args.profile = "cpu" if args.quick else "gpu"
    args.gan_sizes = [int(s) for s in args.gan_sizes.split(",") if s.strip()]
    if args.quick:
        args.size, args.gan_sizes, args.gan_steps, args.gan_warmup = 32, [32], 4, 2
        args.invert_images, args.invert_pilot, args.invert_steps = 16, 2, 5
        args.walk_paths, args.walk_identities, args.walk_reference_paths, args.walk_pilot = 4, 20, 2, 2
        args.walk_iters = 5
        args.audit_n = 100
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = profile_site_config(args.profile, device=device.type)
    clock = Clock(device)
    out = {
        "profile": args.profile,
        "profile_values": PROFILES[args.profile],
        "quick": args.quick,
        "budget_s": args.budget,
        "environment": _environment(device),
        "parts": {},
    }
    ctx: dict = {}
    t_parts = time.perf_counter()
    for i, name in enumerate(parts):
        later = parts[i + 1 :]
        remaining = args.budget - (time.perf_counter() - t_parts)
        avail = remaining - sum(MIN_SECONDS[p] for p in later)
        share = SHARES[name] / sum(SHARES[p] for p in parts[i:])
        part_budget = avail * share if later else avail
        if part_budget < MIN_SECONDS[name] and not args.quick:
            out["parts"][name] = {
                "status": "skipped",
                "seconds": 0.0,
                "reason": f"budget spent: {part_budget:.0f} s left for it, it needs at least {MIN_SECONDS[name]:.0f}",
            }
            continue
        print(f"[bench.gpu] {name}: up to {part_budget:.0f} s", file=sys.stderr, flush=True)
        _free(device)
        t0 = clock()
        try:
            res = RUNNERS[name](args, cfg, device, clock, max(part_budget, 1.0), ctx)
            out["parts"][name] = {"status": "ok", "seconds": round(clock() - t0, 3), "budget_s": round(part_budget, 1)}
            out["parts"][name].update(res)
        except Exception as e:  # one part's failure must not lose the others' measurements
            out["parts"][name] = {
                "status": "error",
                "seconds": round(time.perf_counter() - t0, 3),
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            }
            print(out["parts"][name]["traceback"], file=sys.stderr, flush=True)
        out["seconds_total"] = round(time.perf_counter() - t_main, 1)
        atomic_write_json(Path(args.out), out)  # after every part: a run cut short keeps what it measured
    out["seconds_total"] = round(time.perf_counter() - t_main, 1)
    out.update(command=command("bench.gpu", argv), machine=machine(), load_average_at_end=list(os.getloadavg()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), out)
    _print(out)
    return out


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any(r["status"] == "error" for r in result["parts"].values()) else 0)
