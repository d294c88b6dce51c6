"""Mamba mixers for MambaMIL: ``Mamba`` (unidirectional), ``BiMamba`` and ``SRMamba``.

Mamba: Gu & Dao, arXiv 2312.00752 (repo state-spaces/mamba, ``mamba_ssm/modules/mamba_simple.py``).
BiMamba / SRMamba: Yang, Wang, Chen, "MambaMIL", MICCAI 2024, arXiv 2403.06800 (repo
isyangshu/MambaMIL, ``mamba/mamba_ssm/modules/bimamba.py``, ``srmamba.py``).

One Mamba "inner" pass on ``xz = in_proj(h)`` (split into x, z along channels)::

    x  = SiLU(causal depthwise conv1d_k(x))                       k = d_conv = 4
    Δ_raw, B, C = x_proj(x)                                       sizes dt_rank, d_state, d_state
    y  = selective_scan(x, dt_proj.weight Δ_raw, A = -exp(A_log), B, C, D,
                        z, delta_bias = dt_proj.bias, softplus)   (see ``selective_scan``)

- ``Mamba``:   out = out_proj(inner(xz))
- ``BiMamba``: out = out_proj(inner(xz) + flip(inner_b(flip(xz))))        (Vim-style)
- ``SRMamba``: out = out_proj(inner(xz) + unorder(inner_b(order_R(xz))))  where ``order_R`` zero-pads
  the sequence to a multiple of the rate R, views it as (L/R rows × R columns) and reads it column
  by column (0, R, 2R, …, 1, R+1, …); ``unorder`` inverts that and crops the padding. The zero
  padding takes part in the second branch's recurrence, as in the official kernel path.

Parameter names follow mamba-ssm (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``,
``D``, ``out_proj``) and the official second branch (``conv1d_b``, ``x_proj_b``, ``dt_proj_b``,
``A_b_log``, ``D_b``), so state dicts move between the CUDA kernels and this PyTorch path.
Initialisation is mamba-ssm's: A_log = log(1..d_state), D = 1, dt_proj weight ~ U(±dt_rank^-0.5),
dt_proj bias = softplus⁻¹(Δ₀) with Δ₀ log-uniform in [dt_min, dt_max], floored at 1e-4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.layers.selective_scan import selective_scan

__all__ = ["BiMamba", "Mamba", "SRMamba", "causal_conv1d", "sr_order", "sr_unorder"]


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depthwise causal conv + SiLU on (b, d, L): output t sees inputs t-k+1..t (zero history).

    Uses the ``causal_conv1d`` CUDA kernel when importable and ``x`` is on CUDA.
    """
    if x.is_cuda:
        try:
            from causal_conv1d import causal_conv1d_fn
        except Exception:  # optional CUDA package; absent or broken builds fall back
            causal_conv1d_fn = None
        if causal_conv1d_fn is not None:
            return causal_conv1d_fn(x, rearrange(weight, "d 1 w -> d w"), bias, activation="silu")
    k = weight.shape[-1]
    out = F.conv1d(x, weight, bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out)


def sr_order(x: Tensor, rate: int) -> Tensor:
    """SR-Mamba reordering of (b, c, L): zero-pad L to a multiple of ``rate``, read column-wise."""
    pad = -x.shape[-1] % rate
    if pad:
        x = F.pad(x, (0, pad))
    return rearrange(x, "b c (k w) -> b c (w k)", w=rate)


def sr_unorder(x: Tensor, rate: int, length: int) -> Tensor:
    """Inverse of ``sr_order``: back to sequence order, padding cropped to ``length``."""
    return rearrange(x, "b c (w k) -> b c (k w)", w=rate)[..., :length]


class _Branch:
    """Names of one branch's parameters on the mixer (official names; '_b' for the second)."""

    def __init__(self, conv: str, x_proj: str, dt_proj: str, a_log: str, d: str) -> None:
        self.conv, self.x_proj, self.dt_proj, self.a_log, self.d = conv, x_proj, dt_proj, a_log, d


_MAIN = _Branch("conv1d", "x_proj", "dt_proj", "A_log", "D")
_SECOND = _Branch("conv1d_b", "x_proj_b", "dt_proj_b", "A_b_log", "D_b")


