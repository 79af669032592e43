"""What the ServerApp and the ClientApp say to each other, typed once for both sides: one spec per
kind of run, written into a Flower ConfigRecord by `to_config` and read back by `from_config`.

Keys on the wire are the field names with hyphens ("local-epochs"). Flower's strategies add
"server-round" to every message and FedProx adds "proximal-mu"; the specs declare both. A key
that no spec declares, or a value of the wrong type, is refused with the key's name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.config import DownstreamConfig, FederationConfig
from common.content import ContentSpec

# set by Flower's strategies, not by the ServerApp
_STRATEGY_KEYS = {"server_round", "proximal_mu"}


class _Spec(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=lambda name: name.replace("_", "-"), populate_by_name=True
    )

    server_round: int = Field(0, ge=0)

    def to_config(self) -> dict:
        """The spec as ConfigRecord values, hyphenated keys, without the keys a strategy sets."""
        return self.model_dump(by_alias=True, exclude=_STRATEGY_KEYS)

    @classmethod
    def from_config(cls, config: Mapping):
        """The spec from a received ConfigRecord; ValueError naming every key that is wrong."""
        try:
            return cls.model_validate(dict(config))
        except ValidationError as e:
            wrong = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ValueError(f"{cls.__name__} message config: {wrong}") from None


class DownstreamRound(_Spec):
    """A round of the downstream classifier (train and evaluate): its architecture, so that every
    site builds the model the coordinator aggregates, and its hyperparameters, with which each
    site also trains its local-only yardstick."""

    task: Literal["downstream"] = "downstream"
    route: Literal["plan", "cvae"]
    n_classes: int = Field(ge=2)
    width: int = Field(ge=1)
    image_size: int = Field(ge=1)
    embedding_dim: int = Field(ge=0)
    head_hidden: int = Field(ge=0)
    rounds: int = Field(ge=1)
    local_epochs: int = Field(ge=1)
    min_local_steps: int = Field(ge=0)
    lr: float = Field(gt=0)
    head_lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    train_on: Literal["pool", "pool+real", "real"] = "pool"
    real_share: float = Field(ge=0, lt=1)  # used by pool+real only: DownstreamConfig.real_share
    # the bundle ids the coordinator had pooled when it submitted the run, comma-separated: every
    # site trains on exactly these, which `plan-node start` pulled and verified beside the SuperNode
    pool: str = Field("", pattern=r"^([0-9a-f]{32}(,[0-9a-f]{32})*)?$")
    proximal_mu: float = Field(0.0, ge=0)
    class_weighting: Literal["none", "balanced"] = "none"

    @classmethod
    def of(cls, fed: FederationConfig, *, train_on: str, pool: Sequence[str] = ()) -> DownstreamRound:
        """The spec the coordinator sends for federation `fed`, training on the bundles `pool`."""
        ds = fed.downstream
        return cls(
            route=fed.route,
            n_classes=fed.n_classes,
            width=ds.width,
            image_size=fed.image_size,
            embedding_dim=fed.extractor.dim,
            head_hidden=ds.head_hidden,
            rounds=ds.rounds,
            local_epochs=ds.local_epochs,
            min_local_steps=ds.min_local_steps,
            lr=ds.lr,
            head_lr=ds.head_lr,
            batch_size=ds.batch_size,
            class_weighting=ds.class_weighting,
            train_on=train_on,
            real_share=ds.real_share,
            pool=",".join(sorted(pool)) if train_on != "real" else "",
        )

    def pool_ids(self) -> list[str] | None:
        """The run's pool as bundle ids; None when the spec names none (train on the whole verified pool)."""
        return self.pool.split(",") if self.pool else None

    def downstream(self) -> DownstreamConfig:
        """The hyperparameters as the site's DownstreamConfig (for its local-only yardstick)."""
        return DownstreamConfig(**{k: getattr(self, k) for k in DownstreamConfig.YARDSTICK_FIELDS})

    def content(self) -> ContentSpec:
        """The federation's data as this spec states it (common/content.py)."""
        if self.route == "cvae":
            return ContentSpec(n_classes=self.n_classes, embedding_dim=self.embedding_dim or None)
        return ContentSpec(n_classes=self.n_classes, image_size=self.image_size)


class CvaeRound(_Spec):
    """A round of the federated CVAE (FederationConfig.cvae_federated): the decoder's architecture
    and the schedule."""

    task: Literal["cvae"] = "cvae"
    rounds: int = Field(ge=1)
    local_epochs: int = Field(ge=1)
    d_in: int = Field(ge=1)
    n_classes: int = Field(ge=2)
    hidden: int = Field(ge=1)
    latent: int = Field(ge=1)

    def arch(self) -> dict:
        """The decoder's architecture, as node.cvae.federated checks it."""
        return {"d-in": self.d_in, "n-classes": self.n_classes, "hidden": self.hidden, "latent": self.latent}


class CvaeRelease(_Spec):
    """After the federated CVAE's last round: synthesize, audit and publish from its final
    decoder, named by sha256 so that a site never releases from another run's decoder."""

    task: Literal["cvae-release"] = "cvae-release"
    rounds: int = Field(ge=1)
    global_decoder_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


_SPECS = {"downstream": DownstreamRound, "cvae": CvaeRound, "cvae-release": CvaeRelease}


def spec_of(config: Mapping) -> DownstreamRound | CvaeRound | CvaeRelease:
    """The spec a received ConfigRecord carries, by its "task" key."""
    task = config.get("task", "downstream")
    if task not in _SPECS:
        raise ValueError(f"message config: task {task!r}; expected one of {', '.join(map(repr, _SPECS))}")
    return _SPECS[task].from_config(config)
