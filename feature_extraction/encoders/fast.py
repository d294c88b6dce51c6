"""``fast``: a weight-free, deterministic colour + texture encoder for demos and CPU-only runs.

Not a learned model: hand-crafted descriptors that carry the information a weak MIL task on
H&E needs (stain colour, nuclear density, texture), computed with batched tensor ops at
thousands of patches/s on a CPU. Blocks (dimensions in brackets):

- colour (on the 64 px input average-pooled to 32 px; colour statistics need no detail): RGB mean/std [6]; HSV histograms — hue weighted by saturation [12],
  saturation [8], value [8]; optical density (OD = -log((I·255+1)/256), Ruifrok & Johnston
  2001) mean/std [6] and per-channel OD histograms [24]; background fraction [1].
- texture (grey): Sobel orientation histogram weighted by magnitude [8], log-magnitude
  histogram [8], magnitude mean/std [2]; uniform local binary patterns (Ojala et al., TPAMI
  2002) at radius 1 and 2 [10 + 10]; Laplacian energy at 3 scales [3].
- random-projection conv features (fixed seed 0): 32 zero-mean 5×5 stride-2 filters on OD,
  |response| mean and std [32 + 32]; 48 random 3×3 stride-2 filters on those maps, ReLU mean
  [48].

Total 218 dims. Every step is deterministic on CPU (no atomics), so reruns are bitwise equal.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from milkit.feature_extraction.encoders.registry import EncoderCfg, register_encoder

FAST_DIM = 218
_SEED = 0  # fixed: the random projections are part of the encoder's definition

FAST = EncoderCfg(
    name="fast",
    embed_dim=FAST_DIM,
    input_size=64,
    mean=(0.0, 0.0, 0.0),  # the encoder works on [0, 1] RGB
    std=(1.0, 1.0, 1.0),
    precision="fp32",
    license="Apache-2.0 (weight-free)",
    paper="hand-crafted colour/OD/LBP/gradient descriptors + fixed random convolutions",
    weights_required=False,
    cpu_amp=False,
    description="weight-free colour + texture descriptors, 218-d, for demos and CPU-only runs",
)


def _hist(values: torch.Tensor, bins: int, lo: float, hi: float, weights=None) -> torch.Tensor:
    """Per-row histogram of (B, P) values in [lo, hi] → (B, bins), rows sum to 1."""
    b = values.shape[0]
    idx = ((values - lo) * (bins / (hi - lo))).floor().clamp_(0, bins - 1).long()
    idx = idx + torch.arange(b, device=values.device).unsqueeze(1) * bins
    w = None if weights is None else weights.reshape(-1)
    counts = torch.bincount(idx.reshape(-1), weights=w, minlength=b * bins).view(b, bins)
    counts = counts.to(values.dtype)
    return counts / counts.sum(1, keepdim=True).clamp_min(1e-6)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = delta.clamp_min(1e-6)
    h = torch.where(
        maxc == r,
        ((g - b) / safe) % 6.0,
        torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    h = torch.where(delta > 1e-6, h / 6.0, torch.zeros_like(h))
    s = torch.where(maxc > 1e-6, delta / maxc.clamp_min(1e-6), torch.zeros_like(maxc))
    return h, s, maxc


def _uniform_lbp(g: torch.Tensor, radius: int) -> torch.Tensor:
    """Uniform LBP histogram (9 uniform codes by number of ones + 1 non-uniform) of (B, H, W)."""
    c = g[:, radius:-radius, radius:-radius]
    h, w = c.shape[1:]
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]  # circular
    bits = []
    for dy, dx in offsets:
        y0, x0 = radius + dy * radius, radius + dx * radius
        bits.append(g[:, y0 : y0 + h, x0 : x0 + w] >= c)
    ones = torch.zeros_like(c, dtype=torch.uint8)
    transitions = torch.zeros_like(ones)
    for k, bit in enumerate(bits):
        ones += bit
        transitions += bit ^ bits[k - 1]
    code = torch.where(transitions <= 2, ones, torch.full_like(ones, 9))
    return _hist(code.flatten(1).float(), 10, 0.0, 10.0)


def _shift_conv3(g: torch.Tensor, k: tuple[tuple[float, ...], ...]) -> torch.Tensor:
    """'valid' 3×3 correlation of (B, H, W) by slicing (much faster than a 1-channel conv2d)."""
    h, w = g.shape[1] - 2, g.shape[2] - 2
    out = torch.zeros(g.shape[0], h, w, dtype=g.dtype, device=g.device)
    for dy in range(3):
        for dx in range(3):
            if k[dy][dx]:
                out.add_(g[:, dy : dy + h, dx : dx + w], alpha=k[dy][dx])
    return out


_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
_SOBEL_Y = ((-1.0, -2.0, -1.0), (0.0, 0.0, 0.0), (1.0, 2.0, 1.0))
_LAPLACE = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


class FastEncoder(nn.Module):
    """Colour + texture descriptors of [0, 1] RGB (B, 3, 64, 64) → (B, 218)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(_SEED)
        w1 = torch.randn(32, 3, 5, 5, generator=gen)
        w1 = w1 - w1.mean(dim=(1, 2, 3), keepdim=True)  # zero-mean: texture, not brightness
        w1 = w1 / w1.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        w2 = torch.randn(48, 32, 3, 3, generator=gen)
        w2 = w2 / w2.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        b2 = -0.5 * torch.rand(48, generator=gen)  # sparse ReLU responses
        self.register_buffer("w1", w1)
        self.register_buffer("w2", w2)
        self.register_buffer("b2", b2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(0.0, 1.0).contiguous()
        colour = self._colour(F.avg_pool2d(x, 2))
        return torch.cat([colour, self._texture(x), self._conv(x)], dim=1)

    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        flat = x.flatten(2)
        h, s, v = (t.flatten(1) for t in _rgb_to_hsv(x))
        od = -torch.log((flat * 255.0 + 1.0) / 256.0)  # (B, 3, P), 0 = white
        od_hist = [_hist(od[:, c], 8, 0.0, 2.5) for c in range(3)]
        background = ((v > 0.85) & (s < 0.1)).float().mean(1, keepdim=True)
        return torch.cat(
            [
                flat.mean(2),
                flat.std(2),
                _hist(h, 12, 0.0, 1.0, weights=s),
                _hist(s, 8, 0.0, 1.0),
                _hist(v, 8, 0.0, 1.0),
                od.mean(2),
                od.std(2),
                *od_hist,
                background,
            ],
            dim=1,
        ).view(b, -1)

    def _texture(self, x: torch.Tensor) -> torch.Tensor:
        g = x[:, 0] * 0.299 + x[:, 1] * 0.587 + x[:, 2] * 0.114  # ITU-R BT.601 luma, (B, H, W)
        gx = _shift_conv3(g, _SOBEL_X).flatten(1)
        gy = _shift_conv3(g, _SOBEL_Y).flatten(1)
        mag = torch.sqrt(gx * gx + gy * gy)
        theta = torch.atan2(gy, gx) % math.pi
        logmag = torch.log1p(mag * 10.0)
        laps = []
        level = g
        for _ in range(3):
            laps.append(_shift_conv3(level, _LAPLACE).abs().flatten(1).mean(1, keepdim=True))
            level = F.avg_pool2d(level.unsqueeze(1), 2).squeeze(1)
        return torch.cat(
            [
                _hist(theta, 8, 0.0, math.pi, weights=mag),
                _hist(logmag, 8, 0.0, 3.0),
                mag.mean(1, keepdim=True),
                mag.std(1, keepdim=True),
                _uniform_lbp(g, 1),
                _uniform_lbp(g, 2),
                *laps,
            ],
            dim=1,
        )

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        od = -torch.log((x * 255.0 + 1.0) / 256.0)
        r1 = F.conv2d(od, self.w1, stride=2, padding=2).abs()  # (B, 32, 32, 32)
        r2 = F.relu(F.conv2d(r1, self.w2, self.b2, stride=2, padding=1))  # (B, 48, 16, 16)
        return torch.cat([r1.mean((2, 3)), r1.std((2, 3)), r2.mean((2, 3))], dim=1)


@register_encoder(FAST)
def build_fast(cfg: EncoderCfg, weights: Path | None) -> nn.Module:
    """The weight-free encoder (``weights`` is always None)."""
    return FastEncoder()
