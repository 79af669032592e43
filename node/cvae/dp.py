"""Differential privacy of the CVAE route (node.cvae.generator with synth.cvae.dp): the unit, the budget, and the
mechanisms besides DP-SGD that the released samples depend on.

Unit: the patient. Neighbouring data sets differ by one patient with all their records (add/remove,
Opacus' convention). DP-SGD samples and clips *records* (Opacus), so its record-level (eps, delta),
from the PRV accountant, is converted by group privacy with k = the largest number of records of
one patient among the records trained on: an (eps, delta)-DP mechanism is (k eps, k e^((k-1) eps)
delta)-DP for data sets differing in k records (group privacy; Dwork & Roth 2014, Vadhan 2017). The
noise is calibrated so that the *patient-level* figures meet the target; with one record per
patient (k = 1) this is plain record-level DP-SGD. The scaler and the noise scale aggregate each
patient's records before clipping, so they are patient-level mechanisms as they stand.

Budget (basic composition: the epsilons and the deltas of the parts are summed):
  scaler       cfg.dp_scaler_share (0 with public cfg.dp_bounds): per-dimension bounds from a DP
               centre and a DP spread, never the exact train minimum and maximum (`dp_bounds`)
  noise_scale  cfg.dp_noise_share: the decoder's per-dimension RMS reconstruction error (`dp_noise_scale`)
  sgd          the rest: DP-SGD, per patient by group privacy
delta defaults to 1 / (10 N), N the distinct patients trained on; a larger one is refused.

The mechanisms: a radius (`dp_quantile`, the exponential mechanism over a log scale, pure eps)
then a clipped sum with Gaussian noise (`dp_mean`, the analytic Gaussian mechanism, Balle & Wang
2018). Gaussian noise on a sum of vectors clipped in L2 norm costs the same for D dimensions as for
one; D per-dimension quantiles would compose D times, which small sites cannot afford.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.special import log_ndtr

from common.config import CvaeConfig

if TYPE_CHECKING:  # the generator imports this module
    from node.cvae.generator import CvaeResult

# The clip radius of a DP mean: RADIUS_FACTOR x a DP median of the patients' row norms. The median,
# not a high quantile: the exponential mechanism's chance of a radius far above every norm falls as
# exp(-eps (1 - q) P / 2), too slowly for q = 0.9 and a hundred patients. The factor keeps most rows
# unclipped (high-dimensional norms concentrate about their median).
RADIUS_QUANTILE = 0.5
RADIUS_FACTOR = 1.5
RADIUS_SHARE = 0.5  # of a DP mean's epsilon spent on its radius; the Gaussian sum gets the rest
LOG2_RANGE = (-20.0, 20.0)  # the radius search range, 1e-6 .. 1e6: public, wide enough for any embedding
# DP bounds = DP centre +- (BOUNDS_SDS DP standard deviations + CENTRE_SDS sds of the centre's own
# noise): the exact min and max of a few hundred Gaussian records lie about 3 sds out; 4 leaves room
# for heavier tails and a noisy spread, and the second term keeps a noisy centre's data inside.
BOUNDS_SDS = 4.0
CENTRE_SDS = 2.0
CENTRE_SHARE = (
    0.6  # of the scaler's budget spent on the centre (its noise widens every bound); the spread gets the rest
)
SEED_OFFSET = {"scaler": 7919, "noise_scale": 7927}  # generators of the DP noise, apart from Opacus' and the CVAE's


# ---------------------------------------------------------------- plan


def group_sizes(groups: np.ndarray) -> tuple[int, int]:
    """(distinct patients, the largest number of records of one patient) of patient ids [N]."""
    _, counts = np.unique(np.asarray(groups), return_counts=True)
    return int(len(counts)), int(counts.max()) if len(counts) else 0


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(eps, delta)-DP per record -> per group of k records: (k eps, k e^((k-1) eps) delta)."""
    return k * epsilon, k * math.exp((k - 1) * epsilon) * delta


@dataclass(frozen=True)
class DpPlan:
    """The budget of one DP CVAE, per patient unless named per record. Each part is (epsilon, delta)."""

    epsilon: float  # targets, all parts together
    delta: float
    n_patients: int  # distinct patients among the records trained on
    n_records: int
    k: int  # the most records of one patient among them
    scaler: tuple[float, float]  # (0, 0) with public bounds
    noise_scale: tuple[float, float]
    sgd: tuple[float, float]
    sgd_record: tuple[float, float]  # what the accountant is calibrated to: group_privacy(*sgd_record, k) == sgd


