"""Membership-inference attacks beyond the black-box nearest-neighbour one, ROC points and
bootstrap confidence intervals (docs/DESIGN.md 3.5). Every attack returns member scores for the
train records T and non-member scores for the holdout records H (higher = "member"); AUC 0.5 is
ideal.

- density_ratio_scores: DOMIAS (van Breugel et al. 2023): log p_S(x) - log p_R(x), Gaussian KDEs
  in a PCA of an embedding space; the reference density R comes from non-member patients other
  than the scored ones (the audit's calibration half; otherwise each scored record would sit on
  its own kernel and its patient's other images, and look *less* like a member than T records
  do, for no reason but the setup).
- discriminator_scores: LOGAN white-box (Hayes et al. 2019): D(x) of the GAN's discriminator.
- downstream_scores: train a classifier on S, score -loss(x, y) (loss-threshold attack,
  Yeom et al. 2018), as in the PLAN paper's MIA column.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from node.site.pixels import to_tensor

# ---------------------------------------------------------------- ROC and bootstrap


def roc_points(pos: np.ndarray, neg: np.ndarray, *, max_points: int = 200) -> dict:
    """ROC curve of scores pos [P] (members) vs neg [N]: {"fpr": [...], "tpr": [...]} from (0,0)
    to (1,1), thinned to at most `max_points` points (for plots; the AUC is computed exactly elsewhere)."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return {"fpr": [], "tpr": []}
    thr = np.unique(np.concatenate([pos, neg]))[::-1]
    tpr = (pos[None, :] >= thr[:, None]).mean(1)
    fpr = (neg[None, :] >= thr[:, None]).mean(1)
    fpr, tpr = np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": [round(float(v), 4) for v in fpr], "tpr": [round(float(v), 4) for v in tpr]}


