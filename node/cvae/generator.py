"""The CVAE route's generator (Di Salvo et al., BMVC 2024; docs/DESIGN.md 3.4): a conditional
VAE that learns the class-conditional distribution of a site's embeddings, and samples from it.

Embeddings float32 [N,D] are min-max scaled per dimension to [0,1] with bounds fitted on the
train set; the decoder ends in a sigmoid and samples are clipped to [0,1], so every sample,
unscaled, lies inside the train range. Optionally trained with DP-SGD (Opacus), per patient: the
bounds are then DP estimates (or public ones) that no train record's value sets exactly, records
are clipped into them, and the decoder's noise scale is a DP estimate too (node.cvae.dp).

Sampling draws from the decoder's likelihood, not only its mean: decoded z plus Gaussian noise of
the per-dimension RMS reconstruction error of the train records (`noise_sd`). The summed-MSE loss
is a Gaussian likelihood of fixed variance 1/2, far wider than min-max scaled embeddings (a
dimension's variance is ~0.01), so at the paper's beta the posterior collapses onto a few latent
dimensions and decoded means vary only along those: a probe trained on them learns the class
means' direction but not the within-class spread it must discount (pneumoniamnist, tiny
extractor: test AUROC 0.84 from means, 0.94 with the noise, 0.95 on real embeddings).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.config import CvaeConfig
from common.models import CVAE  # one definition, shared with the coordinator (the federated CVAE's decoder)
from node.cvae import dp as cvae_dp
from node.cvae.dp_sgd import make_private
from node.cvae.losses import cvae_loss, dp_residual_rms, eval_loss, one_hot, residual_rms
from node.cvae.scaling import fit_scaler, scale
from node.site.progress import progress

# A validation loss counts as lower only if it beats the best by this share: float noise and
# DP noise should not reset the patience.
_MIN_REL_IMPROVEMENT = 1e-4


class _Criterion(nn.Module):
    """`cvae_loss` reduced over the batch by `reduction` ("mean", "sum" or "none"): the shape of
    criterion Opacus' ghost clipping wraps (it switches `reduction` to "none" to get per-sample
    losses)."""

    def __init__(self, beta: float, reduction: str):
        super().__init__()
        self.beta, self.reduction = beta, reduction

    def forward(self, recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        per_sample = cvae_loss(recon, x, mu, logvar, beta=self.beta)
        return {"none": per_sample, "sum": per_sample.sum(), "mean": per_sample.mean()}[self.reduction]


# ---------------------------------------------------------------- training


@dataclass
class CvaeResult:
    """A trained CVAE with what is needed to sample from it and to report how it was made."""

    model: CVAE
    lo: torch.Tensor  # [D] per-dimension train minimum (the scaler); with dp a DP or public bound
    hi: torch.Tensor  # [D] per-dimension train maximum; with dp a DP or public bound
    epochs_trained: int  # epochs run, including those after the best one
    best_epoch: int  # the epoch whose weights `model` holds
    best_val_loss: float | None  # mean per-sample validation loss there; None when no validation split
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, train_loss, val_loss (None without)
    epsilon: float | None = None  # DP: the (epsilon, delta) per patient actually spent: scaler, noise scale and
    delta: float | None = None  # the DP-SGD steps trained, composed (info["dp"] has the parts)
    info: dict = field(default_factory=dict)  # split sizes; "dp": the DP block (`dp_block`)
    noise_sd: torch.Tensor | None = None  # [D] the decoder's observation noise in the scaled space (`residual_rms`)


def stratified_split(y: np.ndarray, fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with `fraction` of each class in val (rounded; at least one where a
    class has two or more rows, none where it has one), both sorted."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = 0 if len(idx) < 2 else int(np.clip(round(fraction * len(idx)), 1, len(idx) - 1))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class _Rows(Dataset):
    """Aligned tensors' rows. A batch is fetched with one index operation (`__getitems__`, which
    DataLoader prefers) rather than B item lookups and a stack, ten times faster at B = 512."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[i] for t in self.tensors)

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, ...]:
        rows = torch.as_tensor(idx, dtype=torch.long)  # may be empty under Poisson sampling
        return tuple(t[rows] for t in self.tensors)


