"""The node's small CNN classifiers: phi_id (which training patient is this?), phi_class (which
class?) and the audit's independent re-identification attacker.

The architecture is common.models.ConvNet (shared with the federation's downstream model):
features(x) [B,1,H,W] in [-1,1] -> [B,4*width] is the re-identification embedding, forward(x)
-> logits [B,n_out]. The CVAE route's phi_id and attacker are
common.models.EmbeddingHead heads on embeddings (node.cvae.stages).
"""

from __future__ import annotations

from common.models import ConvNet


class SmallCNN(ConvNet):
    def __init__(self, n_out: int, *, width: int, image_size: int):
        super().__init__(n_out, width=width, image_size=image_size)
