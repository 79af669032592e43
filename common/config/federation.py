"""`federation.yaml`, the coordinator's: the federation's data, route, quorum, policy floor and
the downstream training every site runs."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from common.config.base import _check_class_names, _load, _Strict
from common.config.cvae import ExtractorConfig
from common.config.policy import PolicyConfig


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
    lr: float = Field(
        2.5e-4,
        gt=0,
        description=(
            "Adam's step size; chosen on validation by bench/lr.py: at 2e-3 one seed in five of a site's model "
            "could stay at chance for the whole schedule"
        ),
    )
    head_lr: float = Field(
        4e-3,
        gt=0,
        description=(
            "CVAE route: Adam's step size for the head on embeddings (lr is the image CNN's); chosen on "
            "validation by bench/lr.py --route cvae: at the CNN's 2.5e-4 the head stays under-trained"
        ),
    )
    batch_size: int = Field(16, ge=1, description="180 train images: 64 gave too few steps in 6 epochs to learn")
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0, description="FedProx only: weight of (mu/2)||w - w_global||^2")
    head_hidden: int = Field(
        0, ge=0, description="CVAE route: the head on embeddings; 0 is a linear probe, more a one-hidden-layer MLP"
    )
    class_weighting: Literal["none", "balanced"] = Field(
        "none",
        description=(
            "the loss's weight per class: none, or balanced (each class the same total weight in a site's "
            "training data; node.federation.task.balanced_class_weights), against a majority-class model"
        ),
    )
    train_on: Literal["pool", "pool+real"] = Field(
        "pool", description="what each site trains on: the verified pool, or the pool plus its own real train split"
    )
    real_share: float = Field(
        2 / 3,
        ge=0,
        lt=1,
        description=(
            "pool+real only: at least this share of a site's training records are its own real train images, "
            "reached by repeating them whole (each repeat augmented afresh); 0: each image once, so the pool "
            "outnumbers them. Chosen on the sites' validation splits by bench/pool_real.py (of 0, 1/3, 1/2, 2/3)"
        ),
    )
    baselines: bool = Field(
        True,
        description=(
            "after the run, FedAvg on each site's real train data (classic federated learning) by the same "
            "machinery; every site also reports its local-only model (its real data alone) with each evaluation"
        ),
    )

    # what shapes a site's local-only model (node.federation.baseline); the rest is the federation's business
    YARDSTICK_FIELDS: ClassVar[tuple[str, ...]] = (
        "width",
        "rounds",
        "local_epochs",
        "min_local_steps",
        "lr",
        "head_lr",
        "batch_size",
        "head_hidden",
        "class_weighting",
    )

    def lr_for(self, route: str) -> float:
        """Adam's step size for the downstream model of `route`: head_lr for the CVAE route's head on
        embeddings, lr for the PLAN route's CNN on images."""
        return self.head_lr if route == "cvae" else self.lr

    def yardstick(self) -> DownstreamConfig:
        """These settings with only YARDSTICK_FIELDS kept, the rest at their defaults: two configs
        whose yardsticks are equal train the same local-only model."""
        return DownstreamConfig(**{k: getattr(self, k) for k in self.YARDSTICK_FIELDS})


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


def load_federation_config(path: Path) -> FederationConfig:
    return _load(Path(path), FederationConfig)
