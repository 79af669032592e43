"""The PLAN route's candidates from inverted codes: k-same anchors per class, anchor pairs, paths
between them (the PLAN walk or straight lines) and the rendered interior images.

k-same runs over patients (their mean codes), so each anchor mixes k distinct patients. Only the
interior points of each path are rendered: the endpoints are the anchors, shared by several paths
(rendering them would duplicate images) and each the mean of only k real codes, the closest a
candidate could come to a real patient. Every candidate is therefore at least one walk step away
from an anchor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from common.config import WalkConfig
from node.plan.ksame import anchors, ksame_clusters
from node.plan.walk import linear_paths, plan_paths
from node.site.pixels import to_uint8


def choose_pairs(n_anchors: int, n_paths: int, *, rng: np.random.Generator) -> np.ndarray:
    """n_paths (start, end) index pairs [n_paths,2] among n_anchors, start != end: every
    unordered pair once, in random order, before any pair repeats."""
    if n_anchors < 2 or n_paths < 1:
        return np.zeros((0, 2), dtype=np.int64)
    i, j = np.triu_indices(n_anchors, k=1)
    pairs = np.stack([i, j], 1)
    reps = math.ceil(n_paths / len(pairs))
    out = np.concatenate([pairs[rng.permutation(len(pairs))] for _ in range(reps)])[:n_paths]
    flip = rng.random(len(out)) < 0.5  # direction is irrelevant to the walk; randomise it anyway
    out[flip] = out[flip][:, ::-1]
    return out.astype(np.int64)


def paths_per_class(counts: np.ndarray, n_paths: int) -> np.ndarray:
    """Split n_paths over classes in proportion to `counts` (largest remainders), [C] int."""
    share = counts / counts.sum() * n_paths
    out = np.floor(share).astype(np.int64)
    out[np.argsort(-(share - out), kind="stable")[: n_paths - out.sum()]] += 1
    return out


def patient_codes(w: np.ndarray, patient_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The mean code of each patient among the images selected by `mask`: [P,D].

    k-same groups k *patients*, not k images: the codes of one patient's acquisitions lie close
    together in W, so image-level clusters would be filled by a single patient and the anchor
    would be that patient's face (here: anatomy) again. Averaging per patient first makes every
    anchor a mix of k distinct people."""
    ids = np.asarray(patient_ids)[mask]
    uniq, inv = np.unique(ids, return_inverse=True)
    sums = np.zeros((len(uniq), w.shape[1]))
    np.add.at(sums, inv, w[mask])
    return (sums / np.bincount(inv)[:, None]).astype(np.float32)


@dataclass
class AnchorPairs:
    """Within-class pairs of k-same anchors, the endpoints of the paths."""

    start: torch.Tensor  # [P,D]
    end: torch.Tensor  # [P,D]
    labels: torch.Tensor  # [P] int64, the class of both anchors
    anchor_codes: torch.Tensor  # [M,D] every anchor
    anchor_labels: torch.Tensor  # [M] int64
    anchors_per_class: dict[int, int] = field(default_factory=dict)
    classes_skipped: list[int] = field(default_factory=list)  # fewer than 2k patients: no two anchors


def anchor_pairs(
    w: torch.Tensor, labels: np.ndarray, patient_ids: np.ndarray, *, k: int, n_paths: int, rng: np.random.Generator
) -> AnchorPairs:
    """k-same anchors per class over the patients' mean codes of w [N,D] (labels [N], patient ids
    [N]), and `n_paths` within-class pairs split over the classes by image count. Raises
    ValueError when no class has two anchors."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in classes])
    starts, ends, pair_y, all_a, all_y = [], [], [], [], []
    per_class, skipped, most_patients = {}, [], 0
    for c, n_c in zip(classes, paths_per_class(counts, n_paths)):
        pc = patient_codes(w.numpy(), patient_ids, labels == c)
        most_patients = max(most_patients, len(pc))
        a = torch.from_numpy(anchors(pc, ksame_clusters(pc, k))).float()
        per_class[int(c)] = len(a)
        all_a.append(a)
        all_y.append(torch.full((len(a),), int(c), dtype=torch.long))
        if len(a) < 2:
            skipped.append(int(c))
            continue
        pairs = choose_pairs(len(a), int(n_c), rng=rng)
        starts.append(a[pairs[:, 0]])
        ends.append(a[pairs[:, 1]])
        pair_y.append(torch.full((len(pairs),), int(c), dtype=torch.long))
    if not starts:
        raise ValueError(
            f"no class has two k-same anchors (synth.k = {k}); that needs at least {2 * k} train patients of one "
            f"class (the largest has {most_patients}): add patients or lower synth.k"
        )
    cat = torch.cat
    return AnchorPairs(cat(starts), cat(ends), cat(pair_y), cat(all_a), cat(all_y), per_class, skipped)


@torch.no_grad()
def render(G, codes: torch.Tensor, *, device: torch.device | str, batch_size: int = 512) -> np.ndarray:
    """Codes [N,D] -> images uint8 [N,H,W] through G.synthesis."""
    G.to(device)
    return np.concatenate(
        [to_uint8(G.synthesis(codes[i : i + batch_size].to(device))) for i in range(0, len(codes), batch_size)]
    )


@dataclass
class Candidates:
    images: np.ndarray  # uint8 [M,H,W], the interior points of every path
    labels: np.ndarray  # int64 [M]
    path: np.ndarray  # int64 [M], the path each image lies on
    pairs: AnchorPairs
    walk: dict  # the walk's method, steps and mean losses


def plan_candidates(
    G,
    phi_id,
    phi_class,
    w: torch.Tensor,
    labels: np.ndarray,
    patient_ids: np.ndarray,
    *,
    k: int,
    target_size: int,
    walk: WalkConfig,
    seed: int,
    device: torch.device | str,
) -> Candidates:
    """Candidates from the train codes w [N,D] (labels [N], patient ids [N]): ceil(target_size /
    (walk.points - 2)) paths between k-same anchor pairs (pairs drawn with `seed`), walked by
    walk.method, their interior points rendered."""
    per_path = walk.points - 2
    pairs = anchor_pairs(
        w, labels, patient_ids, k=k, n_paths=math.ceil(target_size / per_path), rng=np.random.default_rng(seed)
    )
    info: dict = {"method": walk.method}
    if walk.method == "plan":
        res = plan_paths(
            G,
            phi_id,
            phi_class,
            pairs.start,
            pairs.end,
            pairs.labels,
            points=walk.points,
            iters=walk.iters,
            lr=walk.lr,
            weight_identity=walk.weight_identity,
            weight_smooth=walk.weight_smooth,
            weight_class=walk.weight_class,
            class_shift=walk.class_shift,
            device=device,
        )
        paths = res.paths
        info.update(
            iters_run=res.iters,
            mean_initial_loss=float(res.initial_loss.mean()),
            mean_final_loss=float(res.loss.mean()),
            mean_terms={name: float(v.mean()) for name, v in res.terms.items()},
        )
    else:
        paths = linear_paths(pairs.start, pairs.end, points=walk.points)
    images = render(G, paths[:, 1:-1].reshape(-1, paths.shape[-1]), device=device)
    return Candidates(
        images=images,
        labels=pairs.labels.repeat_interleave(per_path).numpy().astype(np.int64),
        path=np.repeat(np.arange(len(paths)), per_path).astype(np.int64),
        pairs=pairs,
        walk=info,
    )
