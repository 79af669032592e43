"""The authors' PLAN walk (Pennisi et al. 2023, perceivelab/PLAN `privacy_path.py`), rewritten
in this project's terms for benchmarking only: the node never calls it; bench/walk_speed.py
times node.plan.walk.plan_paths against it.

What it keeps from the authors' `get_privacy_path`, in behaviour:
- one path at a time; its interior starts on the straight line, its endpoints stay fixed;
- each Adam step renders all interior points of the path with one generator call and clamps the
  images to [-1, 1];
- the classifiers see the images in chunks of 4; each chunk adds its batch-mean
  KL(uniform || softmax(phi_id)) to the privacy term and its mean cross-entropy to the class
  term (the chunk losses are summed, not averaged, so the image terms grow with the path);
- the equidistance term is the sum of squared steps along the whole path;
- loss = weight_identity * privacy + weight_smooth * equidistance + weight_class * class, one
  backward pass and one Adam step (betas 0.9, 0.999) per iteration, no stopping rule.

What differs, and why it does not matter for timing: the authors' networks take 3 channels (a
grey image is repeated); ours take 1. F.pairwise_distance adds eps=1e-6 to each difference;
the squared steps here do not.

Against node.plan.walk.path_loss: with one chunk per path (chunk >= points - 2) and images inside
[-1, 1] the two objectives are equal; with chunks of 4 the privacy and class terms are about
(points - 2) / 4 times the node's (the node averages over the interior points), so the same
weights put more weight on the images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from node.plan.walk import linear_paths

AUTHORS_CHUNK = 4  # images per classifier pass in the authors' code


def reference_objective(
    G,
    phi_id,
    phi_class,
    path: torch.Tensor,
    label: int,
    *,
    weight_identity: float,
    weight_smooth: float,
    weight_class: float,
    chunk: int = AUTHORS_CHUNK,
) -> torch.Tensor:
    """The authors' loss of one path [T,D] (endpoints included) of class `label` -> scalar."""
    img = G.synthesis(path[1:-1]).clamp(-1, 1)  # [T-2,1,H,W], one generator call
    y = torch.tensor(int(label), device=path.device)
    privacy = cls = 0.0
    for part in img.split(chunk):
        logp = F.log_softmax(phi_id(part), dim=1)
        privacy = privacy + (-math.log(logp.shape[1]) - logp.mean(1)).mean()  # KL(uniform||p), batchmean
        out = phi_class(part)
        cls = cls + F.cross_entropy(out, y.repeat(len(out)))
    equidistance = (path[1:] - path[:-1]).square().sum()
    return weight_identity * privacy + weight_smooth * equidistance + weight_class * cls


def reference_path(
    G,
    phi_id,
    phi_class,
    start: torch.Tensor,
    end: torch.Tensor,
    label: int,
    *,
    points: int,
    iters: int,
    lr: float,
    chunk: int = AUTHORS_CHUNK,
    **weights: float,
) -> torch.Tensor:
    """Optimise one path: start, end [D] -> path [points,D], endpoints fixed."""
    interior = linear_paths(start[None], end[None], points=points)[0, 1:-1].clone().requires_grad_(True)
    opt = torch.optim.Adam([interior], lr=lr, betas=(0.9, 0.999))
    for _ in range(iters):
        opt.zero_grad()
        path = torch.cat([start[None], interior, end[None]])
        reference_objective(G, phi_id, phi_class, path, label, chunk=chunk, **weights).backward()
        opt.step()
    return torch.cat([start[None], interior.detach(), end[None]])


def reference_walk(
    G,
    phi_id,
    phi_class,
    start: torch.Tensor,
    end: torch.Tensor,
    labels: torch.Tensor,
    *,
    points: int,
    iters: int,
    lr: float,
    weight_identity: float,
    weight_smooth: float,
    weight_class: float,
    chunk: int = AUTHORS_CHUNK,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """All P paths, one after the other: start, end [P,D], labels [P] -> (paths [P,points,D] on
    the CPU, final loss [P] under the authors' objective)."""
    for m in (G, phi_id, phi_class):
        m.to(device).eval().requires_grad_(False)
    start, end = start.to(device), end.to(device)
    weights = {"weight_identity": weight_identity, "weight_smooth": weight_smooth, "weight_class": weight_class}
    paths, losses = [], []
    for p in range(len(start)):
        label = int(labels[p])
        path = reference_path(
            G, phi_id, phi_class, start[p], end[p], label, points=points, iters=iters, lr=lr, chunk=chunk, **weights
        )
        with torch.no_grad():
            losses.append(reference_objective(G, phi_id, phi_class, path, label, chunk=chunk, **weights))
        paths.append(path)
    return torch.stack(paths).cpu(), torch.stack(losses).cpu()
