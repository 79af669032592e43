"""Typed configuration: `site.yaml` (one per hospital) and `federation.yaml` (the coordinator's).

Every default lives here, once. Loading rejects unknown keys and wrong types with a message that
names the file, the field and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common import errors

_M = TypeVar("_M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid; the message says where and why."""

    exit_code = errors.CONFIG


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- site


class PhantomConfig(_Strict):
    """The built-in procedural "phantom clinic": several images per patient."""

    # Many patients of few images each: the audit's figures are statistics over holdout
    # *patients*, and 15 holdout patients (60 x 6 before) leave intervals too wide to pass a gate
    # that judges their upper ends.
    n_patients: int = Field(300, ge=3)
    images_per_patient: int = Field(2, ge=1)
    n_classes: int = Field(2, ge=2, le=10)
    seed: int = 0


class SplitConfig(_Strict):
    """Patient-level split fractions; whatever is left after train and holdout is test."""

    train: float = Field(0.5, gt=0, lt=1)
    holdout: float = Field(0.25, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _leaves_a_test_split(self) -> "SplitConfig":
        if self.train + self.holdout >= 1:
            raise ValueError(f"train + holdout must be < 1 to leave a test split, got {self.train + self.holdout}")
        return self


class DataConfig(_Strict):
    source: Literal["phantom", "npz", "folder", "csv"] = "phantom"
    path: Path | None = Field(None, description="the .npz file, image folder or CSV manifest; relative to site.yaml")
    image_size: int = Field(32, ge=8, le=256, description="every image is resized to image_size x image_size, grey")
    max_images: int | None = Field(None, ge=1, description="cap for quick runs; taken deterministically")
    n_classes: int | None = Field(
        None,
        ge=2,
        description=(
            "the federation's class count (set by its site kit): ingest refuses a label outside 0..n_classes-1, "
            "and the site's models have this many classes even when its own data lacks some. None: the data's own"
        ),
    )
    class_names: list[str] | None = Field(
        None, description="the federation's class names, label 0 first (set by its site kit)"
    )
    phantom: PhantomConfig = PhantomConfig()
    split: SplitConfig = SplitConfig()

    @model_validator(mode="after")
    def _path_when_needed(self) -> "DataConfig":
        if self.source != "phantom" and self.path is None:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        _check_class_names(self.class_names, self.n_classes, "data")
        return self


def _check_class_names(names: list[str] | None, n_classes: int | None, where: str) -> None:
    if names is not None and len(names) != n_classes:
        raise ValueError(f"{where}.class_names has {len(names)} names but {where}.n_classes is {n_classes}")


class GanConfig(_Strict):
    z_dim: int = Field(64, ge=1)
    w_dim: int = Field(64, ge=1)
    mapping_layers: int = Field(2, ge=1)
    channels: int = Field(64, ge=4, description="feature maps at 4x4; halves as resolution doubles, at least 16")
    steps: int = Field(600, ge=1, description="~30 s on 2 CPU cores at 32x32")
    batch_size: int = Field(16, ge=2)
    lr: float = Field(2e-3, gt=0)
    r1_gamma: float = Field(0.1, ge=0)
    ema_beta: float = Field(0.99, ge=0, lt=1)
    checkpoint_every: int = Field(500, ge=1)


class ClassifierConfig(_Strict):
    """phi_id, phi_class and the audit's independent re-identification attacker."""

    width: int = Field(8, ge=4, description="phi_id and phi_class")
    attacker_width: int = Field(12, ge=4, description="the attacker: another width and seed than phi_id")
    epochs: int = Field(30, ge=1, description="phi_class")
    id_epochs: int = Field(
        100,
        ge=1,
        description=(
            "phi_id and the attacker: under strong augmentation a 400-identity phi_id reached 69% train "
            "accuracy in 100 epochs and 22% in 30 (pneumoniamnist, 32x32, ~10 s on 2 CPU cores)"
        ),
    )
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    id_augment: Literal["light", "strong"] = Field(
        "strong",
        description=(
            "augmentation of the two re-identification networks (phi_id, the attacker): strong teaches them "
            "a patient under larger shifts, rotations, contrast changes, noise and occlusion; phi_class "
            "always trains with light"
        ),
    )


class ModelsConfig(_Strict):
    seed: int = Field(0, description="initialisation and training randomness")
    gan: GanConfig = GanConfig()
    classifier: ClassifierConfig = ClassifierConfig()


class WalkConfig(_Strict):
    """The PLAN objective (docs/DESIGN.md 3.3) and its optimiser."""

    method: Literal["plan", "linear"] = "plan"
    points: int = Field(14, ge=3, description="codes per path, endpoints included; the interior ones are rendered")
    iters: int = Field(60, ge=1)
    lr: float = Field(0.1, gt=0)
    weight_identity: float = Field(
        10.0,
        ge=0,
        description=(
            "0.1 (the first design's) is the paper's weight for StyleGAN2's 512-dim W; on this 64-dim W it left the "
            "independent attacker no further from the train set than the straight line (bench/path_safety.py)"
        ),
    )
    weight_smooth: float = Field(1.0, ge=0)
    weight_class: float = Field(1.0, ge=0)


class CvaeConfig(_Strict):
    """The CVAE route's generator (Di Salvo et al., BMVC 2024): a conditional VAE on embeddings."""

    latent_dim: int = Field(50, ge=1, description="the paper's latent size")
    hidden: int = Field(256, ge=1, description="width of the encoder's and the decoder's one hidden layer")
    beta: float = Field(0.1, ge=0, description="weight of the KL term against the summed squared error")
    lr: float = Field(1e-3, gt=0, description="Adam")
    batch_size: int | None = Field(
        None,
        ge=1,
        description=(
            "None: the paper's 512, at most an eighth of the train records (at least 16), so that an epoch takes ~8 "
            "optimiser steps or more; 512 on a few hundred records is one step per epoch and the CVAE underfits. "
            "With dp: the expected size of a Poisson-sampled batch"
        ),
    )
    max_epochs: int = Field(200, ge=1, description="with dp: also the number of epochs the noise is calibrated for")
    patience: int = Field(
        20, ge=1, description="early stopping: epochs without a lower validation loss before stopping"
    )
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of train (stratified by class) held out for early stopping"
    )
    dp: bool = Field(False, description="train with DP-SGD (Opacus): per-sample clipping and Gaussian noise")
    dp_epsilon: float = Field(
        10,
        gt=0,
        description=(
            "with dp: the total epsilon per patient (all of a patient's records), over max_epochs: the DP scaler, the "
            "DP noise scale and DP-SGD together (basic composition; node.cvae.dp)"
        ),
    )
    dp_delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=(
            "with dp: the total delta per patient; None: 1 / (10 N), N the distinct patients among the records trained "
            "on. A value above 1 / (10 N) is refused: a delta near 1/N allows a mechanism that releases one patient's "
            "records outright"
        ),
    )
    dp_bounds: list[float] | None = Field(
        None,
        description=(
            "with dp: public bounds [lo, hi] of every embedding dimension, in embedding units, chosen without "
            "looking at the site's data; records are clipped into them before training and samples stay inside "
            "them. None: per-dimension bounds are estimated with DP from the train records (a DP centre +- "
            "4 DP standard deviations and twice the centre's noise; dp_scaler_share of the budget), never the "
            "exact train minimum and maximum. Few patients, or embeddings with a large common offset, make DP "
            "bounds wide (models/cvae.json, info.scaler.centre_noise_over_spread); public bounds cost no budget"
        ),
    )
    dp_scaler_share: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        description=("with dp and no dp_bounds: the share of dp_epsilon and dp_delta spent on the DP scaler bounds"),
    )
    dp_noise_share: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description=(
            "with dp: the share of dp_epsilon and dp_delta spent on the decoder's DP noise scale (the per-dimension "
            "RMS reconstruction error, from clipped per-patient means with Gaussian noise); DP-SGD gets the rest"
        ),
    )
    dp_max_grad_norm: float = Field(1.0, gt=0, description="with dp: per-sample gradient clipping norm")
    dp_early_stopping: bool = Field(
        False,
        description=(
            "with dp: stop early on a validation split as without dp. Off by default: the stopping epoch and the "
            "restored best weights depend on the validation records outside the DP accounting, so with it off dp "
            "trains on every train record for exactly max_epochs and epsilon covers all of them"
        ),
    )
    sample: Literal["replicate", "target"] = Field(
        "replicate",
        description=(
            "how many synthetic embeddings of each class: replicate the train class counts, or synth.target_size "
            "in the train class proportions"
        ),
    )
    sample_noise: bool = Field(
        True,
        description=(
            "sample from the decoder's likelihood: decoded z plus Gaussian noise of the per-dimension RMS "
            "reconstruction error on train (node.cvae.generator.residual_rms; with dp a DP estimate), clipped to the "
            "scaler's range (the train range; with dp the DP or public bounds). Off: the decoded means "
            "alone, which vary only along the few latent dimensions that stay active and underrepresent the "
            "within-class spread"
        ),
    )
    federated: bool = Field(
        False,
        description=(
            "train the CVAE across the federation (FedAvg of the decoders only; the site kit sets it from the "
            "federation's cvae_federated): the local CVAE is the starting point, and synthesize samples from the "
            "federation's decoder (models/cvae_global). With dp, the federated rounds are the whole DP plan: the local "
            "CVAE is not pre-trained, the noise is calibrated for every round's epochs, and the epsilon spent over all "
            "rounds is reported"
        ),
    )

    @model_validator(mode="after")
    def _dp_bounds_are_an_interval(self) -> "CvaeConfig":
        b = self.dp_bounds
        if b is not None and (len(b) != 2 or not b[0] < b[1]):
            raise ValueError(f"synth.cvae.dp_bounds must be [lo, hi] with lo < hi, got {b}")
        return self


