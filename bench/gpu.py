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
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from bench._site import ROOT, command, machine
from bench.gpu_parts import Clock, free, part_audit, part_gan, part_invert, part_walk
from bench.gpu_site import part_site
from common.config import PROFILES, profile_site_config
from common.fileio import atomic_write_json

PARTS = ("gan", "invert", "walk", "audit", "site")
# shares of the budget, renormalised over the parts asked for; what a part leaves unspent goes to the later ones
SHARES = {"gan": 0.13, "invert": 0.10, "walk": 0.20, "audit": 0.27, "site": 0.30}
# below this many seconds a part is skipped rather than run cut to nothing (the site run is not adaptive)
MIN_SECONDS = {"gan": 10.0, "invert": 8.0, "walk": 15.0, "audit": 15.0, "site": 45.0}


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
        free(device)
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
