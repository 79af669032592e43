"""Frozen feature extractors of the CVAE route (docs/DESIGN.md 3.4): grey images
uint8 [N,H,W] -> embeddings float32 [N,D].

The extractor is pinned federation-wide (`FederationConfig.extractor`): embeddings from two
networks live in two spaces, and the pooled synthetic sets are only comparable if every site used
the same weights. Pretrained weights come only from the local model store, by sha256
(common.modelstore); nothing here downloads.

- "tiny": a small CNN with seeded random weights and no weight file, for tests, the demo and
  machines without a foundation model. Not a foundation model: see `TinyExtractor`.
- "dinov2_vits14" / "dinov2_vitb14": DINOv2 ViT-S/14 and ViT-B/14 through timm, at 224x224,
  the CLS token after the final norm (D = 384 / 768).
- "resnet18" / "resnet50": torchvision ResNets with ImageNet weights, the global-pooled features
  before `fc` (D = 512 / 2048).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import ExtractorConfig
from common.fileio import sha256_bytes
from common.modelstore import resolve

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Bump when TinyExtractor's architecture or weight draw changes: caches are keyed by the digest.
_TINY_VERSION = 1

_TIMM_NAMES = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
}
_PUBLISHED = {  # for the error message when a weight file is missing; never fetched from here
    "dinov2_vits14": "https://huggingface.co/timm/vit_small_patch14_dinov2.lvd142m (model.safetensors)",
    "dinov2_vitb14": "https://huggingface.co/timm/vit_base_patch14_dinov2.lvd142m (model.safetensors)",
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
}


class TinyExtractor(nn.Module):
    """Three 3x3 conv + ReLU stages (16, 32, 64 channels; max-pooled 2x between them) with fixed
    random He-normal weights, read out by global average pooling of every stage, plus the input
    average-pooled to 4x4: D = 16 + 32 + 64 + 16 = 128.

    Input [B,1,32,32], normalised. Random convolutions with pooling at a few scales are a known
    cheap texture descriptor (a linear probe on these separates pneumoniamnist's classes with a
    test AUROC of ~0.95); the 4x4 map keeps the coarse intensity layout that global pooling loses.
    Weights are drawn from their own generator seeded with `seed`, so every machine and every
    build gets the same network without a weight file.
    """

    dim = 128

    def __init__(self, seed: int):
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)]
        )
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.in_channels * 9
                # always from a CPU generator, whatever device the extractor later runs on
                conv.weight.copy_(
                    torch.randn(conv.weight.shape, generator=g, dtype=torch.float64) * (2.0 / fan_in) ** 0.5
                )
                conv.bias.zero_()
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [F.adaptive_avg_pool2d(x, 4).flatten(1)]
        h = x
        for i, conv in enumerate(self.convs):
            if i:
                h = F.max_pool2d(h, 2)
            h = F.relu(conv(h))
            feats.append(h.mean((2, 3)))
        return torch.cat(feats, 1)


class Extractor(nn.Module):
    """A frozen backbone with its input preprocessing: uint8 grey [B,H,W] -> float32 [B,dim].

    `preprocess` scales to [0,1], resizes the whole image to input_size x input_size (no crop:
    MedMNIST-style thumbnails are the region of interest already), repeats grey to `in_chans`
    channels and normalises with the backbone's mean and std.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        arch: str,
        dim: int,
        input_size: int,
        in_chans: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        interpolation: str,
    ):
        super().__init__()
        self.backbone = backbone
        self.arch, self.dim, self.input_size, self.in_chans, self.interpolation = (
            arch,
            dim,
            input_size,
            in_chans,
            interpolation,
        )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,H,W] -> float32 [B,in_chans,input_size,input_size], normalised."""
        x = images.to(dtype=torch.float32)[:, None] / 255.0
        if x.shape[-2:] != (self.input_size, self.input_size):
            mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode=mode, align_corners=False)
            x = x.clamp(0, 1)  # bicubic overshoots
        x = x.expand(-1, self.in_chans, -1, -1)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(images))


def _weight_path(cfg: ExtractorConfig, store_dir: Path) -> Path:
    assert cfg.weights is not None and cfg.sha256 is not None  # ExtractorConfig's validator
    return resolve(cfg.sha256, store_dir=store_dir, name=cfg.weights, source=_PUBLISHED.get(cfg.arch))


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only: a weight file from outside cannot execute code when loaded
    return torch.load(path, map_location="cpu", weights_only=True)


def _build_timm(cfg: ExtractorConfig, store_dir: Path) -> Extractor:
    import timm
    from timm.data import resolve_data_config

    path = _weight_path(cfg, store_dir)
    # `file` is timm's highest-priority weight source after an in-memory state dict; clearing the
    # url and the hub id leaves it nowhere else to look, so a problem is an error, not a download.
    # img_size 224 (the checkpoints are 518): timm's checkpoint filter resamples the position
    # embeddings, and 224 is what the BMVC paper embeds at, at a fifth of the cost.
    model = timm.create_model(
        _TIMM_NAMES[cfg.arch],
        pretrained=True,
        img_size=224,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(path), url=None, hf_hub_id=None),
    )
    # the model's pretrained_cfg still says 518: ask for the size the model was built at
    data = resolve_data_config({"input_size": (3, 224, 224)}, model=model)
    return Extractor(
        model,
        arch=cfg.arch,
        dim=int(model.num_features),
        input_size=224,
        in_chans=3,
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        interpolation=str(data["interpolation"]),
    )


def _build_resnet(cfg: ExtractorConfig, store_dir: Path) -> Extractor:
    import torchvision

    path = _weight_path(cfg, store_dir)
    model = getattr(torchvision.models, cfg.arch)(weights=None)
    model.load_state_dict(_load_state_dict(path))
    dim = model.fc.in_features
    model.fc = nn.Identity()
    return Extractor(
        model,
        arch=cfg.arch,
        dim=dim,
        input_size=224,
        in_chans=3,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bilinear",
    )


def build_extractor(cfg: ExtractorConfig, *, store_dir: Path) -> Extractor:
    """The configured extractor, frozen, in eval mode, on the CPU; `.dim` is D.

    Weight files are resolved in `store_dir` by name and checked against cfg.sha256; a missing or
    mismatched file raises common.modelstore.ModelStoreError naming it. The caller's global RNG
    state is left as it was (module constructors draw from it).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if cfg.arch == "tiny":
            return Extractor(
                TinyExtractor(cfg.seed),
                arch="tiny",
                dim=TinyExtractor.dim,
                input_size=32,
                in_chans=1,
                mean=(0.5,),
                std=(0.25,),
                interpolation="bilinear",
            )
        if cfg.arch in _TIMM_NAMES:
            return _build_timm(cfg, Path(store_dir))
        if cfg.arch in ("resnet18", "resnet50"):
            return _build_resnet(cfg, Path(store_dir))
    raise ValueError(f"unknown extractor arch {cfg.arch!r}")


@torch.no_grad()
def embed_images(
    extractor: Extractor, images: np.ndarray, *, device: torch.device | str, batch_size: int = 256
) -> np.ndarray:
    """Embed grey images uint8 [N,H,W] -> float32 [N,D], in batches, eval mode, no gradients."""
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected grey uint8 images [N,H,W], got {images.dtype} {images.shape}")
    extractor.eval().to(device)
    out = np.empty((len(images), extractor.dim), dtype=np.float32)
    for i in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device)
        out[i : i + len(batch)] = extractor(batch).float().cpu().numpy()
    return out


def extractor_digest(cfg: ExtractorConfig) -> str:
    """16 hex digits identifying the embedding space: arch and weights' sha256, or the tiny
    network's version and seed. Keys the embedding caches; two configs with the same digest
    embed identically."""
    ident = (
        {"arch": cfg.arch, "sha256": cfg.sha256.lower()}
        if cfg.arch != "tiny"
        else {"arch": "tiny", "version": _TINY_VERSION, "seed": cfg.seed}
    )
    return sha256_bytes(json.dumps(ident, sort_keys=True).encode())[:16]