# embedding length per extractor architecture (node.cvae.embedder builds them; the coordinator only
# needs the length, to build the downstream head it aggregates)
EXTRACTOR_DIMS = {"tiny": 128, "dinov2_vits14": 384, "dinov2_vitb14": 768, "resnet18": 512, "resnet50": 2048}


class ExtractorConfig(_Strict):
    """The CVAE route's frozen feature extractor. Pinned federation-wide: embeddings from different
    networks live in different spaces, so every site must embed with the same weights."""

    arch: Literal["tiny", "dinov2_vits14", "dinov2_vitb14", "resnet18", "resnet50"] = Field(
        "tiny",
        description=(
            "tiny: a small seeded random-init CNN, no weight file (tests, demo); the others are pretrained "
            "backbones read from the local model store"
        ),
    )
    weights: str | None = Field(
        None, description="weight file name in the local model store; required for every arch but tiny"
    )
    sha256: str | None = Field(None, description="the weight file's sha256, all 64 hex digits; required with weights")
    seed: int = Field(0, description="tiny only: the seed its weights are drawn from")

    @property
    def dim(self) -> int:
        """D, the length of an embedding (what the federation's downstream head takes)."""
        return EXTRACTOR_DIMS[self.arch]

    @model_validator(mode="after")
    def _weights_pinned(self) -> "ExtractorConfig":
        if self.arch == "tiny":
            if self.weights is not None or self.sha256 is not None:
                raise ValueError(
                    "extractor.weights and extractor.sha256 must be unset for arch 'tiny' (it has no weight file)"
                )
            return self
        if not self.weights:
            raise ValueError(
                f"extractor.weights is required for arch {self.arch!r}: the file name in the local model store"
            )
        if (
            self.sha256 is None
            or len(self.sha256) != 64
            or any(c not in "0123456789abcdef" for c in self.sha256.lower())
        ):
            raise ValueError(
                f"extractor.sha256 must be the weight file's full sha256 (64 hex digits) for arch {self.arch!r}, "
                f"got {self.sha256!r}"
            )
        return self


