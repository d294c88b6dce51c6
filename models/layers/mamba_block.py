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

Long sequences (more than ``chunk_size`` tokens, off the CUDA kernels) take a low-memory path with
the same maths: each branch runs in checkpointed sequence chunks, carrying the causal conv's last
d_conv-1 inputs and the scan state (``selective_scan_chunked(initial_state=...)``) from chunk to
chunk, so backward keeps O(L·d_model) instead of O(L·d_inner) per branch (see ``Mamba``).

Parameter names follow mamba-ssm (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``,
``D``, ``out_proj``) and the official second branch (``conv1d_b``, ``x_proj_b``, ``dt_proj_b``,
``A_b_log``, ``D_b``), so state dicts move between the CUDA kernels and this PyTorch path.
Initialisation is mamba-ssm's: A_log = log(1..d_state), D = 1, dt_proj weight ~ U(±dt_rank^-0.5),
dt_proj bias = softplus⁻¹(Δ₀) with Δ₀ log-uniform in [dt_min, dt_max], floored at 1e-4.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from milkit.models.layers.selective_scan import (
    cuda_selective_scan_fn,
    selective_scan,
    selective_scan_chunked,
)

__all__ = ["BiMamba", "Mamba", "SRMamba", "causal_conv1d", "sr_order", "sr_unorder", "ssm_a"]


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


