"""A small style-based GAN (StyleGAN2 design, cut down to run on a CPU in a minute).

Generator: mapping network z -> w; synthesis network from a learned 4x4 constant through
upsampling blocks of modulated 3x3 convolutions (weights scaled per sample by an affine map of
w, then demodulated) with skip "to-grey" outputs, up to the configured resolution. One w drives
every layer (no style mixing), so W is the space the PLAN route inverts into and walks in.
There are no per-pixel noise inputs: they would make G(w) random, and inversion and the walk
need an image that is a function of w alone.

Discriminator: residual downsampling blocks, minibatch standard deviation, a linear head.
Images are [B,1,H,W] with pixels in [-1,1]; the generator's output is not squashed (tanh would
saturate gradients), callers clamp when they turn it into pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _res_levels(image_size: int) -> int:
    levels = math.log2(image_size) - 2
    if levels < 1 or not levels.is_integer():
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    return int(levels)


class EqualLinear(nn.Module):
    """Linear layer with StyleGAN's equalised learning rate: weights are stored N(0,1) and scaled
    by gain at run time, so Adam's per-parameter step (~lr) is the same small relative change in
    every layer. With plain nn.Linear/nn.Conv2d init at lr 2e-3, D and G each overpowered the
    other in a handful of steps and D's loss sat at ln 4. `lr_mul` < 1 slows a layer down
    further (the mapping network uses 0.01, as StyleGAN does)."""

    def __init__(self, c_in: int, c_out: int, *, bias_init: float = 0.0, lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((c_out,), bias_init / lr_mul))
        self.gain, self.lr_mul = lr_mul / math.sqrt(c_in), lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.gain, self.bias * self.lr_mul)


class EqualConv2d(nn.Module):
    """Conv2d with the equalised learning rate of EqualLinear; 'same' padding."""

    def __init__(self, c_in: int, c_out: int, kernel: int, *, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.gain, self.pad = 1 / math.sqrt(c_in * kernel * kernel), kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.gain, self.bias, padding=self.pad)


def _channels(base: int, level: int) -> int:
    """Feature maps at 4 * 2**level pixels: `base` at 4x4, halving as resolution doubles, at least 16."""
    return max(base >> level, 16)


class MappingNetwork(nn.Module):
    """z [B,z_dim] -> w [B,w_dim]: an MLP on the normalised latent."""

    def __init__(self, *, z_dim: int, w_dim: int, layers: int):
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.net = nn.Sequential(
            *[m for a, b in zip(dims, dims[1:]) for m in (EqualLinear(a, b, lr_mul=0.01), nn.LeakyReLU(0.2))]
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)
        return self.net(z)


class ModulatedConv2d(nn.Module):
    """Conv whose weights are scaled per sample by style s = A(w) and (optionally) demodulated.

    x [B,C_in,H,W], w [B,w_dim] -> [B,C_out,H',W'] (H' = 2H when `up`).
    """

    def __init__(
        self, c_in: int, c_out: int, *, w_dim: int, kernel: int = 3, demodulate: bool = True, up: bool = False
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.affine = EqualLinear(w_dim, c_in, bias_init=1.0)  # styles start at 1: a plain conv
        self.demodulate, self.up, self.pad = demodulate, up, kernel // 2
        self.gain = 1 / math.sqrt(c_in * kernel * kernel)  # equalised learning rate

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = self.affine(w)  # [B,C_in]
        weight = self.weight * self.gain
        # Scaling the input by s and the output by the demodulation factor equals convolving with
        # the per-sample modulated weights, but is one ordinary batched conv: much faster on CPU
        # than a grouped conv with a weight tensor per sample.
        x = x * s[:, :, None, None]
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.conv2d(x, weight, padding=self.pad)
        if self.demodulate:
            d = torch.rsqrt(s.square() @ weight.square().sum(dim=(2, 3)).T + 1e-8)  # [B,C_out]
            x = x * d[:, :, None, None]
        return x + self.bias[None, :, None, None]


class SynthesisNetwork(nn.Module):
    """w [B,w_dim] -> image [B,1,image_size,image_size], pixels trained towards [-1,1]."""

    def __init__(self, *, w_dim: int, image_size: int, channels: int):
        super().__init__()
        levels = _res_levels(image_size)
        c0 = _channels(channels, 0)
        self.const = nn.Parameter(torch.randn(1, c0, 4, 4))
        self.conv0 = ModulatedConv2d(c0, c0, w_dim=w_dim)
        self.to_grey0 = ModulatedConv2d(c0, 1, w_dim=w_dim, kernel=1, demodulate=False)
        self.blocks = nn.ModuleList()
        self.to_grey = nn.ModuleList()
        for level in range(1, levels + 1):
            a, b = _channels(channels, level - 1), _channels(channels, level)
            self.blocks.append(
                nn.ModuleList([ModulatedConv2d(a, b, w_dim=w_dim, up=True), ModulatedConv2d(b, b, w_dim=w_dim)])
            )
            self.to_grey.append(ModulatedConv2d(b, 1, w_dim=w_dim, kernel=1, demodulate=False))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.conv0(self.const.expand(w.shape[0], -1, -1, -1), w), 0.2)
        img = self.to_grey0(x, w)
        for (up, conv), to_grey in zip(self.blocks, self.to_grey):
            x = F.leaky_relu(up(x, w), 0.2)
            x = F.leaky_relu(conv(x, w), 0.2)
            img = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False) + to_grey(x, w)
        return img


class Generator(nn.Module):
    """z [B,z_dim] -> image [B,1,H,W]; `w_avg` [w_dim] is the tracked mean of w (inversion start)."""

    def __init__(self, *, z_dim: int, w_dim: int, mapping_layers: int, image_size: int, channels: int):
        super().__init__()
        self.z_dim, self.w_dim, self.image_size = z_dim, w_dim, image_size
        self.mapping = MappingNetwork(z_dim=z_dim, w_dim=w_dim, layers=mapping_layers)
        self.synthesis = SynthesisNetwork(w_dim=w_dim, image_size=image_size, channels=channels)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    @torch.no_grad()
    def track_w_avg(self, w: torch.Tensor, *, beta: float = 0.995) -> None:
        """Move w_avg towards the batch mean of w [B,w_dim] (called during training)."""
        self.w_avg.lerp_(w.detach().mean(0), 1 - beta)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.synthesis(self.mapping(z))


class _DBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = EqualConv2d(c_in, c_in, 3)
        self.conv2 = EqualConv2d(c_in, c_out, 3)
        self.skip = EqualConv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.conv1(x), 0.2)
        y = F.avg_pool2d(F.leaky_relu(self.conv2(y), 0.2), 2)
        return (y + F.avg_pool2d(self.skip(x), 2)) / math.sqrt(2)


def minibatch_stddev(x: torch.Tensor, *, group: int = 4) -> torch.Tensor:
    """x [B,C,H,W] -> [B,C+1,H,W]: appends the mean standard deviation over groups of samples,
    so D can see a batch lacking variety (mode collapse)."""
    B, C, H, W = x.shape
    g = min(group, B)
    while B % g:
        g -= 1
    y = x.reshape(g, -1, C, H, W)
    y = (y.var(0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # [B/g]
    y = y.reshape(-1, 1, 1, 1).repeat(g, 1, H, W)
    return torch.cat([x, y], 1)


class Discriminator(nn.Module):
    """image [B,1,H,W] -> logit [B] (real > 0)."""

    def __init__(self, *, image_size: int, channels: int):
        super().__init__()
        levels = _res_levels(image_size)
        self.from_grey = EqualConv2d(1, _channels(channels, levels), 1)
        self.blocks = nn.Sequential(
            *[_DBlock(_channels(channels, lv), _channels(channels, lv - 1)) for lv in range(levels, 0, -1)]
        )
        c0 = _channels(channels, 0)
        self.conv = EqualConv2d(c0 + 1, c0, 3)
        self.fc = EqualLinear(c0 * 16, c0)
        self.out = EqualLinear(c0, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.from_grey(img), 0.2)
        x = self.blocks(x)
        x = F.leaky_relu(self.conv(minibatch_stddev(x)), 0.2)
        x = F.leaky_relu(self.fc(x.flatten(1)), 0.2)
        return self.out(x)[:, 0]