class SynthConfig(_Strict):
    route: Literal["plan", "cvae"] = "plan"
    k: int = Field(5, ge=1, description="k-same: patients whose mean codes are averaged into one anchor")
    target_size: int = Field(240, ge=1, description="synthetic images to generate before the audit")
    invert_steps: int = Field(80, ge=1)
    invert_lr: float = Field(0.1, gt=0)
    invert_perceptual: float = Field(
        0.05,
        ge=0,
        description=(
            "weight of the phi_class feature term in inversion; pixels alone kept the class of only ~76% of "
            "pneumoniamnist reconstructions, 0.05 kept all at +17% pixel error"
        ),
    )
    walk: WalkConfig = WalkConfig()
    cvae: CvaeConfig = CvaeConfig()
    extractor: ExtractorConfig = Field(
        ExtractorConfig(),
        description=(
            "CVAE route: the federation's pinned feature extractor (a site kit sets it); "
            "embeddings of another network are refused"
        ),
    )
    seed: int = 0


class PolicyConfig(_Strict):
    """Release gate. Per-sample filters first, then set-level checks; all must pass to publish."""

    # per sample: mean squared error on [0,1] pixels to the nearest train image. On the phantom
    # no real non-member image comes closer than 0.005 to a train image; a copy with sensor
    # noise is at ~1e-4.
    min_pixel_distance: float = Field(0.003, ge=0)
    # Per sample, the copy detector (node.audit.copies): in each of its spaces a candidate is dropped
    # when its distance to the nearest train image, minimised over shifts, flips, rotations and
    # zooms, is below the point that this share of real non-members (the holdout's calibration
    # half) fall below; the independent attacker's re-identification drop uses 1 - copy_fpr.
    # 0.02 a space, with four or five spaces, keeps about 90% of candidates that look like
    # fresh patients: a release budget fixed before any copy was planted, not fitted to them.
    # 0 turns the detector off (experiments only: a federation floor above 0 overrides it).
    copy_fpr: float = Field(0.02, ge=0, lt=0.5)
    # Every set-level estimate below is judged at the unfavourable end of its 95% bootstrap
    # interval (patients resampled), measured on the holdout's evaluation half. The defaults are
    # what sets of real images no model saw pass on pneumoniamnist and breastmnist at 800 images a
    # site (~100 evaluation images; BENCHMARKS.md, "Release gate"): there, the worst of five
    # attacks' upper bounds reaches 0.58-0.63 for such a set, so 0.6 would refuse genuine
    # non-members. A site with a larger holdout narrows the intervals and can afford 0.6.
    # Black-box membership attack on the accepted set, worst attack and space; also bounds the
    # two-sided figure (0.5 + the largest |AUC - 0.5| an outsider could use).
    max_mia_auc: float = Field(0.65, ge=0, le=1)
    # The same sets' attacker re-identification rate: 0.05 expected, upper bounds up to 0.12.
    max_reid_rate: float = Field(
        0.15,
        ge=0,
        le=1,
        description=(
            "share of accepted samples the independent attacker re-identifies (above the 95th percentile of its "
            "scores on real non-members, so 0.05 is what a set unrelated to the train patients scores)"
        ),
    )
    max_closer_to_train: float = Field(
        0.75,
        ge=0,
        le=1,
        description=("share of samples nearer train than holdout, in the spaces an outsider could use (not phi_id's)"),
    )
    min_accepted: int = Field(20, ge=1, description="publish nothing smaller (distinct images)")
    # Black-box attack's true-positive rate at 1% false positives, worst space: the share of
    # members an attacker singles out almost without error.
    max_tpr_at_low_fpr: float = Field(0.2, ge=0, le=1)
    # Mean LPIPS of the accepted set to its nearest train image (mmL); 0 turns it off. A value
    # above 0 needs the LPIPS backbone in the model store, else the check fails as not evaluated.
    min_mmL: float = Field(0.0, ge=0)
    # Differential privacy budget, checked only where the synthesis declares an epsilon (the
    # PLAN route declares none); None: no limit.
    max_dp_epsilon: float | None = Field(None, gt=0)
    # CVAE route, per sample, in place of min_pixel_distance: the distance of a synthetic embedding
    # to its nearest train record, relative to the median of the same distance for real holdout
    # records (non-members), in the train-standardised embedding space.
    min_embedding_distance_ratio: float = Field(0.5, ge=0)
    # Failed audits on the same training data before another needs a new synth.seed and a note
    # (node.site.attempts): a gate retried until it passes is no gate.
    max_attempts: int = Field(3, ge=1)

    def stricter(self, floor: "PolicyConfig") -> "PolicyConfig":
        """This policy tightened so that it is at least as strict as `floor` (the federation's):
        per field, the stricter value by POLICY_BOUNDS' direction (None, no limit, never wins)."""
        values = {}
        for name, (kind, _) in POLICY_BOUNDS.items():
            limits = [v for v in (getattr(self, name), getattr(floor, name)) if v is not None]
            values[name] = (min if kind == "max" else max)(limits, default=None)
        return PolicyConfig(**values)


