"""The GAN's training loop: non-saturating logistic loss, lazy R1, EMA generator, DiffAugment,
resumable from a safetensors training state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from node.plan.gan import Discriminator, Generator
from node.site.checkpoint import load_optimizer_tensors, load_state, optimizer_tensors, save_state
from node.site.pixels import random_translate
from node.site.progress import progress

R1_EVERY = 16  # lazy regularisation (StyleGAN2): R1 every 16 D steps, scaled by 16


def diff_augment(x: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020) translation by up to 1/8 of the side and a cutout of a
    quarter-side square, applied to real and fake alike before D. Differentiable, so G learns
    through it; with ~100-300 training images it keeps D from memorising them."""
    x = random_translate(x, max_shift=1 / 8, generator=generator)
    B, _, H, W = x.shape
    ch, cw = H // 4, W // 4
    cy = torch.randint(0, H - ch + 1, (B,), generator=generator).to(x.device)
    cx = torch.randint(0, W - cw + 1, (B,), generator=generator).to(x.device)
    yy = torch.arange(H, device=x.device)[None, :, None]
    xx = torch.arange(W, device=x.device)[None, None, :]
    keep = ~(
        ((yy >= cy[:, None, None]) & (yy < cy[:, None, None] + ch))
        & ((xx >= cx[:, None, None]) & (xx < cx[:, None, None] + cw))
    )
    return torch.where(keep[:, None], x, torch.full_like(x, -1.0))


@dataclass
class GanResult:
    G: Generator
    G_ema: Generator
    D: Discriminator
    steps: int
    loss_G: float  # mean over the last 50 steps
    loss_D: float
    r1: float
    quality: list[dict]  # on_checkpoint's figures at every checkpoint, each with its "step"


def train_gan(
    real: torch.Tensor,
    *,
    G: Generator,
    D: Discriminator,
    steps: int,
    batch_size: int,
    lr: float,
    r1_gamma: float,
    ema_beta: float,
    checkpoint_every: int,
    state_path: Path | None,
    state_key: str,
    seed: int,
    device: torch.device,
    on_checkpoint: Callable[[Generator], dict] | None = None,
    sample_weights: torch.Tensor | None = None,
) -> GanResult:
    """Train G and D on real [N,1,H,W] in [-1,1] for `steps` steps.

    D's real batches draw images uniformly, or, with `sample_weights` [N] (non-negative, any
    scale), in proportion to them and with replacement: an unconditional G learns the classes in
    the proportions D sees them, so weights that balance the classes let it render a minority class
    as well as the majority.

    Every `checkpoint_every` steps the whole training state (G, G_ema, D and both Adam states)
    goes to `state_path`; a state with the same `state_key` (the config and data digest) found
    there is resumed from. The randomness of step t depends only on (seed, t), so a resumed run
    makes the same models as an uninterrupted one (on the CPU; on CUDA the backward of bilinear
    upsampling adds in a nondeterministic order, so the two agree only to rounding).
    `on_checkpoint(G_ema)` (the node passes a quality measure) is called at every checkpoint; its
    figures are kept with the step.
    """
    real = real.to(device)
    G, D = G.to(device), D.to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_G = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.0, 0.99))
    opt_D = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.0, 0.99))
    start, hist = 0, {"G": [], "D": [], "r1": [], "quality": []}

    if state_path is not None and state_path.exists():
        tensors, meta = load_state(state_path)
        if meta.get("key") == state_key:
            for name, mod in (("G", G), ("G_ema", G_ema), ("D", D)):
                mod.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
            load_optimizer_tensors(opt_G, tensors, "opt_G", meta["opt_G"])
            load_optimizer_tensors(opt_D, tensors, "opt_D", meta["opt_D"])
            start, hist = meta["step"], meta["hist"]

    def checkpoint(step: int) -> None:
        if on_checkpoint is not None:
            hist["quality"].append({"step": step, **on_checkpoint(G_ema)})
        if state_path is None:
            return
        tensors = {}
        for name, mod in (("G", G), ("G_ema", G_ema), ("D", D)):
            tensors.update({f"{name}.{k}": v.detach().cpu() for k, v in mod.state_dict().items()})
        tg, mg = optimizer_tensors(opt_G, "opt_G")
        td, md = optimizer_tensors(opt_D, "opt_D")
        save_state(
            state_path,
            {**tensors, **tg, **td},
            {"key": state_key, "step": step, "opt_G": mg, "opt_D": md, "hist": hist},
        )

    with progress("train GAN", total=steps, completed=start) as update:
        for step in range(start, steps):
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            if sample_weights is None:
                idx = torch.randint(0, len(real), (batch_size,), generator=g).to(device)
            else:
                idx = torch.multinomial(sample_weights, batch_size, replacement=True, generator=g).to(device)
            z = torch.randn(batch_size, G.z_dim, generator=g).to(device)

            # generator: non-saturating logistic loss
            w = G.mapping(z)
            G.track_w_avg(w)
            loss_G = F.softplus(-D(diff_augment(G.synthesis(w), generator=g))).mean()
            opt_G.zero_grad(set_to_none=True)
            loss_G.backward()
            opt_G.step()

            # discriminator: logistic loss, plus lazy R1 on un-augmented reals
            x_real = real[idx]
            with torch.no_grad():
                fake = G(z)
            loss_D = (
                F.softplus(D(diff_augment(fake, generator=g))).mean()
                + F.softplus(-D(diff_augment(x_real, generator=g))).mean()
            )
            r1 = torch.zeros((), device=device)
            if r1_gamma > 0 and step % R1_EVERY == 0:
                x_r1 = x_real.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(D(x_r1).sum(), x_r1, create_graph=True)
                r1 = grad.square().sum(dim=(1, 2, 3)).mean()
                loss_D = loss_D + (r1_gamma / 2) * r1 * R1_EVERY
            opt_D.zero_grad(set_to_none=True)
            loss_D.backward()
            opt_D.step()

            with torch.no_grad():
                for pe, p in zip(G_ema.parameters(), G.parameters()):
                    pe.lerp_(p, 1 - ema_beta)
                for be, b in zip(G_ema.buffers(), G.buffers()):
                    be.copy_(b)

            for k, v in (("G", loss_G), ("D", loss_D)):
                hist[k] = (hist[k] + [v.item()])[-50:]
            if r1_gamma > 0 and step % R1_EVERY == 0:
                hist["r1"] = (hist["r1"] + [r1.item()])[-10:]
            update(1, info=f"G {hist['G'][-1]:.3f} D {hist['D'][-1]:.3f}")
            if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
                checkpoint(step + 1)

    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    return GanResult(G, G_ema, D, steps, mean(hist["G"]), mean(hist["D"]), mean(hist["r1"]), hist.get("quality", []))
