"""Benchmark of the CVAE route (issue 5): synthetic embeddings against real ones and k-same.

For each MedMNIST data set (../shared/data/<name>.npz, the official train and test splits),
embed every image with the federation's extractor (here the "tiny" seeded random CNN of
node.cvae.embedder: no pretrained foundation-model weights exist on this machine), then train a
linear probe (common.models.EmbeddingHead, hidden=0, full-batch L-BFGS with a fixed L2 penalty,
on the training set's own standardised embeddings) on
  (a) real: the real train embeddings,
  (b) cvae: as many CVAE samples as train records, in the train class counts (node.cvae.generator with the
      default CvaeConfig: early stopping on a validation split carved from train),
  (c) ksame k=2,5,10: per-class k-same means (node.cvae.ksame),
  (d) dp eps=1,5,10: DP-CVAE samples (Opacus DP-SGD for the default max_epochs, delta 1/N),
and report its test AUROC (class 1 against 0), mean and std over --seeds seeds (real and k-same
are deterministic: their std is 0). Privacy proxy: the average over a synthetic set of each
row's Euclidean distance to its nearest real train embedding, in the space standardised by the
real train mean and std (for reference, the same figure for the real test embeddings). Noise
baseline: the real-trained probe's AUROC when Gaussian noise of std sigma = 1, 2, 3 is added to
the standardised test embeddings. Writes bench/results/cvae.json.

    .venv/bin/python -m bench.cvae --threads 2
    .venv/bin/python -m bench.cvae --threads 2 --quick   # 1 seed, breastmnist only
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from bench._site import ROOT, SHARED_DATA, command, machine
from common.config import CvaeConfig, ExtractorConfig
from common.fileio import atomic_write_json
from common.metrics import roc_auc
from common.models import EmbeddingHead
from node.cvae.embedder import build_extractor, embed_images, extractor_digest
from node.cvae.generator import train_cvae
from node.cvae.ksame import ksame_embeddings
from node.cvae.sampling import sample_cvae, sample_labels

DATASETS = ("pneumoniamnist", "breastmnist")
KS = (2, 5, 10)
EPSILONS = (1, 5, 10)
SIGMAS = (1, 2, 3)
L2 = 1e-3  # the probe's penalty on its weights, per standardised feature


class Probe:
    """Standardise with the training set's own mean and std, then logistic regression (an
    EmbeddingHead with hidden=0) fitted to convergence by full-batch L-BFGS: with the L2 term the
    problem is strictly convex, so the result does not depend on the initialisation."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, n_classes: int, seed: int):
        xt = torch.from_numpy(x)
        self.mean, self.std = xt.mean(0), xt.std(0).clamp_min(1e-6)
        z, yt = (xt - self.mean) / self.std, torch.from_numpy(y)
        torch.manual_seed(seed)
        self.head = EmbeddingHead(x.shape[1], n_classes, hidden=0)
        opt = torch.optim.LBFGS(
            self.head.parameters(),
            lr=1,
            max_iter=500,
            tolerance_grad=1e-6,
            tolerance_change=1e-9,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            w = self.head.net.weight
            loss = torch.nn.functional.cross_entropy(self.head(z), yt) + L2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)

    @torch.no_grad()
    def auroc(self, x: np.ndarray, y: np.ndarray, *, standardised: bool = False) -> float:
        """Test AUROC of class 1 against 0; `standardised`: x is already in this probe's space."""
        z = torch.from_numpy(x) if standardised else (torch.from_numpy(x) - self.mean) / self.std
        p1 = self.head(z).softmax(1)[:, 1].numpy()
        return roc_auc(p1[y == 1], p1[y == 0])


def avg_min_dist(synth: np.ndarray, real: np.ndarray, *, chunk: int = 2048) -> float:
    """Mean over the rows of synth [M,D] of the Euclidean distance to the nearest row of real [N,D]."""
    s, r = torch.from_numpy(synth).double(), torch.from_numpy(real).double()
    r2 = (r * r).sum(1)
    mins = [((c * c).sum(1, keepdim=True) - 2 * c @ r.T + r2).clamp_min(0).min(1).values for c in s.split(chunk)]
    return float(torch.cat(mins).sqrt().mean())


