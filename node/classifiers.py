"""The node's small CNN classifiers: phi_id (which training patient is this?), phi_class (which
class?) and the audit's independent re-identification attacker.

The architecture is common.models.ConvNet (shared with the federation's downstream model):
features(x) [B,1,H,W] in [-1,1] -> [B,4*width] is the re-identification embedding, forward(x)
-> logits [B,n_out]. The CVAE route's phi_id and attacker are EmbeddingClassifier heads on embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from common.models import ConvNet, EmbeddingHead


class SmallCNN(ConvNet):
    def __init__(self, n_out: int, *, width: int, image_size: int):
        super().__init__(n_out, width=width, image_size=image_size)


class EmbeddingClassifier(nn.Module):
    """The CVAE route's phi_id and attacker: embeddings [B,D] -> logits [B,n_out], standardised by
    the train records' per-dimension mean and std (buffers, saved with the weights) and then a
    common.models.EmbeddingHead with one hidden layer."""

    def __init__(self, d_in: int, n_out: int, *, hidden: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("std", torch.ones(d_in))
        self.head = EmbeddingHead(d_in, n_out, hidden=hidden)

    def fit_scaler(self, x: torch.Tensor) -> "EmbeddingClassifier":
        """Set the standardisation from train embeddings x [N,D]."""
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x - self.mean) / self.std)