def plan_budget(cfg: CvaeConfig, groups: np.ndarray) -> DpPlan:
    """The budget split for patient ids [N] of the records DP-SGD trains on. Raises ValueError for a
    cfg.dp_delta above 1 / (10 N_patients)."""
    n_patients, k = group_sizes(groups)
    if n_patients == 0:
        raise ValueError("plan_budget: no records to train on")
    bound = 1.0 / (10 * n_patients)
    if cfg.dp_delta is not None and cfg.dp_delta > bound:
        raise ValueError(
            f"synth.cvae.dp_delta = {cfg.dp_delta:g} is above 1 / (10 N) = {bound:g} for the N = "
            f"{n_patients} patients trained on; set dp_delta to at most {bound:g}, or leave it null "
            "(the default, 1 / (10 N))"
        )
    eps, delta = cfg.dp_epsilon, cfg.dp_delta if cfg.dp_delta is not None else bound
    s_scaler = 0.0 if cfg.dp_bounds is not None else cfg.dp_scaler_share
    s_sgd = 1.0 - s_scaler - cfg.dp_noise_share
    eps_rec = s_sgd * eps / k
    delta_rec = s_sgd * delta / (k * math.exp((k - 1) * eps_rec))
    return DpPlan(
        epsilon=eps,
        delta=delta,
        n_patients=n_patients,
        n_records=int(len(groups)),
        k=k,
        scaler=(s_scaler * eps, s_scaler * delta),
        noise_scale=(cfg.dp_noise_share * eps, cfg.dp_noise_share * delta),
        sgd=(s_sgd * eps, s_sgd * delta),
        sgd_record=(eps_rec, delta_rec),
    )


# ---------------------------------------------------------------- mechanisms


def gaussian_sigma(epsilon: float, delta: float) -> float:
    """The smallest noise standard deviation, per unit of L2 sensitivity, at which the Gaussian
    mechanism is (epsilon, delta)-DP: the analytic Gaussian mechanism (Balle & Wang 2018, Theorem
    8), delta(s) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s), by bisection on log s."""

    def delta_of(s: float) -> float:
        return math.exp(log_ndtr(0.5 / s - epsilon * s)) - math.exp(epsilon + log_ndtr(-0.5 / s - epsilon * s))

    lo, hi = 1e-3, 1e3
    while delta_of(hi) > delta:
        hi *= 10
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def patient_means(v: torch.Tensor, groups: np.ndarray) -> torch.Tensor:
    """Rows v [N,D] averaged per patient (ids [N]): [P,D], one row per distinct patient. A patient
    then adds one row whatever its number of records: the sums below have patient-level sensitivity."""
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    idx = torch.from_numpy(inv.astype(np.int64))
    n = int(idx.max()) + 1 if len(idx) else 0
    sums = torch.zeros(n, v.shape[1], dtype=torch.float64).index_add_(0, idx, v.double())
    return sums / torch.bincount(idx, minlength=n).double()[:, None]


def dp_quantile(
    values: torch.Tensor,
    q: float,
    epsilon: float,
    gen: torch.Generator,
    *,
    log2_range: tuple[float, float] = LOG2_RANGE,
) -> float:
    """An epsilon-DP estimate of the q-quantile of positive values [P] (one per patient): the
    exponential mechanism over [2^lo, 2^hi] on a log scale (Smith 2011): a point t is drawn with
    density proportional to exp(epsilon/2 * -|#{values < t} - q P|), sensitivity 1 (P public)."""
    a, b = log2_range
    t = torch.sort(values.double().clamp(min=2.0**a, max=2.0**b).log2()).values
    edges = torch.cat([torch.tensor([a], dtype=torch.float64), t, torch.tensor([b], dtype=torch.float64)])
    length = edges[1:] - edges[:-1]  # interval i holds the points with i values below them
    utility = -(torch.arange(len(length), dtype=torch.float64) - q * len(values)).abs()
    logw = length.log() + 0.5 * epsilon * utility  # empty intervals: -inf, never drawn
    u = torch.rand(len(logw), generator=gen, dtype=torch.float64).clamp(1e-300, 1 - 1e-16)
    i = int(torch.argmax(logw - (-u.log()).log()))  # Gumbel-max: a draw from softmax(logw)
    frac = float(torch.rand(1, generator=gen, dtype=torch.float64))
    return float(2.0 ** (edges[i] + frac * length[i]))