def cluster_resamples(groups: np.ndarray, *, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`n` bootstrap resamples of record indices, drawing whole groups (patients) with replacement:
    images of one patient are not independent, and resampling images alone would give intervals
    that are too narrow."""
    groups = np.asarray(groups)
    uniq, inv = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(len(uniq))]
    out = []
    for _ in range(n):
        pick = rng.integers(0, len(uniq), len(uniq))
        out.append(np.concatenate([members[g] for g in pick]) if len(pick) else np.zeros(0, dtype=int))
    return out


def bootstrap_ci(
    stat: Callable[..., float],
    arrays_groups: list[tuple[np.ndarray, np.ndarray]],
    *,
    n: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> list[float | None]:
    """Percentile interval [lo, hi] of stat(*arrays) over `n` resamples, each array resampled
    independently by its groups (pass np.arange(len(a)) to resample records). None where
    undefined (an empty array)."""
    if any(len(a) == 0 for a, _ in arrays_groups):
        return [None, None]
    rng = np.random.default_rng(seed)
    draws = [cluster_resamples(g, n=n, rng=rng) for _, g in arrays_groups]
    vals = np.array([stat(*(a[d[b]] for (a, _), d in zip(arrays_groups, draws))) for b in range(n)], dtype=np.float64)
    vals = vals[~np.isnan(vals)]
    if len(vals) == 0:
        return [None, None]
    a = (1 - level) / 2
    return [float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))]


# ---------------------------------------------------------------- DOMIAS


def _log_kde(x: np.ndarray, ref: np.ndarray, h: float) -> np.ndarray:
    """log of a Gaussian KDE with bandwidth h over ref [M,d] at x [N,d]. Constant factors cancel
    in the ratio and are dropped."""
    d2 = (x * x).sum(1)[:, None] + (ref * ref).sum(1)[None] - 2 * x @ ref.T
    logk = -np.maximum(d2, 0) / (2 * h * h)
    m = logk.max(1, keepdims=True)
    return m[:, 0] + np.log(np.exp(logk - m).sum(1)) - np.log(len(ref))


def density_ratio_scores(
    s: np.ndarray, t: np.ndarray, h: np.ndarray, *, reference: np.ndarray, dims: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """DOMIAS scores log p_S(x) - log p_R(x) for x in t [N,D] (members) and h [M,D] (non-members),
    from embeddings of S [K,D] and of a reference set R [L,D] of other non-members (patients in
    neither t nor h, so no record sits on its own kernel). PCA to `dims` whitened dimensions
    fitted on S and R (what an attacker holding the release and reference data has), Scott's-rule
    bandwidth."""
    s, t, h, r = (np.asarray(a, dtype=np.float64) for a in (s, t, h, reference))
    fit = np.concatenate([s, r])
    mu = fit.mean(0)
    _, sv, vt = np.linalg.svd(fit - mu, full_matrices=False)
    k = int(min(dims, (sv > 1e-9 * sv[0]).sum())) if len(sv) and sv[0] > 0 else 0
    if k == 0 or len(r) == 0:
        return np.zeros(len(t)), np.zeros(len(h))
    proj = vt[:k].T / (sv[:k] / np.sqrt(max(len(fit) - 1, 1)))
    zs, zt, zh, zr = ((a - mu) @ proj for a in (s, t, h, r))

    def bw(n: int) -> float:  # Scott's rule on unit-variance dimensions
        return float(n ** (-1.0 / (k + 4)))

    pos = _log_kde(zt, zs, bw(len(zs))) - _log_kde(zt, zr, bw(len(zr)))
    neg = _log_kde(zh, zs, bw(len(zs))) - _log_kde(zh, zr, bw(len(zr)))
    return pos, neg


# ---------------------------------------------------------------- LOGAN


@torch.no_grad()
def discriminator_scores(
    D, images: np.ndarray, context: np.ndarray, *, device: torch.device | str = "cpu", batch_size: int = 256
) -> np.ndarray:
    """D's logit for each image uint8 [N,H,W]. D's minibatch-stddev layer mixes a group of 4
    samples, so each image is scored in a group with the same 3 `context` images (uint8 [3,H,W],
    synthetic ones: neither member nor non-member), which makes its score independent of the
    order and of the other records."""
    D.to(device).eval()
    ctx = to_tensor(context[:3], device)
    if len(ctx) < 3:
        raise ValueError("discriminator_scores needs 3 context images")
    out = []
    x_all = to_tensor(images, device)
    for i in range(0, len(x_all), batch_size):
        x = x_all[i : i + batch_size]
        n = len(x)
        # groups are taken as reshape(g, -1): sample j of every group sits at j, j+n/4... so lay
        # the batch out as [x; c1*n; c2*n; c3*n] -> groups {x_i, c1, c2, c3}
        batch = torch.cat([x, *(c[None].expand(n, -1, -1, -1) for c in ctx)])
        out.append(D(batch)[:n].float().cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


# ---------------------------------------------------------------- downstream model


def downstream_scores(
    s_data: np.ndarray,
    s_labels: np.ndarray,
    t: tuple[np.ndarray, np.ndarray],
    h: tuple[np.ndarray, np.ndarray],
    *,
    make_model: Callable[[int, np.ndarray], torch.nn.Module],
    augment: str,
    epochs: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train a fresh classifier `make_model(n_classes, s_data)` on the synthetic set (images uint8
    [K,H,W] or embeddings float [K,D], labels [K]) and score the train and holdout records (data, labels)
    by -cross-entropy. Returns (pos [N], neg [M], info with the classifier's accuracy on T and H)."""
    import torch.nn.functional as F

    from node.federation.task import predict_logits, train_classifier

    n_classes = int(max(np.max(s_labels), np.max(t[1]), np.max(h[1]))) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model(n_classes, s_data)
    train_classifier(
        model, s_data, s_labels, epochs=epochs, lr=3e-3, batch_size=32, device=device, seed=seed, augment=augment
    )

    def score(x, y):
        logits = predict_logits(model, x, device=device)
        yt = torch.as_tensor(np.asarray(y), dtype=torch.long)
        return -F.cross_entropy(logits, yt, reduction="none").double().numpy(), float(
            (logits.argmax(1) == yt).double().mean()
        )

    pos, acc_t = score(*t)
    neg, acc_h = score(*h)
    return pos, neg, {"accuracy_train": acc_t, "accuracy_holdout": acc_h, "epochs": epochs}
