"""How the node's full image audit scales (issue 18 item 3): wall-clock time and peak memory of
node.audit.images.audit_images on N candidates against N train images and a holdout of N/2 (the node's
50/25/25 split), at each N of --sizes and each side of --image-sizes.

Everything the node's audit stage passes is there: phi_id, the attacker, the wide attacker and
the GAN's discriminator (the node's classes and widths, built as node/plan/train.py builds them,
randomly initialised: the cost does not depend on the weights), LPIPS with a random AlexNet
(node.audit.lpips_matrix.build_lpips, as a site with the backbone weights runs it; --no-lpips leaves it
out), the default policy, the node's bootstrap resamples and downstream epochs. Phantom images
(node.site.phantom), disjoint patients in train, holdout and candidates.

Each (N, side) runs in its own process, so its peak memory is its own, under a wall-clock limit
(--max-seconds): a run that hits it is recorded as timed out, and a larger N at the same side is
skipped when the growth measured so far projects it past the limit. The time is split into the
copy detector (node.audit.copies.copy_distances, calibration half and candidates) and the other parts
of the audit, each timed by wrapping the function where the audit looks it up. Writes
bench/results/audit_scale.json (--quick: audit_scale_quick.json); a run at an (N, side) already in
the file replaces it, the others stay, each with the command that produced it.

    .venv/bin/python -m bench.audit_scale                 # N 1000 5000 20000 at 32 and 64 px
    .venv/bin/python -m bench.audit_scale --quick         # N 60 and 120 at 32 px, 20 resamples
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import node.audit.images
import node.audit.judge
from bench._site import ROOT, command, machine
from common.config import PhantomConfig, PolicyConfig, profile_site_config
from common.fileio import atomic_write_json
from node.plan.classifiers import SmallCNN
from node.plan.train import _seeded, new_gan
from node.site.phantom import make_phantom

# The parts timed apart: (module that calls it, name there) -> label. Disjoint calls (none runs
# inside another), so their sum is at most the audit's time; what is left ("other") is bootstrap
# intervals, ROC points and the pixel closeness. Wrapped, not replaced: the real function does the work.
PARTS = {
    (node.audit.images, "copy_distances"): "copy_detector",
    (node.audit.images, "distinct"): "distinct",
    (node.audit.images, "embed"): "embeddings",
    (node.audit.images, "top_prob"): "reid_scores",
    # LPIPS features of S, T and H computed once; past 8192 images in all, none here: every
    # nearest-neighbour query then recomputes them inside set_figures
    (node.audit.images, "lpips_space"): "lpips_features",
    (node.audit.judge, "set_figures"): "nearest_record_and_membership",
    (node.audit.judge, "density_ratio_scores"): "density_ratio",
    (node.audit.judge, "downstream_scores"): "downstream_attack",
    (node.audit.judge, "discriminator_scores"): "discriminator",
    (node.audit.judge, "reid_block"): "reid_intervals",
}
# make_phantom holds a few float64 [images,4,H,W] arrays: made this many patients at a time
PHANTOM_CHUNK = 500


def phantom(n_images: int, size: int, *, seed: int, tag: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n_images phantom images uint8 [n,size,size] with labels and patient ids (tagged, so that
    ids stay distinct across chunks and sets), the phantom's defaults of images per patient and classes."""
    pc = PhantomConfig()
    n_pat = -(-n_images // pc.images_per_patient)
    parts = [
        make_phantom(
            n_patients=min(PHANTOM_CHUNK, n_pat - start),
            images_per_patient=pc.images_per_patient,
            n_classes=pc.n_classes,
            size=size,
            seed=1000 * seed + k,
        )
        for k, start in enumerate(range(0, n_pat, PHANTOM_CHUNK))
    ]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    ids = np.concatenate([np.char.add(f"{tag}{k}-", p[2]) for k, p in enumerate(parts)])
    return x[:n_images], y[:n_images], ids[:n_images]


def networks(n_ids: int, size: int, *, profile: str, device: str) -> dict:
    """phi_id, the attacker, the wide attacker and D as node/plan/train.py builds them (classes, widths,
    seeds; train identities as outputs), untrained, frozen and in eval mode as load_model gives them."""
    mc = profile_site_config(profile).models
    cc = mc.classifier
    made = {
        "phi_id": _seeded(mc.seed + 2, lambda: SmallCNN(n_ids, width=cc.width, image_size=size)),
        "attacker": _seeded(mc.seed + 4, lambda: SmallCNN(n_ids, width=cc.attacker_width, image_size=size)),
        "attacker_wide": _seeded(mc.seed + 5, lambda: SmallCNN(n_ids, width=cc.attacker_width, image_size=size)),
        "discriminator": new_gan(mc.gan, image_size=size, seed=mc.seed)[1],
    }
    return {k: m.to(device).eval().requires_grad_(False) for k, m in made.items()}


@contextmanager
def instrument():
    """Wrap each of PARTS where the audit looks it up with a timer for the duration; yields the
    seconds spent in each, filled as they run. The originals are put back on exit."""
    spent = dict.fromkeys(PARTS.values(), 0.0)
    originals = {(module, name): getattr(module, name) for module, name in PARTS}

    def timer(real, label: str):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return real(*a, **kw)
            finally:
                spent[label] += time.perf_counter() - t0

        return timed

    for (module, name), label in PARTS.items():
        setattr(module, name, timer(originals[module, name], label))
    try:
        yield spent
    finally:
        for (module, name), real in originals.items():
            setattr(module, name, real)


def _status_mb(field: str) -> float | None:
    """VmRSS / VmHWM of this process in MB, None without /proc."""
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return round(int(m.group(1)) / 1024, 1) if m else None


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def node_settings(args: argparse.Namespace) -> dict:
    """The audit settings given on the command line; audit_images' own defaults for the rest."""
    given = {"n_boot": args.n_boot, "downstream_epochs": args.downstream_epochs}
    return {k: v for k, v in given.items() if v is not None}


def one_run(n: int, size: int, args: argparse.Namespace) -> dict:
    """The audit of n candidates against n train and n // 2 holdout images of side `size`, in this process."""
    t0 = time.perf_counter()
    xt, yt, pt = phantom(n, size, seed=0, tag="t")
    xh, yh, ph = phantom(n // 2, size, seed=1, tag="h")
    xc, yc, _ = phantom(n, size, seed=2, tag="c")
    nets = networks(len(np.unique(pt)), size, profile=args.profile, device=args.device)
    lpips_model = None
    if not args.no_lpips:
        from node.audit.lpips_matrix import build_lpips

        torch.manual_seed(0)
        lpips_model = build_lpips("alex", random_backbone=True).to(args.device)  # as node.audit.run.audit places it
    seconds_setup = time.perf_counter() - t0

    rss_before = _status_mb("VmRSS")
    # The peak over the audit alone, not over the set-up (the phantom's float64 intermediates).
    # ru_maxrss cannot be reset, and on Linux it also carries the parent's peak across exec.
    reset = _reset_peak()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with instrument() as spent:
        report, accepted = node.audit.images.audit_images(
            xc,
            xt,
            xh,
            **nets,
            policy=PolicyConfig(),
            device=args.device,
            train_ids=pt,
            holdout_ids=ph,
            candidate_labels=yc,
            train_labels=yt,
            holdout_labels=yh,
            lpips_model=lpips_model,
            lpips_reason="--no-lpips",
            **node_settings(args),
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM") if reset else None
    ru_maxrss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out = {
        "n": n,
        "image_size": size,
        "n_train": len(xt),
        "n_holdout": len(xh),
        "n_candidates": len(xc),
        "seconds": round(seconds, 2),
        "seconds_copy_detector": round(spent["copy_detector"], 2),
        "seconds_rest": round(seconds - spent["copy_detector"], 2),
        "seconds_parts": {k: round(v, 2) for k, v in {**spent, "other": seconds - sum(spent.values())}.items()},
        "seconds_setup": round(seconds_setup, 2),
        "peak_rss_mb": peak if peak is not None else ru_maxrss,
        "peak_rss_measured": "VmHWM over the audit call" if peak is not None else "ru_maxrss of the process",
        "rss_before_audit_mb": rss_before,
        "ru_maxrss_mb": ru_maxrss,
        "torch_threads": torch.get_num_threads(),
        "accepted_mask_length": int(len(accepted)),
        "n_accepted": report["n_accepted"],
        "passed": report["passed"],
        # every top-level figure of the report: two runs of the same audit compare on these
        "figures": {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "lpips": lpips_model is not None,
    }
    if args.device.startswith("cuda"):
        out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def projected(done: list[tuple[int, float]], n: int) -> float | None:
    """The process time projected at n from this side's finished runs [(n, seconds)]: the growth
    between the last two, or n^2 from one."""
    if not done:
        return None
    (n2, t2), b = done[-1], 2.0
    if len(done) >= 2:
        n1, t1 = done[-2]
        b = math.log(t2 / t1) / math.log(n2 / n1)
    return t2 * (n / n2) ** b


def child(n: int, size: int, args: argparse.Namespace) -> dict:
    """one_run in a fresh process under the wall-clock limit (the set-up counts towards it)."""
    opts = ["--device", args.device]
    opts += [f"--{k.replace('_', '-')}={v}" for k, v in node_settings(args).items()]
    opts += ["--profile", args.profile] + (["--threads", str(args.threads)] if args.threads else [])
    opts += ["--no-lpips"] if args.no_lpips else []
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "run.json"
        cmd = [sys.executable, "-m", "bench.audit_scale", "--one", str(n), str(size), "--result", str(result), *opts]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.max_seconds)
        except subprocess.TimeoutExpired:  # subprocess.run has killed it
            return {"n": n, "image_size": size, "seconds": None, "timed_out_after": args.max_seconds}
        if proc.returncode != 0 or not result.exists():
            tail = proc.stderr.strip().splitlines()[-5:]
            return {"n": n, "image_size": size, "seconds": None, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
        run = json.loads(result.read_text())
    run["seconds_process"] = round(time.perf_counter() - t0, 2)
    return run


def merge_runs(earlier: list[dict], new: list[dict]) -> list[dict]:
    """The runs of the result file after this invocation: the new ones, and the earlier ones at an
    (n, image_size) not run now (a run of one size keeps the others' figures). By side, then n."""
    ran = {(r["n"], r["image_size"]) for r in new}
    kept = [r for r in earlier if (r["n"], r["image_size"]) not in ran]
    return sorted(kept + new, key=lambda r: (r["image_size"], r["n"]))


def growth(runs: list[dict]) -> dict:
    """Per side, the exponent b of seconds ~ n^b between consecutive timed sizes, in all and per part."""
    out = {}
    for size in sorted({r["image_size"] for r in runs}):
        timed = sorted((r for r in runs if r["image_size"] == size and r["seconds"]), key=lambda r: r["n"])
        steps = []
        for a, b in zip(timed, timed[1:]):
            ln = math.log(b["n"] / a["n"])
            parts = {
                k: round(math.log(b["seconds_parts"][k] / v) / ln, 2)
                for k, v in a["seconds_parts"].items()
                if v > 0 and b["seconds_parts"][k] > 0
            }
            exponent = round(math.log(b["seconds"] / a["seconds"]) / ln, 2)
            steps.append({"from": a["n"], "to": b["n"], "exponent": exponent, "parts": parts})
        if steps:
            out[str(size)] = steps
    return out


def print_table(res: dict) -> None:
    print(f"{'px':>4}{'N':>7}{'seconds':>10}{'copy det.':>11}{'rest':>9}{'peak RSS MB':>13}{'accepted':>10}  note")
    for r in res["runs"]:
        note = r.get("skipped") or r.get("error") or ""
        if "timed_out_after" in r:
            note = f"timed out after {r['timed_out_after']} s"
        if r["seconds"] is None:
            print(f"{r['image_size']:>4}{r['n']:>7}{'-':>10}{'-':>11}{'-':>9}{'-':>13}{'-':>10}  {note}")
            continue
        print(
            f"{r['image_size']:>4}{r['n']:>7}{r['seconds']:>10.1f}{r['seconds_copy_detector']:>11.1f}"
            f"{r['seconds_rest']:>9.1f}{r['peak_rss_mb']:>13.0f}{r['n_accepted']:>10}  "
            f"set-up {r['seconds_setup']:.1f} s, process {r['seconds_process']:.1f} s"
        )
    for size, steps in res["growth"].items():
        for s in steps:
            top = sorted(s["parts"].items(), key=lambda kv: -kv[1])[:3]
            print(
                f"{size} px, N {s['from']} -> {s['to']}: seconds ~ N^{s['exponent']}"
                f" (steepest parts: {', '.join(f'{k} N^{b}' for k, b in top)})"
            )


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000], help="N: candidates = train")
    ap.add_argument("--image-sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--max-seconds", type=float, default=900, help="wall-clock limit of one run, set-up included")
    ap.add_argument("--no-lpips", action="store_true", help="audit without the LPIPS space")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", default="cpu", help="the site profile whose network widths are built (cpu, gpu)")
    ap.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples (default: audit_images')")
    ap.add_argument("--downstream-epochs", type=int, default=None, help="downstream-attack epochs")
    ap.add_argument("--quick", action="store_true", help="N 60 and 120 at 32 px, 20 resamples, 2 downstream epochs")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", type=int, nargs=2, metavar=("N", "SIDE"), help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:  # a child: one run, its result to --result
        atomic_write_json(args.result, one_run(*args.one, args))
        return None
    if args.quick:
        args.sizes, args.image_sizes, args.n_boot, args.downstream_epochs = [60, 120], [32], 20, 2
    out_path = args.out or ROOT / "bench" / "results" / ("audit_scale_quick.json" if args.quick else "audit_scale.json")

    runs = []
    for size in args.image_sizes:
        done: list[tuple[int, float]] = []  # this side's finished runs: (n, process seconds)
        blocked = None
        for n in sorted(args.sizes):
            guess = projected(done, n)
            if blocked or (guess is not None and guess > args.max_seconds):
                why = blocked or f"projected {guess:.0f} s > limit {args.max_seconds:.0f} s"
                runs.append({"n": n, "image_size": size, "seconds": None, "skipped": why})
                continue
            print(f"audit of N={n} at {size} px ...", flush=True)
            run = child(n, size, args)
            runs.append(run)
            if run["seconds"] is None:  # timed out or failed: a larger N would too
                blocked = f"N={n} at {size} px did not finish"
            else:
                done.append((n, run["seconds_process"]))

    this_command = command("bench.audit_scale", argv)
    for run in runs:
        run["command"] = this_command
    earlier = json.loads(out_path.read_text())["runs"] if out_path.exists() else []
    runs = merge_runs(earlier, runs)
    res = {
        "runs": runs,
        "growth": growth(runs),
        "settings": {
            "split": "N train, N // 2 holdout, N candidates (phantom, disjoint patients)",
            "networks": f"profile {args.profile}, random init: phi_id, attacker, attacker_wide, discriminator",
            "lpips": None if args.no_lpips else "alex, random backbone",
            "policy": "PolicyConfig() defaults",
            "audit_settings": node_settings(args) or "audit_images' defaults",
            "max_seconds": args.max_seconds,
            "device": args.device,
        },
        "command": this_command,
        "machine": machine(),
        "load_average_at_end": list(os.getloadavg()),
    }
    atomic_write_json(out_path, res)
    print_table(res)
    return res


if __name__ == "__main__":
    main()
