"""`site.yaml`, one per hospital: data, models, synthesis, policy, the coordinator's address, and
the cpu and gpu profiles."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from common.config.base import ConfigError, _check_class_names, _load, _Strict, deep_merge
from common.config.cvae import CvaeConfig, ExtractorConfig
from common.config.federation import DownstreamConfig
from common.config.policy import PolicyConfig


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
    sampling: Literal["uniform", "balanced"] = Field(
        "balanced",
        description=(
            "how D's real batches draw the train images: balanced (every class the same share), so that an "
            "unconditional G renders a minority class as well as the majority, or uniformly. Balanced was chosen "
            "on validation over the evaluation's twelve sites (bench/gan_balance.py: validation balanced accuracy "
            "0.685 against 0.662, sets publishing on as many sites)"
        ),
    )


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
    class_weighting: Literal["none", "balanced"] = Field(
        "balanced",
        description=(
            "phi_class's loss per class: balanced (every class the same total weight), so that the walk's class term "
            "and the inversion's class features know a minority class, or none. Balanced was chosen on validation "
            "over the evaluation's twelve sites (bench/phi_class_balance.py: validation balanced accuracy 0.698 "
            "against 0.685, sets publishing on as many sites)"
        ),
    )
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
    points: int = Field(
        8,
        ge=3,
        description=(
            "codes per path, endpoints included; the interior ones are rendered. With synth.target_size fixed, fewer "
            "points mean more distinct anchor pairs; 8 was chosen on the privacy-utility frontier on validation "
            "splits (bench/frontier.py)"
        ),
    )
    iters: int = Field(60, ge=1)
    lr: float = Field(0.1, gt=0)
    weight_identity: float = Field(
        0.3,
        ge=0,
        description=(
            "chosen on the privacy-utility frontier on validation splits at the downstream lr 2.5e-4 "
            "(bench/frontier.py, weights 0.3 to 10: every set passed the gate, 0.3 taught the most); the release "
            "gate, not this weight, is what keeps a set that sits too close to the train set from leaving"
        ),
    )
    weight_smooth: float = Field(1.0, ge=0)
    weight_class: float = Field(1.0, ge=0)
    class_shift: float = Field(
        0.0,
        ge=0,
        le=0.25,
        description=(
            "a share of the image side: the class term averages phi_class's loss over each image and its copies "
            "moved this far right, left, down and up (whole pixels), so the walk cannot keep a path in its class "
            "with a pattern only phi_class reads; 0: the image alone"
        ),
    )


class SynthConfig(_Strict):
    route: Literal["plan", "cvae"] = "plan"
    k: int = Field(
        8,
        ge=1,
        description=(
            "k-same: patients whose mean codes are averaged into one anchor; 8 was chosen over 3 and 5 by "
            "bench/ksame.py on validation at the evaluation's site sizes (~130-200 train images, 6 sites): the "
            "only k whose sets passed the gate on 2 sites, at a validation balanced accuracy within 0.01 of the "
            "best (3 had been chosen on one 400-image site per data set); 2 was not tried, an anchor of two "
            "patients being half of each"
        ),
    )
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
    pull_every_s: float = Field(
        10, gt=0, description="seconds between pulls of the pool while `plan-node start` runs the SuperNode"
    )
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
    downstream: DownstreamConfig = Field(
        DownstreamConfig(),
        description=(
            "the federation's downstream training (from the site kit); the site trains its local-only "
            "yardstick with these settings before it joins, and the federation's rounds use the coordinator's"
        ),
    )


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


def profile_site_config(profile: str, **fields) -> SiteConfig:
    """SiteConfig with the preset `profile` ("cpu" or "gpu"), then `fields` (nested dicts) on top."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    return SiteConfig(**deep_merge(PROFILES[profile], fields))


def load_site_config(path: Path) -> SiteConfig:
    """Read and validate a `site.yaml`. Relative data paths are resolved against its folder."""
    cfg = _load(Path(path), SiteConfig)
    if cfg.data.path is not None and not cfg.data.path.is_absolute():
        cfg.data.path = (Path(path).parent / cfg.data.path).resolve()
    return cfg