# Every PolicyConfig field once: "max" (a lower value is stricter) or "min" (a higher one is), and
# the audit figures it bounds (common/policy.evaluate). copy_fpr and max_attempts bound how the
# audit runs, not a figure it reports.
POLICY_BOUNDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "max_mia_auc": ("max", ("mia_auc_upper", "mia_auc_two_sided_upper")),
    "max_tpr_at_low_fpr": ("max", ("tpr_at_low_fpr_upper",)),
    "max_reid_rate": ("max", ("reid_rate_upper",)),
    "max_closer_to_train": ("max", ("closer_to_train_upper",)),
    "min_accepted": ("min", ("n_accepted",)),
    "min_pixel_distance": ("min", ("min_pixel_mse_to_train",)),  # images only
    "min_embedding_distance_ratio": ("min", ("min_embedding_distance_ratio",)),  # embeddings only
    "min_mmL": ("min", ("mmL",)),  # when above 0
    "max_dp_epsilon": ("max", ("dp_epsilon",)),  # when set and the synthesis declares an epsilon
    "copy_fpr": ("min", ()),
    "max_attempts": ("max", ()),
}


class CoordinatorAddress(_Strict):
    exchange: str = Field("127.0.0.1:50051", description="host:port of the bundle exchange (gRPC, TLS)")
    superlink: str = Field("127.0.0.1:9092", description="host:port SuperNodes connect to (Fleet API)")
    ca_cert: Path = Field(Path("keys/ca.crt"), description="the federation CA; relative to the site directory")
    client_cert: Path = Field(
        Path("keys/client.crt"), description="this site's certificate for mutual TLS (from the site kit)"
    )
    client_key: Path = Field(Path("keys/client.key"), description="its private key, mode 0600 (from the site kit)")
    coordinator_pub: Path = Field(
        Path("keys/coordinator.pub"), description="verifies the trust store the coordinator publishes"
    )
    federation: str | None = Field(
        None,
        description=(
            "the federation this site joined (from the site kit); trust documents signed for another are refused"
        ),
    )
    supernode_port: int = Field(9094, ge=1, le=65535, description="local port this site's SuperNode binds")
    timeout_s: float = Field(60, gt=0, description="seconds per exchange call (upload, list, download)")
    max_bundle_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="larger bundles are not downloaded or extracted"
    )