def _stats(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def run_dataset(name: str, extractor, *, seeds: int, cvae_cfg: CvaeConfig) -> dict:
    t0 = time.time()
    path = SHARED_DATA / f"{name}.npz"
    if not path.exists():
        raise SystemExit(f"{path} not found: the real-data benchmarks need ../shared/data (see its README)")
    with np.load(path) as z:
        x_img, y = z["train_images"], z["train_labels"][:, 0].astype(np.int64)
        t_img, y_test = z["test_images"], z["test_labels"][:, 0].astype(np.int64)
    n_classes = int(max(y.max(), y_test.max()) + 1)
    x = embed_images(extractor, x_img, device="cpu")
    x_test = embed_images(extractor, t_img, device="cpu")
    t_embed = time.time() - t0
    # the common space of the distance figures: standardised by the real train statistics
    mu, sd = x.mean(0), x.std(0).clip(1e-6)
    std = lambda a: ((a - mu) / sd).astype(np.float32)  # noqa: E731
    real_std = std(x)

    real = [Probe(x, y, n_classes=n_classes, seed=s) for s in range(seeds)]
    real_auc = [p.auroc(x_test, y_test) for p in real]
    out: dict = {
        "n_train": int(len(y)),
        "n_test": int(len(y_test)),
        "train_class_counts": np.bincount(y).tolist(),
        "embedding_dim": int(x.shape[1]),
    }
    m, s_ = _stats(real_auc)
    out["real"] = {"auroc_mean": m, "auroc_std": s_, "test_to_train_avg_min_dist": avg_min_dist(std(x_test), real_std)}

    def synthetic(cfg: CvaeConfig) -> dict:
        aucs, dists, eps, epochs, secs = [], [], [], [], []
        for seed in range(seeds):
            t = time.time()
            res = train_cvae(x, y, n_classes=n_classes, cfg=cfg, seed=seed, device="cpu")
            labels = sample_labels(y, mode="replicate", target_size=len(y), seed=seed)
            synth = sample_cvae(res, labels, seed=seed)
            secs.append(time.time() - t)
            aucs.append(Probe(synth, labels, n_classes=n_classes, seed=seed).auroc(x_test, y_test))
            dists.append(avg_min_dist(std(synth), real_std))
            eps.append(res.epsilon)
            epochs.append(res.epochs_trained)
        m, s_ = _stats(aucs)
        d = {
            "auroc_mean": m,
            "auroc_std": s_,
            "avg_min_dist": float(np.mean(dists)),
            "n": int(len(y)),
            "epochs_trained": epochs,
            "seconds_train_sample": round(float(np.mean(secs)), 1),
        }
        if cfg.dp:
            d.update(
                {
                    "epsilon_spent": float(np.max(eps)),
                    "epsilon_spent_per_seed": eps,
                    "delta": float(res.delta),
                    "noise_multiplier": res.info["noise_multiplier"],
                }
            )
        return d

    out["cvae"] = synthetic(cvae_cfg)
    out["ksame"] = {}
    for k in KS:
        xa, ya = ksame_embeddings(x, y, k=k)
        aucs = [Probe(xa, ya, n_classes=n_classes, seed=s).auroc(x_test, y_test) for s in range(seeds)]
        m, s_ = _stats(aucs)
        out["ksame"][str(k)] = {
            "auroc_mean": m,
            "auroc_std": s_,
            "avg_min_dist": avg_min_dist(std(xa), real_std),
            "n": int(len(ya)),
        }
    out["dp"] = {str(e): synthetic(cvae_cfg.model_copy(update={"dp": True, "dp_epsilon": float(e)})) for e in EPSILONS}
    out["noise"] = {}
    real_mean = out["real"]["auroc_mean"]
    for sigma in SIGMAS:
        aucs = []
        for seed, p in enumerate(real):
            noisy = ((x_test - p.mean.numpy()) / p.std.numpy()).astype(np.float32)
            noisy = noisy + np.random.default_rng(1000 + seed).normal(0, sigma, noisy.shape).astype(np.float32)
            aucs.append(p.auroc(noisy, y_test, standardised=True))
        out["noise"][str(sigma)] = {"auroc_mean": float(np.mean(aucs)), "auroc_drop": real_mean - float(np.mean(aucs))}
    out["targets"] = {
        "cvae_auroc_within_0.05_of_real": bool(real_mean - out["cvae"]["auroc_mean"] <= 0.05),
        "cvae_avg_min_dist_above_ksame_k2": bool(out["cvae"]["avg_min_dist"] > out["ksame"]["2"]["avg_min_dist"]),
    }
    out["seconds"] = {"embed": round(t_embed, 1), "total": round(time.time() - t0, 1)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="1 seed, breastmnist only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cvae.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.datasets = 1, ["breastmnist"]
    if args.threads:
        torch.set_num_threads(args.threads)
    ext_cfg = ExtractorConfig()  # tiny: nothing else can be loaded here
    extractor = build_extractor(ext_cfg, store_dir=ROOT / "bench" / "work" / "modelstore")
    cvae_cfg = CvaeConfig()
    res: dict = {n: run_dataset(n, extractor, seeds=args.seeds, cvae_cfg=cvae_cfg) for n in args.datasets}
    res["extractor"] = {
        **ext_cfg.model_dump(mode="json"),
        "digest": extractor_digest(ext_cfg),
        "dim": extractor.dim,
        "note": (
            "the tiny deterministic extractor (node.cvae.embedder.TinyExtractor: a seeded random-init "
            "CNN), not a foundation model: no pretrained DINOv2 or ResNet weights exist on this "
            "machine, so absolute AUROCs are below what the BMVC paper reports with DINOv2"
        ),
    }
    res["cvae_config"] = cvae_cfg.model_dump(mode="json")
    res["probe"] = f"EmbeddingHead(hidden=0), own-set standardisation, full-batch L-BFGS, L2 {L2}"
    res["command"] = command("bench.cvae", argv)
    res["machine"] = machine()
    res["load_average_at_end"] = list(os.getloadavg())
    atomic_write_json(args.out, res)

    print("CVAE route, tiny deterministic extractor (no foundation-model weights here); test AUROC of a linear probe")
    print(f"{'data set':<16}{'train set':<14}{'n':>6}{'AUROC':>16}{'avg min dist':>14}{'epsilon':>9}")
    for n in args.datasets:
        r = res[n]
        rows = [("real", r["real"], r["n_train"]), ("cvae", r["cvae"], r["cvae"]["n"])]
        rows += [(f"k-same k={k}", v, v["n"]) for k, v in r["ksame"].items()]
        rows += [(f"dp-cvae e={e}", v, v["n"]) for e, v in r["dp"].items()]
        for label, v, count in rows:
            dist = v.get("avg_min_dist")
            eps = v.get("epsilon_spent")
            print(
                f"{n:<16}{label:<14}{count:>6}{v['auroc_mean']:>9.3f} ± {v['auroc_std']:.3f}"
                f"{'' if dist is None else f'{dist:.3f}':>14}{'' if eps is None else f'{eps:.2f}':>9}"
            )
        print(f"{n:<16}{'(real test)':<14}{r['n_test']:>6}{'':>16}{r['real']['test_to_train_avg_min_dist']:>14.3f}")
        for sigma, v in r["noise"].items():
            print(f"{n:<16}{f'noise s={sigma}':<14}{'':>6}{v['auroc_mean']:>9.3f} (drop {v['auroc_drop']:.3f})")
        t = r["targets"]
        print(
            f"{n:<16}targets: "
            f"CVAE AUROC within 0.05 of real: {'met' if t['cvae_auroc_within_0.05_of_real'] else 'NOT met'}; "
            f"CVAE avg min dist above k-same k=2: {'met' if t['cvae_avg_min_dist_above_ksame_k2'] else 'NOT met'}"
        )
    return res


if __name__ == "__main__":
    main()
