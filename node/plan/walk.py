"""Paths between anchors in W: the straight line (baseline) and the PLAN walk (Pennisi et al.
2023), optimised so every image on a path stays far from every real identity and in its class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.config import WalkConfig
from node.site.progress import progress


def linear_paths(start: torch.Tensor, end: torch.Tensor, *, points: int) -> torch.Tensor:
    """start, end [P,D] -> [P,points,D] evenly spaced codes, endpoints included."""
    t = torch.linspace(0, 1, points, dtype=start.dtype, device=start.device)[None, :, None]
    return start[:, None] + t * (end - start)[:, None]


@dataclass
class WalkResult:
    paths: torch.Tensor  # [P,T,D], endpoints equal to start and end
    loss: torch.Tensor  # [P] final per-path loss
    initial_loss: torch.Tensor  # [P] the same loss on the straight line
    terms: dict[str, torch.Tensor]  # final per-path identity, smooth, class terms, each [P]
    iters: int  # optimiser steps taken


def shifted_views(img: torch.Tensor, shift: int) -> torch.Tensor:
    """img [B,C,H,W] -> [5B,C,H,W]: the images, then the same moved `shift` pixels right, left,
    down and up (the border repeated into the gap), view by view; shift 0 -> img itself."""
    if shift == 0:
        return img
    H, W = img.shape[-2:]
    s = shift
    padded = F.pad(img, (s, s, s, s), mode="replicate")
    corners = [(s, s), (s, 0), (s, 2 * s), (0, s), (2 * s, s)]  # (top, left) of each crop
    return torch.cat([padded[..., t : t + H, c : c + W] for t, c in corners])


def path_loss(
    G,
    phi_id,
    phi_class,
    paths: torch.Tensor,
    labels: torch.Tensor,
    *,
    weight_identity: float,
    weight_smooth: float,
    weight_class: float,
    class_shift: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PLAN objective per path; paths [P,T,D], labels [P] -> (loss [P], terms).

    identity: mean over the T-2 interior points of KL(uniform || softmax(phi_id(G(w)))), i.e.
      -log(C) - mean_c log p_c; 0 when phi_id cannot tell which train patient it is.
    smooth:   sum over the T-1 steps of ||w_{t+1} - w_t||^2 (endpoints included).
    class:    mean over the interior points of CE(phi_class(G(w)), y); with class_shift > 0 (a share of
      the image side), the mean over the image and its four copies moved that far right, left, down
      and up (`shifted_views`, whole pixels), so that the walk cannot satisfy it with a pattern only
      phi_class reads.
    Endpoints are fixed anchors, so their image terms are constants and left out.
    """
    P, T, D = paths.shape
    interior = paths[:, 1:-1].reshape(-1, D)
    img = G.synthesis(interior)
    logp_id = F.log_softmax(phi_id(img), dim=1)  # [P*(T-2), C_id]
    identity = (-torch.log(torch.tensor(float(logp_id.shape[1]))) - logp_id.mean(1)).reshape(P, T - 2).mean(1)
    views = shifted_views(img, round(class_shift * img.shape[-1]))  # [V*P*(T-2),1,H,W]
    n_views = len(views) // len(img)
    y = labels.repeat_interleave(T - 2).repeat(n_views)
    cls = F.cross_entropy(phi_class(views), y, reduction="none").reshape(n_views, P, T - 2).mean(dim=(0, 2))
    smooth = (paths[:, 1:] - paths[:, :-1]).square().sum(dim=(1, 2))
    loss = weight_identity * identity + weight_smooth * smooth + weight_class * cls
    return loss, {"identity": identity.detach(), "smooth": smooth.detach(), "class": cls.detach()}


# The walk's hyperparameters have their defaults in one place, the site config's WalkConfig.
_WALK = WalkConfig.model_fields


def plan_paths(
    G,
    phi_id,
    phi_class,
    start: torch.Tensor,
    end: torch.Tensor,
    labels: torch.Tensor,
    *,
    points: int,
    iters: int,
    lr: float = _WALK["lr"].default,
    weight_identity: float = _WALK["weight_identity"].default,
    weight_smooth: float = _WALK["weight_smooth"].default,
    weight_class: float = _WALK["weight_class"].default,
    class_shift: float = _WALK["class_shift"].default,
    patience: int | None = 20,
    min_improvement: float = 1e-4,
    keep_best: bool = True,
    device: torch.device | str,
) -> WalkResult:
    """Optimise all P paths at once as one tensor [P,points,D]: endpoints `start`/`end` [P,D]
    fixed, interior initialised on the straight line, Adam with `lr` on the sum of the per-path
    losses (path_loss). Adam is elementwise and the paths share no parameters, so each path
    follows the trajectory it would follow alone, up to float rounding (to 1e-5 on the CPU in
    tests/test_walk_depth.py; on CUDA, kernels differ with the batch shape); batching changes the speed.

    Stopping rule: after `iters` steps, or earlier when for `patience` steps no path has lowered
    its own loss by a relative `min_improvement` (patience None: always `iters` steps).
    keep_best: return each path's lowest-loss iterate (the last one included); otherwise the
    last iterate of every path.
    """
    for m in (G, phi_id, phi_class):
        # channels_last: the convolutions (and their backward) run ~1.2x faster on a CPU (oneDNN's
        # preferred layout); the weights are the same values, so the models work as before.
        m.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    start, end = start.to(device), end.to(device)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    line = linear_paths(start, end, points=points)
    interior = line[:, 1:-1].clone().requires_grad_(True)
    opt = torch.optim.Adam([interior], lr=lr)
    weights = {
        "weight_identity": weight_identity,
        "weight_smooth": weight_smooth,
        "weight_class": weight_class,
        "class_shift": class_shift,
    }

    def assemble() -> torch.Tensor:
        return torch.cat([start[:, None], interior, end[:, None]], dim=1)

    with torch.no_grad():
        initial, _ = path_loss(G, phi_id, phi_class, line, labels, **weights)
    best_loss, best_paths = initial.clone(), line.detach().clone()
    since_best, steps = 0, 0

    def remember(current: torch.Tensor, loss: torch.Tensor) -> bool:
        improved = loss < best_loss - min_improvement * best_loss.abs()
        best_loss[improved] = loss[improved]
        best_paths[improved] = current.detach()[improved]
        return bool(improved.any())

    with progress("walk", total=iters) as update:
        for steps in range(1, iters + 1):  # noqa: B007 (read after the loop: the steps taken)
            current = assemble()
            loss, _ = path_loss(G, phi_id, phi_class, current, labels, **weights)
            since_best = 0 if remember(current, loss.detach()) else since_best + 1
            total = loss.sum()
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            update(1, info=f"loss {total.item():.4f}")
            if patience is not None and since_best >= patience:
                break
    with torch.no_grad():
        last = assemble().detach()
        last_loss, _ = path_loss(G, phi_id, phi_class, last, labels, **weights)
        remember(last, last_loss)
        out = best_paths if keep_best else last
        final, terms = path_loss(G, phi_id, phi_class, out, labels, **weights)
    return WalkResult(out.cpu(), final.cpu(), initial.cpu(), {k: v.cpu() for k, v in terms.items()}, steps)