def dp_mean(
    rows: torch.Tensor,
    epsilon: float,
    delta: float,
    gen: torch.Generator,
    *,
    log2_range: tuple[float, float] = LOG2_RANGE,
) -> tuple[torch.Tensor, dict]:
    """An (epsilon, delta)-DP mean [D] of rows [P,D], one per patient: a clip radius R by
    `dp_quantile` of the row norms (RADIUS_SHARE of epsilon), the rows clipped to L2 norm R, summed,
    Gaussian noise of sd sigma R added (the rest of epsilon, all of delta), divided by P (public).
    Also returns {"radius", "noise_sd"}: noise_sd is the noise's sd on each entry of the mean."""
    n = len(rows)
    radius = RADIUS_FACTOR * dp_quantile(
        rows.norm(dim=1), RADIUS_QUANTILE, RADIUS_SHARE * epsilon, gen, log2_range=log2_range
    )
    clipped = rows.double() * (radius / rows.double().norm(dim=1).clamp(min=1e-300)).clamp(max=1.0)[:, None]
    sd = gaussian_sigma((1 - RADIUS_SHARE) * epsilon, delta) * radius
    noisy = clipped.sum(0) + sd * torch.randn(rows.shape[1], generator=gen, dtype=torch.float64)
    return noisy / max(n, 1), {"radius": radius, "noise_sd": sd / max(n, 1)}


def shrunk_variance(v: torch.Tensor, noise_sd: float) -> torch.Tensor:
    """A positive per-dimension variance [D] from a DP estimate v [D] whose entries carry Gaussian
    noise of sd noise_sd (public): shrunk towards their mean over the dimensions by the share of
    their spread the noise explains (James-Stein; post-processing, free), then floored at the noise
    sd of that mean (a smaller variance cannot be told from zero, and a noisy one may be negative)."""
    m = v.mean()
    spread2 = float(((v - m) ** 2).mean())
    keep = max(0.0, 1.0 - noise_sd**2 / spread2) if spread2 > 0 else 0.0
    return (m + keep * (v - m)).clamp(min=max(noise_sd / math.sqrt(len(v)), 1e-24))