def _batch(b: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return b  # `_Rows.__getitems__` already returns the batch


def _checked(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, *, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x float32 [N,D], y int64 [N] in [0, n_classes) and patient ids [N] (None: one per record),
    or a ValueError that says which of them is off."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(np.int64)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"expected x [N,D] and y [N], got {x.shape} and {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got {y.min()}..{y.max()}")
    groups = np.arange(len(x)) if groups is None else np.asarray(groups)
    if groups.shape != (len(x),):
        raise ValueError(f"expected one patient id per record, got groups {groups.shape} for x {x.shape}")
    return x, y, groups


def _new_model(d_in: int, n_classes: int, *, cfg: CvaeConfig, init: CVAE | None, device: torch.device) -> CVAE:
    """A fresh CVAE from the global RNG, or a copy of `init` (which must fit d_in and n_classes)."""
    if init is None:
        return CVAE(d_in, n_classes, hidden=cfg.hidden, latent=cfg.latent_dim).to(device)
    if (init.d_in, init.n_classes) != (d_in, n_classes):
        raise ValueError(
            f"init CVAE is for D={init.d_in}, {init.n_classes} classes; the data has D={d_in}, {n_classes} classes"
        )
    return copy.deepcopy(init).to(device).train()  # Opacus wraps only a model in training mode


@dataclass
class _Fit:
    history: list[dict]  # per epoch: epoch, train_loss, val_loss (None without a validation split)
    best_val: float  # inf when nothing was compared
    best_epoch: int  # 0 when nothing was compared
    best_state: dict | None  # the best epoch's weights; None when nothing was compared
    steps: int  # optimiser steps taken
    epochs: int  # epochs run


def _run_epochs(
    train_model: nn.Module,
    model: CVAE,
    opt: torch.optim.Optimizer,
    criterion: nn.Module,
    loader: DataLoader,
    *,
    n_epochs: int,
    beta: float,
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    patience: int | None,
    device: torch.device,
) -> _Fit:
    """Up to n_epochs epochs of `train_model` (the model, or Opacus' wrapper of it) over `loader`.
    val: (scaled records [V,D], one-hot classes [V,C], fixed noise [V,latent]) whose loss `model` is
    scored on after each epoch; with `patience`, training stops once that many epochs in a row have
    not improved on the best, whose weights are kept in the result (the caller restores them)."""
    fit = _Fit(history=[], best_val=float("inf"), best_epoch=0, best_state=None, steps=0, epochs=0)
    stale = 0
    with progress("train CVAE", total=n_epochs) as update:
        for epoch in range(1, n_epochs + 1):
            fit.epochs = epoch
            train_model.train()
            total, n = 0.0, 0
            for xb, cb in loader:
                xb, cb = xb.to(device), cb.to(device)
                recon, mu, logvar = train_model(xb, cb)
                loss = criterion(recon, xb, mu, logvar)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                fit.steps += 1
                with torch.no_grad():
                    total, n = total + float(cvae_loss(recon, xb, mu, logvar, beta=beta).sum()), n + len(xb)
            val_loss = eval_loss(model, *val, beta) if val is not None else None
            fit.history.append({"epoch": epoch, "train_loss": total / max(1, n), "val_loss": val_loss})
            update(1, info=f"loss {fit.history[-1]['train_loss']:.4f}")
            if val_loss is None or patience is None:  # no validation split, or a fixed number of epochs
                continue
            if val_loss < fit.best_val - _MIN_REL_IMPROVEMENT * abs(fit.best_val) or fit.best_state is None:
                fit.best_val, fit.best_epoch, stale = val_loss, epoch, 0
                fit.best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= patience:
                    break
    return fit


def train_cvae(
    x: np.ndarray,
    y: np.ndarray,
    *,
    n_classes: int,
    cfg: CvaeConfig,
    seed: int,
    device: torch.device | str,
    init: CVAE | None = None,
    epochs: int | None = None,
    dp_plan_epochs: int | None = None,
    dp_history: list | None = None,
    groups: np.ndarray | None = None,
    scaler: "CvaeResult | None" = None,
) -> CvaeResult:
    """Fit a CVAE to embeddings x float [N,D] with labels y int [N] in [0, n_classes), of the
    patients groups [N] (ids; None: every record its own patient).

    Adam (cfg.lr), batches of cfg.batch_size (None: 512, at most len(train) // 8, at least 16), up to
    cfg.max_epochs epochs. Without dp: early stopping when the loss on a stratified validation split
    (cfg.val_fraction of x, seeded) has not improved for cfg.patience epochs, and the best epoch's
    weights are restored.

    With dp, per patient (node.cvae.dp): the scaler's bounds are public (cfg.dp_bounds) or DP
    estimates, and the records are clipped into them; DP-SGD (Opacus, Poisson sampling of records,
    per-sample clipping at cfg.dp_max_grad_norm) is accounted per record and converted to per
    patient by group privacy, its noise calibrated so that cfg.max_epochs epochs spend its share of
    cfg.dp_epsilon per patient; the noise scale is a DP estimate. delta is cfg.dp_delta, at most
    (and by default) 1 / (10 N_patients). The epsilon and delta reported are the sums of the parts,
    DP-SGD's from the accountant over the steps actually taken; info["dp"] has the parts and the
    caveats (node.cvae.dp.report). By default dp trains on every record for all max_epochs epochs,
    without a validation split: a stopping rule looking at held-out records would leak about them
    outside the accounting. cfg.dp_early_stopping turns the validation split and early stopping
    back on; those records are then never trained on, but the stopping epoch and the restored
    weights depend on them, which the caveats say.

    init: start from a copy of this CVAE (its architecture, encoder and decoder) instead of a fresh
    one; `init` itself is not modified. epochs: train exactly this many epochs without early
    stopping (the validation loss is still recorded each epoch, and the last epoch's weights are
    kept). The federated CVAE's local updates use both (node.cvae.federated).

    A DP plan may span several calls (the federated CVAE's rounds): dp_plan_epochs is how many
    epochs the noise is calibrated for (default: `epochs`, else max_epochs); dp_history is what
    earlier calls of the same plan spent on the same records (their `info["dp_history"]`, a list of
    [noise_multiplier, sample_rate, steps]). A call with a history keeps its noise multiplier and
    composes its steps after it, so the epsilon reported covers every call so far, and the plan's
    last call spends (at most) cfg.dp_epsilon. scaler: a CVAE whose scaler (lo, hi and
    info["scaler"]) to use instead of fitting one: a DP plan's calls pass that of its start
    (`initial_cvae`), which the plan's scaler share paid for; it must come from `fit_scaler` with
    the same cfg, data and seed, or the reported epsilon does not cover it.

    The result's noise_sd is `residual_rms` over the records trained on, with the final weights
    (with dp: `dp_residual_rms`).

    Reproducible for a given seed and device; the caller's global RNG state is left as it was.
    """
    if not cfg.dp and (dp_plan_epochs is not None or dp_history):
        raise ValueError("train_cvae: dp_plan_epochs and dp_history are for training with dp")
    x, y, groups = _checked(x, y, groups, n_classes=n_classes)
    device = torch.device(device)
    use_val = not cfg.dp or cfg.dp_early_stopping
    n_epochs = cfg.max_epochs if epochs is None else int(epochs)
    if n_epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    tr, va = stratified_split(y, cfg.val_fraction, seed=seed) if use_val else (np.arange(len(y)), np.arange(0))
    if len(va) == 0:  # no class has two records: nothing to validate on, train for max_epochs
        use_val = False
    if len(tr) == 0:
        raise ValueError("no training records left after the validation split")
    plan = cvae_dp.plan_budget(cfg, groups[tr]) if cfg.dp else None  # refuses a too-large delta before any work
    xt = torch.from_numpy(x)
    # The scaler is fitted on every train record, validation split included, so that samples can
    # cover the whole train range (with dp: DP or public bounds, which the plan's scaler share pays for).
    if scaler is not None:
        lo, hi = (t.detach().float().cpu() for t in (scaler.lo, scaler.hi))
        scaler_info = dict(scaler.info.get("scaler", {"mechanism": "given"}))
    else:
        lo, hi, scaler_info = fit_scaler(xt, groups, cfg, plan, seed=seed)
    xs = scale(xt, lo, hi)
    if cfg.dp:
        xs = xs.clamp(0, 1)  # records outside the DP or public bounds are clipped into them
    cs = one_hot(torch.from_numpy(y), n_classes)

    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), warnings.catch_warnings():
        # Opacus' notices that are expected here: secure_mode is off (recorded in info), the
        # accountant's alpha range note, and backward hooks on modules whose inputs need no grad
        for msg in ("Secure RNG turned off", "Optimal order is the largest alpha", "Full backward hook is firing"):
            warnings.filterwarnings("ignore", message=msg)
        torch.manual_seed(seed)
        model = _new_model(x.shape[1], n_classes, cfg=cfg, init=init, device=device)
        latent = model.latent
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        batch_size = cfg.batch_size or min(512, max(16, len(tr) // 8))
        loader = DataLoader(
            _Rows(xs[tr], cs[tr]),
            batch_size=batch_size,
            shuffle=True,
            collate_fn=_batch,
            generator=torch.Generator().manual_seed(seed),
        )
        # fixed reparameterisation noise for validation: epoch-to-epoch changes are the weights' alone
        x_val, c_val = xs[va].to(device), cs[va].to(device)
        eps_val = torch.randn(len(va), latent, generator=torch.Generator().manual_seed(seed + 1)).to(device)

        info: dict = {
            "n_train": int(len(tr)),
            "n_val": int(len(va)),
            "early_stopping": use_val and epochs is None,
            "dp": {"enabled": False},
            "batch_size": batch_size,
            "scaler": scaler_info,
        }
        engine = None
        train_model: nn.Module = model
        criterion: nn.Module = _Criterion(cfg.beta, "mean")
        if cfg.dp:
            # Calibrated for every epoch the plan may train (max_epochs, or all the federated
            # rounds' epochs), not fewer: calibrating for fewer epochs than are trained, as the
            # reference federated code does, spends more than the epsilon it claims.
            plan_epochs = dp_plan_epochs or (epochs if epochs is not None else cfg.max_epochs)
            train_model, opt, criterion, loader, engine, dp_info = make_private(
                model,
                opt,
                loader,
                _Criterion(cfg.beta, "sum"),
                cfg=cfg,
                plan=plan,
                plan_epochs=plan_epochs,
                history=dp_history,
            )
            info.update(dp_info)
        fit = _run_epochs(
            train_model,
            model,
            opt,
            criterion,
            loader,
            n_epochs=n_epochs,
            beta=cfg.beta,
            val=(x_val, c_val, eps_val) if use_val else None,
            patience=cfg.patience if epochs is None else None,
            device=device,
        )
        rec_spent = None
        if cfg.dp:
            rec_spent = float(engine.accountant.get_epsilon(plan.sgd_record[1]))
            info["dp_history"] = [[float(sig), float(q), int(n)] for sig, q, n in engine.accountant.history]
            train_model.remove_hooks()  # the bare `model` shares its parameters; drop Opacus' hooks
        if fit.best_state is not None:
            model.load_state_dict(fit.best_state)
    info["steps"] = fit.steps
    model.eval()
    epsilon = delta = None
    if cfg.dp:
        noise_sd, noise_info = dp_residual_rms(model, xs[tr].to(device), cs[tr].to(device), groups[tr], plan, seed=seed)
        info["dp"] = cvae_dp.report(
            plan,
            cfg,
            sgd_record_epsilon=rec_spent,
            noise_multiplier=info["noise_multiplier"],
            sample_rate=info["sample_rate"],
            steps=sum(h[2] for h in info["dp_history"]),
            n_val=len(va) if use_val else 0,
            scaler=scaler_info,
            noise_scale=noise_info,
        )
        epsilon, delta = info["dp"]["epsilon"], info["dp"]["delta"]
    else:
        noise_sd = residual_rms(model, xs[tr].to(device), cs[tr].to(device))
    return CvaeResult(
        model=model,
        lo=lo.to(device),
        hi=hi.to(device),
        epochs_trained=fit.epochs,
        best_epoch=fit.best_epoch if fit.best_state is not None else fit.epochs,
        best_val_loss=(fit.best_val if epochs is None else fit.history[-1]["val_loss"]) if use_val else None,
        history=fit.history,
        epsilon=epsilon,
        delta=delta,
        info=info,
        noise_sd=noise_sd,
    )


def initial_cvae(
    x: np.ndarray, y: np.ndarray, *, n_classes: int, cfg: CvaeConfig, seed: int, groups: np.ndarray | None = None
) -> CvaeResult:
    """An untrained CVAE (seeded init) with the scaler fitted on x [N,D] (`fit_scaler`, patient ids
    groups [N], None: one record each; with dp the DP or public bounds, as `train_cvae` would fit
    them): the start of a federated DP plan, which must not spend budget on local pre-training
    outside its accounting. The plan's rounds pass these bounds on (`train_cvae`'s scaler), and
    their epsilon covers them. Its noise_sd is zero: it is never sampled from."""
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    groups = np.arange(len(xt)) if groups is None else np.asarray(groups)
    tr = (
        np.arange(len(xt))
        if cfg.dp and not cfg.dp_early_stopping
        else stratified_split(np.asarray(y).astype(np.int64), cfg.val_fraction, seed=seed)[0]
    )
    plan = cvae_dp.plan_budget(cfg, groups[tr]) if cfg.dp else None
    lo, hi, scaler_info = fit_scaler(xt, groups, cfg, plan, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CVAE(xt.shape[1], n_classes, hidden=cfg.hidden, latent=cfg.latent_dim).eval()
    return CvaeResult(
        model=model,
        lo=lo,
        hi=hi,
        epochs_trained=0,
        best_epoch=0,
        best_val_loss=None,
        info={
            "untrained": "the start of a federated DP plan: the federation's rounds train it",
            "dp": {"enabled": False},
            "scaler": scaler_info,
        },
        noise_sd=torch.zeros(xt.shape[1]),
    )