class SiteConfig(_Strict):
    name: str = Field("site", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="auto (a CUDA GPU when there is one), cpu, cuda or cuda:N (the N-th GPU)",
    )
    data: DataConfig = DataConfig()
    models: ModelsConfig = ModelsConfig()
    synth: SynthConfig = SynthConfig()
    policy: PolicyConfig = PolicyConfig()
    coordinator: CoordinatorAddress = CoordinatorAddress()


# Size profiles: presets that `plan-node init --profile` writes into site.yaml, where each value
# stays visible and editable. "cpu" is the defaults above: a model that trains in about a minute
# on 2 CPU cores (tests, the demo). "gpu" is for a site with a CUDA GPU and a few hundred to a few
# thousand images: StyleGAN2-ADA's small-data settings scaled to grey images (w_dim 256, R1 and
# lr of its "auto" config), the PLAN reference's 500 walk steps.
PROFILES: dict[str, dict] = {
    "cpu": {},
    "gpu": {
        "device": "cuda",
        "models": {
            "gan": {
                "z_dim": 256,
                "w_dim": 256,
                "mapping_layers": 4,
                "channels": 256,
                "steps": 20000,
                "batch_size": 32,
                "lr": 2.5e-3,
                "r1_gamma": 0.1,
                "ema_beta": 0.999,
                "checkpoint_every": 1000,
            },
            "classifier": {"width": 32, "attacker_width": 48, "epochs": 100, "id_epochs": 300, "batch_size": 128},
        },
        "synth": {"invert_steps": 500, "target_size": 2000, "walk": {"iters": 500}},
    },
}