def ssm_a(a_log: Tensor) -> Tensor:
    """Mamba's state matrix ``A = −exp(A_log.float())`` (d, n) as the correctly rounded float32.

    mamba-ssm and the official MambaMIL mixers take ``A`` in float32 whatever the model dtype
    (``-torch.exp(self.A_log.float())``), and so do we. But float32 ``exp`` is not correctly
    rounded everywhere: torch's CPU kernel returns 7.0026526 for exp(1.9462890625) (log 7 in
    float16), 1 ulp below the correctly rounded 7.0026531, and other float32 exps (numpy's, other
    machines') round other inputs differently. That one ulp moved float64 MambaMIL outputs by up
    to 8e-10 against the official code run on another machine (issue 11's fidelity fixtures).
    Evaluating the exponential in float64 and rounding once gives the same float32 ``A`` on every
    IEEE platform. MPS has no float64: there the plain float32 ``exp``.
    """
    a32 = a_log.float()
    if a32.device.type == "mps":
        return -torch.exp(a32)
    return (-torch.exp(a32.double())).float()


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
        chunk_size: above this many tokens, run the low-memory chunked path (see below);
            None disables it. Not used with the CUDA kernels or the "ref" backend.
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
        chunk_size: int | None = 512,
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
        # Tokens per chunk of the low-memory path (None = never chunk); not a parameter, so
        # state dicts are unaffected. 512: one chunk's recomputation (the scan inside keeps its
        # activations, ~8 (d_inner, 512, d_state) tensors) holds ~0.3 GB at d_inner = 1024.
        self.chunk_size: int | None = chunk_size

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
        conv = getattr(self, br.conv)
        x, z = xz.chunk(2, dim=1)
        x = causal_conv1d(x, conv.weight, conv.bias)
        return self._ssm(x, z, br)

    def _ssm(
        self, x: Tensor, z: Tensor, br: _Branch, initial_state: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x_proj, Δ projection and the gated selective scan on the conv output x (b, d, L).

        With ``initial_state`` (the low-memory path) the scan starts from that state and the
        final state is returned too: ``(y, state)``.
        """
        x_proj, dt_proj = getattr(self, br.x_proj), getattr(self, br.dt_proj)
        x_dbl = x_proj(rearrange(x, "b d l -> b l d"))
        dt, b_ssm, c_ssm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = rearrange(dt @ dt_proj.weight.t(), "b l d -> b d l")
        b_ssm = rearrange(b_ssm, "b l n -> b n l").contiguous()
        c_ssm = rearrange(c_ssm, "b l n -> b n l").contiguous()
        a = ssm_a(getattr(self, br.a_log))
        args = (x, dt, a, b_ssm, c_ssm, getattr(self, br.d).float())
        kwargs = {"z": z, "delta_bias": dt_proj.bias.float(), "delta_softplus": True}
        if initial_state is not None:
            # the caller checkpoints the whole chunk: no second recomputation inside the scan
            return selective_scan_chunked(
                *args,
                **kwargs,
                initial_state=initial_state,
                return_last_state=True,
                recompute_blocks=False,
            )
        return selective_scan(*args, **kwargs, backend=self.backend)

    def mix(self, xz: Tensor) -> Tensor:
        return self.inner(xz, _MAIN)

    def forward(self, hidden: Tensor) -> Tensor:
        if self._low_memory(hidden):
            return self._forward_low_memory(hidden)
        xz = rearrange(self.in_proj(hidden), "b l d -> b d l")
        return self.out_proj(rearrange(self.mix(xz), "b d l -> b l d"))

    # ------------------------------------------------------------------ low-memory path
    # The plain path keeps ~a dozen (b, d_inner, L) activations per branch for backward (about
    # 2 GB per layer at L = 10^4, d_inner = 1024). Above ``chunk_size`` tokens the mixer instead
    # runs in_proj → causal conv → x_proj/dt_proj → scan → gate → out_proj on sequence chunks
    # (in each branch's own token order), carrying the causal conv's last d_conv-1 inputs and the
    # scan state from chunk to chunk. Each chunk is activation-checkpointed, so backward keeps
    # only the chunk inputs and recomputes one chunk at a time. Same maths as the plain path; the
    # only difference is that out_proj is applied per branch and summed (linearity:
    # W(y + y_b) = W y + W y_b; the bias is added once), a float-rounding-level change.

    def _low_memory(self, hidden: Tensor) -> bool:
        if self.chunk_size is None or hidden.shape[1] <= self.chunk_size:
            return False
        if self.backend == "ref":
            return False  # the sequential oracle keeps its own, plain path
        if hidden.is_cuda and self.backend in ("auto", "cuda"):
            # the fused kernels cannot start from a carried state; keep them
            return cuda_selective_scan_fn() is None and self.backend == "auto"
        return True

    def branch_orders(self, length: int, device: torch.device) -> list[tuple[_Branch, Tensor]]:
        """Each branch with the token order it scans: index into the sequence, -1 = zero pad."""
        return [(_MAIN, torch.arange(length, device=device))]

    def _forward_low_memory(self, hidden: Tensor) -> Tensor:
        b, length, _ = hidden.shape
        step = int(self.chunk_size or length)
        out: Tensor | None = None
        for br, order in self.branch_orders(length, hidden.device):
            identity = order.numel() == length and bool(
                (order == torch.arange(length, device=order.device)).all()
            )
            seq = hidden if identity else hidden[:, order.clamp(min=0)]
            valid = None if bool((order >= 0).all()) else order >= 0
            conv_state = hidden.new_zeros(b, self.d_inner, self.d_conv - 1)
            scan_state = hidden.new_zeros(
                b, self.d_inner, self.d_state, dtype=_scan_dtype(hidden.dtype)
            )
            pieces = []
            for start in range(0, order.numel(), step):
                sl = slice(start, start + step)
                piece_valid = None if valid is None else valid[sl]
                args = (br, seq[:, sl], piece_valid, conv_state, scan_state)
                if torch.is_grad_enabled():
                    res = checkpoint(self._chunk, *args, use_reentrant=False)
                else:
                    res = self._chunk(*args)
                piece, conv_state, scan_state = res
                _trim_heap()
                if scan_state.requires_grad:  # and in backward, once the next chunk is done
                    scan_state.register_hook(_trim_heap_hook)
                pieces.append(piece)
            res_br = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
            if not identity:  # back to sequence order (crops SR padding)
                where = torch.empty(length, dtype=torch.long, device=order.device)
                pos = torch.arange(order.numel(), device=order.device)
                keep = order >= 0
                where[order[keep]] = pos[keep]
                res_br = res_br[:, where]
            out = res_br if out is None else out + res_br
        assert out is not None  # every mixer has its main branch
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias
        return out

    def _chunk(
        self,
        br: _Branch,
        hidden: Tensor,
        valid: Tensor | None,
        conv_state: Tensor,
        scan_state: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One chunk of one branch: (out_proj(y) without bias, conv state, scan state)."""
        xz = self.in_proj(hidden)
        if valid is not None:  # zero padding of the SR order enters after in_proj, as in plain
            xz = xz * valid[None, :, None].to(xz.dtype)
        x, z = rearrange(xz, "b l d -> b d l").chunk(2, dim=1)
        conv = getattr(self, br.conv)
        x_ext = torch.cat([conv_state, x], dim=-1)
        next_conv = x_ext[..., x_ext.shape[-1] - conv_state.shape[-1] :].clone()
        x = F.silu(F.conv1d(x_ext, conv.weight, conv.bias, groups=self.d_inner))
        y, next_scan = self._ssm(x, z, br, initial_state=scan_state)
        return F.linear(rearrange(y, "b d l -> b l d"), self.out_proj.weight), next_conv, next_scan


_LIBC: ctypes.CDLL | bool | None = False  # False = not looked up yet


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``) between chunks.

    Why: each chunk allocates many short-lived ~2 MB tensors while a few small results stay
    alive; glibc's heap then fragments and, at 10^5 tokens, RSS grew by ~100 MB per chunk
    although the live tensors stayed small (measured: 23 GB and climbing in the forward pass).
    ``malloc_trim(0)`` releases the free pages anywhere in the heap; a no-op elsewhere.
    """
    global _LIBC
    if _LIBC is False:
        _LIBC = None
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _LIBC = lib if hasattr(lib, "malloc_trim") else None
            except OSError:  # not glibc (e.g. musl): nothing to trim
                _LIBC = None
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _trim_heap_hook(grad: Tensor) -> None:
    _trim_heap()


def _scan_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class BiMamba(Mamba):
    """Bidirectional mixer (MambaMIL ``BiMamba``, Vim-style): second branch on the flipped sequence,
    with its own conv/x_proj/dt_proj/A/D; outputs summed before ``out_proj``."""

    second_branch = True

    def mix(self, xz: Tensor) -> Tensor:
        return self.inner(xz, _MAIN) + self.inner(xz.flip(-1), _SECOND).flip(-1)

    def branch_orders(self, length: int, device: torch.device) -> list[tuple[_Branch, Tensor]]:
        main = torch.arange(length, device=device)
        return [(_MAIN, main), (_SECOND, main.flip(0))]


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

    def branch_orders(self, length: int, device: torch.device) -> list[tuple[_Branch, Tensor]]:
        main = torch.arange(length, device=device)
        order = sr_order((main + 1).view(1, 1, length), self.rate).view(-1) - 1  # -1 = padding
        return [(_MAIN, main), (_SECOND, order)]
