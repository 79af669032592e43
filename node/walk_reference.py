"""REFERENCE IMPLEMENTATION, for benchmarking only: the PLAN walk done the way the authors' code
does it (Pennisi et al. 2023), one path at a time, with the images of a path pushed through the
generator and the classifiers in chunks of 4.

It optimises the same objective as node.walk.path_loss (identity KL to uniform and class
cross-entropy averaged over the interior points, squared step lengths summed), with the same
optimiser (Adam, one per path), the same initialisation (the straight line) and fixed endpoints,
for a fixed number of steps and no stopping rule. Gradients of the chunks are accumulated before
each Adam step, which is how chunking keeps memory bounded in the original. The node never calls
this: bench/walk_speed.py compares it with node.walk.plan_paths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from node.walk import linear_paths, path_loss

REFERENCE_CHUNK = 4  # images per forward/backward pass in the authors' code


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
    weight_identity: float,
    weight_smooth: float,
    weight_class: float,
    chunk: int = REFERENCE_CHUNK,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Optimise one path; start, end [D] -> path [points,D] (CPU), endpoints fixed."""
    start, end = start.to(device), end.to(device)
    line = linear_paths(start[None], end[None], points=points)[0]
    interior = line[1:-1].clone().requires_grad_(True)  # [T-2,D]
    opt = torch.optim.Adam([interior], lr=lr)
    n = points - 2
    log_c = None
    for _ in range(iters):
        opt.zero_grad(set_to_none=True)
        for i in range(0, n, chunk):
            img = G.synthesis(interior[i : i + chunk])
            logp = F.log_softmax(phi_id(img), dim=1)
            if log_c is None:
                log_c = math.log(logp.shape[1])
            # this chunk's share of the means over the n interior points
            identity = (-log_c - logp.mean(1)).sum() / n
            y = torch.full((len(img),), int(label), dtype=torch.long, device=device)
            cls = F.cross_entropy(phi_class(img), y, reduction="sum") / n
            (weight_identity * identity + weight_class * cls).backward()
        path = torch.cat([start[None], interior, end[None]])
        smooth = (path[1:] - path[:-1]).square().sum()
        (weight_smooth * smooth).backward()
        opt.step()
    return torch.cat([start[None], interior.detach(), end[None]]).cpu()


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
    lr: float = 0.1,
    weight_identity: float = 0.1,
    weight_smooth: float = 1.0,
    weight_class: float = 1.0,
    chunk: int = REFERENCE_CHUNK,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """All P paths, sequentially: start, end [P,D], labels [P] -> (paths [P,points,D], final
    per-path loss [P] by node.walk.path_loss)."""
    for m in (G, phi_id, phi_class):
        m.to(device).eval().requires_grad_(False)
    paths = torch.stack(
        [
            reference_path(
                G,
                phi_id,
                phi_class,
                start[p],
                end[p],
                int(labels[p]),
                points=points,
                iters=iters,
                lr=lr,
                weight_identity=weight_identity,
                weight_smooth=weight_smooth,
                weight_class=weight_class,
                chunk=chunk,
                device=device,
            )
            for p in range(len(start))
        ]
    )
    with torch.no_grad():
        loss, _ = path_loss(
            G,
            phi_id,
            phi_class,
            paths.to(device),
            torch.as_tensor(labels, device=device),
            weight_identity=weight_identity,
            weight_smooth=weight_smooth,
            weight_class=weight_class,
        )
    return paths, loss.cpu()