class Mamba(nn.Module):
    """Unidirectional Mamba mixer (mamba-ssm ``Mamba``): (B, L, d_model) -> (B, L, d_model).

    Args:
        d_model: token width (512 in MambaMIL).
        d_state: SSM state size n (16, mamba-ssm default).
        d_conv: causal conv width (4, mamba-ssm default).
        expand: d_inner = expand · d_model (2, mamba-ssm default).
        dt_rank: rank of the Δ projection; "auto" = ⌈d_model / 16⌉ (32 for 512, mamba-ssm).
        dt_min, dt_max, dt_init_floor: Δ initialisation range (1e-3, 0.1, 1e-4; mamba-ssm).
        conv_bias, bias: conv1d bias (True) and in/out projection bias (False; mamba-ssm).
        backend: selective-scan path, see ``selective_scan`` ("auto").
    """

    second_branch = False

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.backend = backend
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        branches = [_MAIN, _SECOND] if self.second_branch else [_MAIN]
        for br in branches:
            self._make_branch(br, conv_bias, dt_min, dt_max, dt_init_floor)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _make_branch(
        self, br: _Branch, conv_bias: bool, dt_min: float, dt_max: float, floor: float
    ) -> None:
        di = self.d_inner
        conv = nn.Conv1d(di, di, self.d_conv, groups=di, padding=self.d_conv - 1, bias=conv_bias)
        x_proj = nn.Linear(di, self.dt_rank + 2 * self.d_state, bias=False)
        dt_proj = nn.Linear(self.dt_rank, di, bias=True)
        std = self.dt_rank**-0.5  # dt_scale 1.0, dt_init "random" (mamba-ssm)
        nn.init.uniform_(dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():  # inverse softplus, so softplus(bias) = dt
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a_log = torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(di, 1)
        setattr(self, br.conv, conv)
        setattr(self, br.x_proj, x_proj)
        setattr(self, br.dt_proj, dt_proj)
        setattr(self, br.a_log, nn.Parameter(a_log))  # S4D-real init, kept in fp32
        setattr(self, br.d, nn.Parameter(torch.ones(di)))

    def inner(self, xz: Tensor, br: _Branch) -> Tensor:
        """One Mamba pass without out_proj: (b, 2·d_inner, L) -> (b, d_inner, L)."""
        conv, x_proj, dt_proj = (getattr(self, name) for name in (br.conv, br.x_proj, br.dt_proj))
        x, z = xz.chunk(2, dim=1)
        x = causal_conv1d(x, conv.weight, conv.bias)
        x_dbl = x_proj(rearrange(x, "b d l -> b l d"))
        dt, b_ssm, c_ssm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = rearrange(dt @ dt_proj.weight.t(), "b l d -> b d l")
        b_ssm = rearrange(b_ssm, "b l n -> b n l").contiguous()
        c_ssm = rearrange(c_ssm, "b l n -> b n l").contiguous()
        a = -torch.exp(getattr(self, br.a_log).float())
        y = selective_scan(
            x,
            dt,
            a,
            b_ssm,
            c_ssm,
            getattr(self, br.d).float(),
            z=z,
            delta_bias=dt_proj.bias.float(),
            delta_softplus=True,
            backend=self.backend,
        )
        return y

    def mix(self, xz: Tensor) -> Tensor:
        return self.inner(xz, _MAIN)

    def forward(self, hidden: Tensor) -> Tensor:
        xz = rearrange(self.in_proj(hidden), "b l d -> b d l")
        return self.out_proj(rearrange(self.mix(xz), "b d l -> b l d"))


class BiMamba(Mamba):
    """Bidirectional mixer (MambaMIL ``BiMamba``, Vim-style): second branch on the flipped sequence,
    with its own conv/x_proj/dt_proj/A/D; outputs summed before ``out_proj``."""

    second_branch = True

    def mix(self, xz: Tensor) -> Tensor:
        return self.inner(xz, _MAIN) + self.inner(xz.flip(-1), _SECOND).flip(-1)


class SRMamba(Mamba):
    """Sequence-reordering mixer (MambaMIL ``SRMamba``): second branch on the column-wise read of
    the sequence laid out in rows of ``rate`` tokens (see module docstring).

    Args:
        rate: reordering rate R (official argparse default 10; training scripts use 5).
    """

    second_branch = True

    def __init__(self, d_model: int, *, rate: int = 10, **kwargs) -> None:
        super().__init__(d_model, **kwargs)
        if int(rate) < 1:
            raise ValueError(f"SRMamba: rate must be >= 1, got {rate!r}")
        self.rate = int(rate)

    def mix(self, xz: Tensor) -> Tensor:
        length = xz.shape[-1]
        out_b = self.inner(sr_order(xz, self.rate), _SECOND)
        return self.inner(xz, _MAIN) + sr_unorder(out_b, self.rate, length)
