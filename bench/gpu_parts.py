"""bench.gpu's adaptive parts: GAN training, inversion, the walk against the authors' method, and
the audit at scale, each sized from a short pilot to stay inside its share of the budget (the
parts are described in bench/gpu.py's docstring), with the clock and memory readings they share.
"""

from __future__ import annotations

import argparse
import gc
import math
import time

import torch

from bench.audit_scale import phantom
from node.plan.train import new_gan

MIB = 2**20

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


def free(device: torch.device) -> None:
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
        free(device)
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
        free(device)
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
