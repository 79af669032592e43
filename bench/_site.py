"""Shared set-up of the PLAN benchmarks: a site workspace (phantom or a MedMNIST .npz) trained
through the node's own stages, and k-same anchor pairs in W made by the node's own functions.

Workspaces live under bench/work/<name>/ (git-ignored) and are reused: ingest and train go
through the ledger, so a second benchmark on the same data and config retrains nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import GanConfig, SiteConfig, commented_yaml
from common.fileio import atomic_write_text, sha256_bytes
from node.plan.candidates import anchor_pairs as anchor_pairs_of
from node.plan.invert import reconstruction_mse
from node.plan.synthesize import invert
from node.plan.train import load_model
from node.site.checkpoint import config_digest, read_sidecar
from node.site.data import ImageSet
from node.site.ingest import load_split
from node.site.pixels import to_tensor
from node.site.workspace import Workspace
from node.stages import run_one

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
SHARED_DATA = ROOT.parent / "shared" / "data"


def site(name: str, cfg: SiteConfig, *, root: Path = WORK) -> tuple[Workspace, dict]:
    """Workspace <root>/<name> (default bench/work/<name>) with site.yaml from `cfg`, ingested and
    trained. Returns (workspace, {"ingest": seconds or None when up to date, "train": ...})."""
    ws = Workspace(root / name)
    ws.root.mkdir(parents=True, exist_ok=True)
    text = commented_yaml(cfg, title=f"benchmark site {name}")
    if not ws.config_path.exists() or ws.config_path.read_text() != text:
        atomic_write_text(ws.config_path, text)
    times = {}
    for stage in ("ingest", "train"):
        t0 = time.time()
        times[stage] = round(time.time() - t0, 1) if run_one(ws, stage) else None
    return ws, times


@dataclass
class Anchors:
    G: torch.nn.Module
    phi_id: torch.nn.Module
    phi_class: torch.nn.Module
    phi_attack: torch.nn.Module
    train: ImageSet
    start: torch.Tensor  # [P,D] anchor codes
    end: torch.Tensor  # [P,D]
    labels: torch.Tensor  # [P] class of both anchors
    anchor_codes: torch.Tensor  # [M,D] every anchor
    anchor_labels: torch.Tensor  # [M]
    invert_mse: float  # mean reconstruction MSE of the train images, [0,1] pixels
    seconds_invert: float


def anchor_pairs(
    ws: Workspace,
    *,
    n_pairs: int,
    seed: int = 0,
    k: int | None = None,
    phi_class: torch.nn.Module | None = None,
    device: str = "cpu",
) -> Anchors:
    """Invert the train split (synth config's steps and lr), k-same per class over patients
    (`k`, default synth.k), and `n_pairs` within-class anchor pairs split over classes by their size, every
    unordered pair once before any repeats (node.plan.candidates.anchor_pairs). `phi_class`: another
    class network than the site's, for the inversion's class features and in the returned Anchors."""
    cfg = ws.config()
    sc = cfg.synth
    G, phi_id, site_phi_class, phi_attack = (
        load_model(ws, n, device) for n in ("G_ema", "phi_id", "phi_class", "phi_attack")
    )
    other = phi_class is not None
    phi_class = phi_class if other else site_phi_class
    train = load_split(ws, "train")
    target = to_tensor(train.images)
    t0 = time.time()
    # inversion is the slow part of the set-up: cache it per G_ema weights and inversion settings
    weights_sha = read_sidecar(ws.models / "G_ema.safetensors")["weights_sha256"][:16]
    key = f"{weights_sha}-{sc.invert_steps}-{sc.invert_lr}-{sc.invert_perceptual}-{sc.seed}"
    if other:
        key += "-phi" + sha256_bytes(b"".join(v.numpy().tobytes() for v in phi_class.state_dict().values()))[:12]
    cache = ws.root / f"bench_w_{key}.npy"
    if cache.exists():
        w = torch.from_numpy(np.load(cache))
    else:
        w = invert(G, phi_class, target, sc, device=device)
        np.save(cache, w.numpy())
    t_inv = time.time() - t0
    mse = float(reconstruction_mse(G, w, target, device=device).mean())
    k = sc.k if k is None else k
    p = anchor_pairs_of(w, train.labels, train.patient_ids, k=k, n_paths=n_pairs, rng=np.random.default_rng(seed))
    return Anchors(
        G,
        phi_id,
        phi_class,
        phi_attack,
        train,
        p.start,
        p.end,
        p.labels,
        p.anchor_codes,
        p.anchor_labels,
        mse,
        round(t_inv, 1),
    )


def mean_std(xs) -> dict:
    xs = np.asarray(list(xs), dtype=float)
    return {"mean": float(xs.mean()), "std": float(xs.std(ddof=1)) if len(xs) > 1 else 0.0, "n": int(len(xs))}


def command(module: str, argv: list[str] | None) -> str:
    """The command line that ran benchmark `module` (argv None: this process's own arguments)."""
    import sys

    return f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


def run_meta(module: str, argv: list[str] | None) -> dict:
    """A result file's "_meta": the command that ran, the machine, the load average at the end."""
    import os

    return {"command": command(module, argv), "machine": machine(), "load_average_at_end": list(os.getloadavg())}


def machine() -> str:
    import os
    import platform

    return (
        f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"
        + (f", CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU")
    )


def npz_site(dataset: str, *, max_images: int | None, gan_steps: int | None = None) -> tuple[Workspace, dict]:
    """A default-config site on ../shared/data/<dataset>.npz (MedMNIST, 28x28 resized to 32x32,
    every image its own identity), capped to `max_images` images before the patient split; its
    GAN trained `gan_steps` steps instead of the default when given (a workspace of its own)."""
    path = SHARED_DATA / f"{dataset}.npz"
    if not path.exists():
        raise SystemExit(f"{path} not found: the real-data benchmarks need ../shared/data (see its README)")
    models = {} if gan_steps is None else {"gan": {"steps": gan_steps}}
    cfg = SiteConfig(name=dataset, data={"source": "npz", "path": path, "max_images": max_images}, models=models)
    suffix = "" if gan_steps in (None, GanConfig().steps) else f"-g{gan_steps}"
    return site(f"{dataset}-{max_images or 'all'}{suffix}", cfg)


@dataclass
class Walked:
    anchors: Anchors
    plan: np.ndarray  # uint8 [P,T-2,H,W] interior images of the PLAN paths, as a release would render them
    linear: np.ndarray  # uint8 [P,T-2,H,W] the same for the straight lines between the same anchors
    anchor_images: np.ndarray  # uint8 [M,H,W] every k-same anchor rendered
    walk: dict  # iters run, mean initial / final loss, seconds


def walk_pairs(a: Anchors, wc, *, weight_identity: float | None = None, points: int | None = None, device: str = "cpu"):
    """node.plan.walk.plan_paths between `a`'s anchor pairs with walk config `wc` (its stopping rule),
    optionally another identity weight or number of points per path. Returns the WalkResult."""
    from node.plan.walk import plan_paths

    return plan_paths(
        a.G,
        a.phi_id,
        a.phi_class,
        a.start,
        a.end,
        a.labels,
        points=wc.points if points is None else points,
        iters=wc.iters,
        lr=wc.lr,
        weight_identity=wc.weight_identity if weight_identity is None else weight_identity,
        weight_smooth=wc.weight_smooth,
        weight_class=wc.weight_class,
        class_shift=wc.class_shift,
        device=device,
    )


def walk_both(ws: Workspace, *, n_pairs: int, seed: int = 0, device: str = "cpu") -> Walked:
    """PLAN paths (node.plan.walk.plan_paths with the site's walk config and stopping rule) and linear
    paths between the same anchor pairs, rendered (interior points only, like node.plan.synthesize)."""
    from node.plan.walk import linear_paths
    from node.site.pixels import to_uint8

    a = anchor_pairs(ws, n_pairs=n_pairs, seed=seed, device=device)
    wc = ws.config().synth.walk
    g_sha = read_sidecar(ws.models / "G_ema.safetensors")["weights_sha256"][:16]
    cache = ws.root / f"bench_walk_{g_sha}_{config_digest(ws.config().synth)[:12]}_{n_pairs}_{seed}.npz"
    if cache.exists():  # the walk is deterministic given these; path_safety and utility share it
        with np.load(cache, allow_pickle=False) as z:
            return Walked(a, z["plan"], z["linear"], z["anchor_images"], json.loads(str(z["walk"])))
    t0 = time.time()
    res = walk_pairs(a, wc, device=device)
    t_walk = time.time() - t0
    line = linear_paths(a.start, a.end, points=wc.points)

    @torch.no_grad()
    def render(codes: torch.Tensor) -> np.ndarray:
        flat = codes.reshape(-1, codes.shape[-1])
        return np.concatenate([to_uint8(a.G.synthesis(flat[i : i + 512].to(device))) for i in range(0, len(flat), 512)])

    P, T = len(a.start), wc.points
    plan = render(res.paths[:, 1:-1]).reshape(P, T - 2, *a.train.images.shape[1:])
    lin = render(line[:, 1:-1]).reshape(P, T - 2, *a.train.images.shape[1:])
    info = {
        "iters_run": res.iters,
        "iters_max": wc.iters,
        "mean_initial_loss": float(res.initial_loss.mean()),
        "mean_final_loss": float(res.loss.mean()),
        "mean_terms": {k: float(v.mean()) for k, v in res.terms.items()},
        "seconds_walk": round(t_walk, 1),
        "seconds_invert": a.seconds_invert,
        "invert_mse": a.invert_mse,
    }
    out = Walked(a, plan, lin, render(a.anchor_codes), info)
    np.savez(cache, plan=plan, linear=lin, anchor_images=out.anchor_images, walk=json.dumps(info))
    return out


def site_audit(
    ws: Workspace, images: np.ndarray, labels: np.ndarray, paths: np.ndarray | None = None, *, second_attacker=True
) -> tuple[dict, np.ndarray]:
    """The site's own full audit (node.audit.images.audit_images) of candidate images uint8 [S,H,W] with
    their labels [S] and, if given, path ids [S]: its phi_id, both attackers (the second one
    unless `second_attacker` is False, an ablation), its discriminator and its policy, against its
    train and holdout splits. Returns (report, accepted mask [S])."""
    from node.audit.images import audit_images

    cfg = ws.config()
    train, holdout = load_split(ws, "train"), load_split(ws, "holdout")
    return audit_images(
        images,
        train.images,
        holdout.images,
        phi_id=load_model(ws, "phi_id", "cpu"),
        attacker=load_model(ws, "phi_attack", "cpu"),
        attacker_wide=load_model(ws, "phi_attack_wide", "cpu") if second_attacker else None,
        discriminator=load_model(ws, "D", "cpu"),
        policy=cfg.policy,
        device="cpu",
        seed=cfg.synth.seed,
        train_ids=train.patient_ids,
        holdout_ids=holdout.patient_ids,
        candidate_labels=labels,
        train_labels=train.labels,
        holdout_labels=holdout.labels,
        paths=paths,
        lpips_reason="not in the benchmark",
    )