def deep_merge(base: dict, over: dict) -> dict:
    """`base` with `over` on top, nested dicts merged key by key (neither is modified)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def profile_site_config(profile: str, **fields) -> SiteConfig:
    """SiteConfig with the preset `profile` ("cpu" or "gpu"), then `fields` (nested dicts) on top."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    return SiteConfig(**deep_merge(PROFILES[profile], fields))


# ---------------------------------------------------------------- federation


class DownstreamConfig(_Strict):
    """The classifier every site trains on pooled synthetic data; the same on both sides."""

    width: int = Field(32, ge=4)
    rounds: int = Field(3, ge=1)
    local_epochs: int = Field(2, ge=1)
    min_local_steps: int = Field(
        100,
        ge=0,
        description=(
            "a site trains local_epochs epochs a round, or more when those are fewer optimiser steps than this: "
            "a site's 240 images at batch 16 are 15 steps an epoch, and 6 epochs left the model at the majority class"
        ),
    )
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(16, ge=1, description="180 train images: 64 gave too few steps in 6 epochs to learn")
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0, description="FedProx only: weight of (mu/2)||w - w_global||^2")
    head_hidden: int = Field(
        0, ge=0, description="CVAE route: the head on embeddings; 0 is a linear probe, more a one-hidden-layer MLP"
    )
    train_on: Literal["pool", "pool+real"] = Field(
        "pool", description="what each site trains on: the verified pool, or the pool plus its own real train split"
    )
    baselines: bool = Field(
        True,
        description=(
            "after the run, FedAvg on each site's real train data (classic federated learning) by the same "
            "machinery; every site also reports its local-only model (its real data alone) with each evaluation"
        ),
    )


