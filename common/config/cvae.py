"""The CVAE route's settings: the generator (CvaeConfig) and the pinned feature extractor."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.config.base import _Strict


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
