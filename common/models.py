"""Models both sides of the federation build: the coordinator to aggregate, every site to train.

`ConvNet` is also the node's phi_id / phi_class design (node.plan.classifiers.SmallCNN); it lives here
so the coordinator needs nothing from `node`.

Inputs [B,1,H,W] with pixels in [-1,1]. GroupNorm rather than BatchNorm: FedAvg averages these
networks across sites, and the walk and the audit run them on batches of generated images;
neither should depend on batch statistics.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(math.gcd(8, c_out), c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(math.gcd(8, c_out), c_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class ConvNet(nn.Module):
    """Three conv blocks (width, 2*width, 4*width channels, each halving the resolution), a hidden
    layer on the flattened (image_size/8)^2 map and a linear head. Flattening, not global pooling:
    where things are (a patient's anatomy) is what re-identification needs.

    features(x): [B,1,H,W] -> [B, 4*width], the penultimate layer.
    forward(x): [B,1,H,W] -> logits [B, n_out].
    """

    def __init__(self, n_out: int, *, width: int, image_size: int):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.n_out, self.width, self.image_size = n_out, width, image_size
        self.body = nn.Sequential(_block(1, width), _block(width, 2 * width), _block(2 * width, 4 * width))
        self.hidden = nn.Linear(4 * width * (image_size // 8) ** 2, 4 * width)
        self.head = nn.Linear(4 * width, n_out)

    @property
    def feature_dim(self) -> int:
        return 4 * self.width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # A linear bottleneck, no ReLU: with a ReLU here a 400-way phi_id (one image per
        # identity, width 8) lost every unit to dead ReLUs and never left chance, and all
        # images shared the all-zero embedding the audit's distances are taken in.
        return self.hidden(self.body(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DownstreamCNN(ConvNet):
    """The federated downstream classifier: images [B,1,H,W] in [-1,1] -> logits [B,n_classes].

    The parameter order of `state_dict()` is the wire format of the Flower federation, so changing
    this class changes the protocol.
    """

    def __init__(self, n_classes: int, *, width: int, image_size: int):
        super().__init__(n_classes, width=width, image_size=image_size)


class EmbeddingHead(nn.Module):
    """A classifier on embeddings [B,D] -> logits [B,n_classes]: inputs standardised per dimension
    (buffers `mean`, `std`, set by fit_scaler), then linear (hidden=0, a probe) or one hidden ReLU
    layer of `hidden` units. Foundation-model features can have tiny spreads around large means
    (the tiny extractor's: mean |x| 0.85, std 0.07), which a raw linear layer learns slowly.

    The federation's downstream model on the CVAE route, so, as for DownstreamCNN, the order of
    `state_dict()` (mean, std, then the layers) is the wire format. In a federation every site
    fits the scaler on the pool it trains on, which is the same pool at every site."""

    def __init__(self, d_in: int, n_classes: int, *, hidden: int = 0):
        super().__init__()
        if d_in < 1 or hidden < 0:
            raise ValueError(f"d_in must be >= 1 and hidden >= 0, got {d_in} and {hidden}")
        self.d_in, self.n_classes, self.hidden = d_in, n_classes, hidden
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("std", torch.ones(d_in))
        self.net = (
            nn.Linear(d_in, n_classes)
            if hidden == 0
            else nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
        )

    @torch.no_grad()
    def fit_scaler(self, x: torch.Tensor) -> "EmbeddingHead":
        """Standardise by the mean and std of embeddings x [N,D] (N >= 2); returns self."""
        x = torch.as_tensor(x, dtype=torch.float32)
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def downstream_model(
    n_classes: int, *, route: str, width: int, image_size: int, embedding_dim: int, head_hidden: int
) -> nn.Module:
    """The federation's downstream classifier for `route`: DownstreamCNN on images [B,1,H,W]
    ("plan"), EmbeddingHead on embeddings [B,embedding_dim] ("cvae"). Built alike by the
    coordinator, to aggregate, and by every site, to train."""
    if route == "cvae":
        return EmbeddingHead(embedding_dim, n_classes, hidden=head_hidden)
    if route == "plan":
        return DownstreamCNN(n_classes, width=width, image_size=image_size)
    raise ValueError(f"unknown route {route!r}; expected 'plan' or 'cvae'")


class CVAE(nn.Module):
    """The CVAE route's generator (node.cvae.generator trains and samples it): a conditional VAE on embeddings.

    Encoder [x, onehot(y)] (D+C) -> hidden -> ReLU -> (mu, logvar) (2 x latent);
    decoder [z, onehot(y)] (latent+C) -> hidden -> ReLU -> D -> sigmoid (scaled embeddings in [0,1]).
    It lives here because the federated CVAE (FederationConfig.cvae_federated) averages its
    decoder at the coordinator: `decoder_state()`'s keys and order are that run's wire format."""

    def __init__(self, d_in: int, n_classes: int, *, hidden: int = 256, latent: int = 50):
        super().__init__()
        self.d_in, self.n_classes, self.hidden, self.latent = d_in, n_classes, hidden, latent
        self.encoder = nn.Sequential(nn.Linear(d_in + n_classes, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(
            nn.Linear(latent + n_classes, hidden), nn.ReLU(), nn.Linear(hidden, d_in), nn.Sigmoid()
        )

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,D] scaled, c [B,C] one-hot -> mu [B,latent], logvar [B,latent]."""
        h = self.encoder(torch.cat([x, c], 1))
        return h[:, : self.latent], h[:, self.latent :]

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """z [B,latent], c [B,C] one-hot -> scaled embeddings [B,D] in (0,1)."""
        return self.decoder(torch.cat([z, c], 1))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction [B,D], mu, logvar; `eps` [B,latent] fixes the reparameterisation noise."""
        mu, logvar = self.encode(x, c)
        if eps is None:
            eps = torch.randn_like(mu)
        return self.decode(mu + eps * torch.exp(0.5 * logvar), c), mu, logvar

    def decoder_state(self) -> dict[str, torch.Tensor]:
        """The decoder's weights only (keys `decoder.*`, CPU copies): what the federated CVAE shares.
        The encoder, which has seen every train record directly, never leaves the site."""
        return {
            k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items() if k.startswith("decoder.")
        }

    def load_decoder_state(self, state: dict[str, torch.Tensor]) -> "CVAE":
        """Put `state` (decoder_state()'s keys exactly) into the decoder; the encoder is untouched. Returns self."""
        expected = set(self.decoder_state())
        if set(state) != expected:
            raise ValueError(f"expected the decoder's keys {sorted(expected)}, got {sorted(state)}")
        self.decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in state.items()})
        return self


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict as safetensors bytes (float32 CPU tensors): the federated CVAE's
    decoder digest, the same at the coordinator and at every site that received it."""
    import hashlib

    from safetensors.torch import save

    return hashlib.sha256(save({k: v.detach().cpu().float().contiguous() for k, v in state.items()})).hexdigest()