class FederationConfig(_Strict):
    name: str = Field("federation", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    route: Literal["plan", "cvae"] = Field(
        "plan",
        description=(
            "what the sites share and the federation trains on: "
            "PLAN images (a CNN), or CVAE embeddings (a head on embeddings)"
        ),
    )
    image_size: int = Field(32, ge=8, le=256)
    n_classes: int = Field(
        2, ge=2, description="the federation's classes: kits carry them, ingest and the exchange refuse labels outside"
    )
    class_names: list[str] | None = Field(None, description="their names, label 0 first (for reports); None: unnamed")
    quorum: int = Field(2, ge=1, description="sites with a bundle in the pool before the run starts")
    # SuperNodes online before the run starts, and the fewest a round may train with; None: quorum.
    # A site whose own set failed its gate still trains on the others' pooled data.
    min_nodes: int | None = Field(None, ge=1)

    # Once the run started, the fewest SuperNodes a round proceeds with: a site that drops out
    # mid-run is left behind rather than stalling every later round. None: the quorum.
    min_round_nodes: int | None = Field(None, ge=1)
    round_timeout_s: float = Field(
        600, gt=0, description="how long a round waits for a site's reply before going on without it"
    )

    @property
    def nodes_needed(self) -> int:
        return self.min_nodes if self.min_nodes is not None else self.quorum

    @property
    def round_nodes_needed(self) -> int:
        return self.min_round_nodes if self.min_round_nodes is not None else min(self.quorum, self.nodes_needed)

    public_host: str | None = Field(
        None,
        description=(
            "the name or IP sites dial (site kits' default addresses); the server certificate must cover it "
            "(`plan-server init --host` or `plan-server ca init --host`). None: exchange_host"
        ),
    )
    exchange_host: str = Field("127.0.0.1", description="where the exchange listens (0.0.0.0: every interface)")
    exchange_port: int = Field(50051, ge=1, le=65535)
    superlink_host: str = Field("127.0.0.1", description="where the Fleet gateway listens: the address SuperNodes dial")
    superlink_port: int = Field(
        9092,
        ge=1,
        le=65535,
        description=(
            "the Fleet gateway's HTTPS port (server/fleet_gateway.py): "
            "it passes only registered SuperNodes' Fleet calls"
        ),
    )
    superlink_internal_port: int = Field(
        9093,
        ge=1,
        le=65535,
        description=(
            "the SuperLink itself, on 127.0.0.1 only: "
            "the operator's flwr CLI (Control API), the ServerApp and the gateway"
        ),
    )
    fleet_max_body_bytes: int = Field(
        256 * 1024**2, ge=1024, description="the largest Fleet request the gateway forwards"
    )
    run_timeout_s: float = Field(1800, gt=0, description="a Flower run that takes longer is reported as failed")
    trust_document_ttl_s: float = Field(
        86400,
        ge=60,
        description=(
            "how long a signed trust document is valid; the exchange signs a fresh one on every request, "
            "so this bounds how long a captured old one can be replayed to a site that has not seen a newer one"
        ),
    )
    max_bundle_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    site_quota_bytes: int = Field(
        4 * 1024**3, ge=1024, description="bytes of bundles the pool keeps per site; an upload beyond is refused"
    )
    exchange_call_timeout_s: float = Field(
        600,
        gt=0,
        description=(
            "the exchange cancels an upload or download still running after this many seconds, "
            "whatever the client asked"
        ),
    )
    exchange_idle_timeout_s: float = Field(
        60, gt=0, description=("the exchange cancels an upload or download that moved no data for this many seconds")
    )
    exchange_calls_per_site: int = Field(
        4, ge=1, description=("calls one site may have in progress at the exchange at once, of them one upload")
    )
    policy: PolicyConfig = PolicyConfig()  # the floor every site's gate must meet
    downstream: DownstreamConfig = DownstreamConfig()
    extractor: ExtractorConfig = ExtractorConfig()  # the CVAE route's; every site must embed with the same network
    cvae_federated: bool = Field(
        False,
        description=(
            "CVAE route: train the sites' CVAEs together first (Di Salvo et al., MICCAI 2025): a Flower run of FedAvg "
            "over the decoders only, each site's encoder stays local; every site then samples from the federation's "
            "decoder, audits and publishes, and the downstream run follows as usual"
        ),
    )
    cvae_rounds: int = Field(5, ge=1, description="cvae_federated: FedAvg rounds of the CVAE run")
    cvae_local_epochs: int = Field(20, ge=1, description="cvae_federated: epochs each site trains its CVAE per round")

    @model_validator(mode="after")
    def _class_names_fit(self) -> "FederationConfig":
        _check_class_names(self.class_names, self.n_classes, "federation")
        return self


# ---------------------------------------------------------------- loading


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key")
        else:
            got = e.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {field}: {e['msg']}{got_text}")
    return "\n".join(lines)


def _load(path: Path, model: type[_M]) -> _M:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(path, e)) from None


def load_site_config(path: Path) -> SiteConfig:
    """Read and validate a `site.yaml`. Relative data paths are resolved against its folder."""
    cfg = _load(Path(path), SiteConfig)
    if cfg.data.path is not None and not cfg.data.path.is_absolute():
        cfg.data.path = (Path(path).parent / cfg.data.path).resolve()
    return cfg


def load_federation_config(path: Path) -> FederationConfig:
    return _load(Path(path), FederationConfig)


def dump_yaml(model: BaseModel) -> str:
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)


def commented_yaml(model: BaseModel, *, title: str) -> str:
    """YAML of `model` with each field's description as a comment above it (for `init` commands)."""
    lines = [f"# {title}", "# Every key is optional; the values below are the defaults unless set by init."]

    def emit(m: BaseModel, indent: int) -> None:
        pad = "  " * indent
        for name, field in type(m).model_fields.items():
            value = getattr(m, name)
            if field.description:
                lines.append(f"{pad}# {field.description}")
            if isinstance(value, BaseModel):
                doc = (type(value).__doc__ or "").strip().splitlines()
                if doc and not field.description:
                    lines.append(f"{pad}# {doc[0]}")
                lines.append(f"{pad}{name}:")
                emit(value, indent + 1)
            else:
                dumped = yaml.safe_dump(
                    {name: value if not isinstance(value, Path) else str(value)}, default_flow_style=True, width=10_000
                )
                lines.append(f"{pad}{dumped.strip()[1:-1]}")

    emit(model, 0)
    return "\n".join(lines) + "\n"