def dp_bounds(
    x: torch.Tensor,
    groups: np.ndarray,
    epsilon: float,
    delta: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Per-dimension scaler bounds lo [D], hi [D] of embeddings x [N,D] (patient ids [N]),
    (epsilon, delta)-DP per patient: centre = `dp_mean` of the patients' mean records (CENTRE_SHARE of
    the budget), spread = sqrt of the `shrunk_variance` of `dp_mean` of their mean squared deviations
    from that centre (the rest), bounds = centre -+ (BOUNDS_SDS spreads + CENTRE_SDS x the centre's
    noise sd). No bound is a train record's value.

    The centre's noise sd is sigma x radius / P per dimension, the radius about the norm of a record:
    where the embeddings share an offset much larger than their spread (a ReLU extractor's), or the
    patients are few, it dwarfs the spread and the bounds are wide; the info returned says by how
    much (`centre_noise_over_spread`), and public cfg.dp_bounds avoid it."""
    centre, c_info = dp_mean(patient_means(x, groups), CENTRE_SHARE * epsilon, CENTRE_SHARE * delta, gen)
    var, v_info = dp_mean(
        patient_means((x.double() - centre).pow(2), groups),
        (1 - CENTRE_SHARE) * epsilon,
        (1 - CENTRE_SHARE) * delta,
        gen,
    )
    sd = shrunk_variance(var, v_info["noise_sd"]).sqrt()
    half = BOUNDS_SDS * sd + CENTRE_SDS * c_info["noise_sd"]
    lo, hi = (centre - half).float(), (centre + half).float()
    return (
        lo,
        hi,
        {
            "mechanism": (
                f"per dimension: DP centre +- ({BOUNDS_SDS:g} DP standard deviations + {CENTRE_SDS:g} "
                "sds of the centre's noise) (node.cvae.dp.dp_bounds)"
            ),
            "centre_radius": c_info["radius"],
            "spread_radius": v_info["radius"],
            "centre_noise_over_spread": float(c_info["noise_sd"] / sd.median()),
        },
    )


def dp_noise_scale(
    sq_residuals: torch.Tensor, groups: np.ndarray, epsilon: float, delta: float, gen: torch.Generator
) -> tuple[torch.Tensor, dict]:
    """The decoder's per-dimension noise sd [D] in the scaled space, (epsilon, delta)-DP per patient:
    the root of `dp_mean` of the patients' mean squared residuals (sq_residuals [N,D], each in [0,1]:
    scaled records and decoder outputs both lie in [0,1], so a row norm is at most sqrt(D), a public
    cap on the radius search), capped at 1."""
    d = sq_residuals.shape[1]
    ms, info = dp_mean(
        patient_means(sq_residuals, groups), epsilon, delta, gen, log2_range=(LOG2_RANGE[0], 0.5 * math.log2(max(d, 1)))
    )
    sd = shrunk_variance(ms, info["noise_sd"]).sqrt().clamp(max=1.0).float()
    return sd, {
        "mechanism": "root of a DP mean of the patients' mean squared residuals (node.cvae.dp.dp_noise_scale)",
        "radius": info["radius"],
    }


# ---------------------------------------------------------------- report


def caveats(cfg: CvaeConfig, *, n_val: int) -> list[str]:
    """What the (epsilon, delta) of a DP CVAE does not cover, as sentences for the signed audit."""
    out = [
        "noise from torch's pseudo-random generator (Opacus secure_mode off), not a cryptographically secure one",
        "all DP noise is drawn from generators seeded by models.seed (default 0) for reproducible runs: whoever "
        "knows or guesses the seed can regenerate the noise, so the guarantee holds only while models.seed is secret "
        "and unguessable",
        "the mechanisms are analysed over the reals; floating-point effects (Mironov 2012) are not defended against",
        "patients are identified by the data's patient ids: records of one person under different ids count as "
        "different patients (without ids, every image is its own patient)",
        "the numbers of patients and records and the train class counts are used without DP (the sampling rate, "
        "delta, the DP means' normalisation, and the class counts of the sampled labels)",
    ]
    if cfg.dp_bounds is not None:
        out.append(
            f"the scaler bounds synth.cvae.dp_bounds {list(cfg.dp_bounds)} are assumed public (chosen without "
            "looking at the site's data)"
        )
    if n_val:
        out.append(
            f"early stopping: the stopping epoch and the restored weights depend on the {n_val} validation "
            "records, which DP-SGD never sees and epsilon does not cover"
        )
    return out


def report(
    plan: DpPlan,
    cfg: CvaeConfig,
    *,
    sgd_record_epsilon: float,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    n_val: int,
    scaler: dict,
    noise_scale: dict,
) -> dict:
    """The "dp" block of a DP CVAE (model sidecar info["dp"], synth.json "dp"): what was spent, per
    patient, by which parts, and what it does not cover. Returns it with the totals under
    "epsilon" and "delta"."""
    eps_sgd, delta_sgd = group_privacy(sgd_record_epsilon, plan.sgd_record[1], plan.k)
    epsilon = plan.scaler[0] + plan.noise_scale[0] + eps_sgd
    delta = plan.scaler[1] + plan.noise_scale[1] + delta_sgd
    return {
        "enabled": True,
        "epsilon": epsilon,
        "delta": delta,
        "unit": "patient",
        "target": {"epsilon": plan.epsilon, "delta": plan.delta},
        "n_patients": plan.n_patients,
        "n_records": plan.n_records,
        "group_size_k": plan.k,
        "adjacency": "add or remove one patient with all their records",
        "per_patient": (
            "group privacy: DP-SGD's record-level (eps, delta) from the accountant becomes (k eps, "
            "k exp((k-1) eps) delta) per patient, k the most records of one patient; the scaler and the "
            "noise scale clip per-patient means, patient-level as they stand"
        ),
        "accountant": "prv",
        "composition": "basic: the epsilons and the deltas of scaler, noise_scale and sgd are summed",
        "budget": {
            "scaler": {"epsilon": plan.scaler[0], "delta": plan.scaler[1], **scaler},
            "noise_scale": {"epsilon": plan.noise_scale[0], "delta": plan.noise_scale[1], **noise_scale},
            "sgd": {
                "epsilon": eps_sgd,
                "delta": delta_sgd,
                "epsilon_per_record": sgd_record_epsilon,
                "delta_per_record": plan.sgd_record[1],
                "noise_multiplier": noise_multiplier,
                "sample_rate": sample_rate,
                "max_grad_norm": cfg.dp_max_grad_norm,
                "steps": steps,
            },
        },
        "caveats": caveats(cfg, n_val=n_val),
    }


def dp_block(result: CvaeResult) -> dict:
    """The "dp" block synth.json carries into the audit: the model's info["dp"], {"enabled": False}
    without dp. A model from before per-patient accounting says its unit is the record."""
    dp = result.info.get("dp")
    if isinstance(dp, dict):
        return dp
    if result.epsilon is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "epsilon": result.epsilon,
        "delta": result.delta,
        "unit": "record",
        "caveats": list(result.info.get("dp_caveats", []))
        + [
            "trained before per-patient accounting: epsilon is per image, not per patient, and the scaler and "
            "the noise scale are not DP; retrain (`plan-node train --force`)"
        ],
    }
