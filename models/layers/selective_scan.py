"""Mamba's selective scan in pure PyTorch: a sequential reference and a chunked, memory-bounded path.

Semantics and signature follow mamba-ssm's ``selective_scan_fn`` (Gu & Dao, "Mamba: Linear-Time
Sequence Modeling with Selective State Spaces", arXiv 2312.00752, Alg. 2; repo
state-spaces/mamba, ``mamba_ssm/ops/selective_scan_interface.py``)::

    Δ      = softplus(delta + delta_bias)            (softplus only if delta_softplus)
    h_t    = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t       h ∈ R^{d×n}, zero initial state
    y_t    = C_t h_t + D ⊙ x_t
    out_t  = y_t ⊙ SiLU(z_t)                          (only if z is given)

Shapes: u, delta, z: (b, d, L); A: (d, n) (real, negative for a stable scan); B, C: (b, n, L);
D, delta_bias: (d,). Returns (b, d, L) in the dtype of ``u``; internal math runs in float32 (or
float64 when the inputs are float64), like the CUDA kernel.

Paths:
- ``selective_scan_ref``: the sequential loop, written from the recurrence above; the test oracle.
- ``selective_scan_chunked`` (default off CUDA): the sequence is cut into blocks of ``K`` steps.
  Inside a block, steps are grouped into sub-chunks of ``T`` steps; the ``K/T`` sub-chunks are
  scanned *simultaneously* (a loop of T vectorised steps), then their start states are linked by a
  loop over the K/T sub-chunks, and each local state is corrected by ``exp(cumsum(ΔA)) h_start``.
  All exponents are cumulative sums of ``Δ·A ≤ 0``, so nothing overflows (they are floored at
  ~log(finfo.tiny) to avoid CPU exp's slow underflow path; see ``_EXP_FLOOR``). The block state is
  carried to the next block; for all but tiny inputs each block is a recomputing autograd
  Function (``_CheckpointedBlock``): backward RECOMPUTES the block's states instead of storing
  them, so peak memory is O(b·d·n·K + b·d·L), never O(b·d·n·L). Work is linear in L (no log
  factor); Python iterations per block are 2T + K/T, each on a cache-sized (b, d, K/T, n) tensor.
- CUDA: when tensors are on a CUDA device and ``mamba_ssm`` is importable, its fused kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "cuda_selective_scan_fn",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
]

# Elements of one (b, d, K, n) block the chunked path aims for (~32 MiB in float32); the
# block length K follows from it, clamped to [_MIN_BLOCK, _MAX_BLOCK].
_BLOCK_ELEMENTS = 1 << 23
_MIN_BLOCK, _MAX_BLOCK = 64, 4096
# Below this many state elements (b·d·n·L) a scan keeps its activations (plain autograd, no
# recomputation). Above it every block recomputes: several scans in one model (layers ×
# branches) would otherwise each keep ~8 block-sized activations alive until backward.
_PLAIN_AUTOGRAD_ELEMENTS = 1 << 20


# Floors for the decay exponents (all ≤ 0): exp() of inputs below ~log(finfo.tiny) takes a slow
# underflow/denormal path on CPU (10-25x slower), so exponents are clamped here. The decay then
# becomes exp(floor) (1.8e-35 in float32, 1e-304 in float64) instead of something smaller: an
# absolute change far below float resolution, and the state it multiplies is already forgotten.
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


def _decay(log_decay: Tensor) -> Tensor:
    return torch.exp(log_decay.clamp(min=_EXP_FLOOR[log_decay.dtype]))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(
            f"selective_scan: u and delta must both be (b, d, L), got {tuple(u.shape)} and "
            f"{tuple(delta.shape)}"
        )
    b, d, length = u.shape
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A must be (d={d}, n), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, n, length):
            raise ValueError(
                f"selective_scan: {name} must be (b, n, L) = {(b, n, length)} (input-dependent, "
                f"as in Mamba), got {tuple(t.shape)}"
            )


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, softplus: bool) -> Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(delta.dtype)
    if softplus:
        delta = F.softplus(delta)
    return delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype_in: torch.dtype):
    if D is not None:
        y = y + u * D[..., None].to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_in)


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Sequential reference: one step of the recurrence per position (slow; the oracle)."""
    _check_shapes(u, delta, A, B, C)
    dtype_in = u.dtype
    cdt = _compute_dtype(dtype_in)
    u, delta, A, B, C = (t.to(cdt) for t in (u, delta, A, B, C))
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    b, d, length = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A)  # (b, d, n)
        inp = (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]  # (b, d, n)
        h = decay * h + inp
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1)
    return _finish(y, u, D, z, dtype_in)


def _scan_block(
    u: Tensor, delta: Tensor, B: Tensor, C: Tensor, h0: Tensor, A: Tensor, sub: int
) -> tuple[Tensor, Tensor]:
    """Scan one block of K steps from state ``h0``; return (y (b, d, K), final state (b, d, n)).

    Two levels over ``m = K / sub`` sub-chunks of ``sub`` steps:

    1. all sub-chunks are scanned at once from a zero state (a loop of ``sub`` steps on
       (b, d, m, n) tensors), giving local outputs ``y_loc`` and each sub-chunk's final state;
    2. the sub-chunk start states ``s_j`` are linked by a loop over the m sub-chunks, and every
       output gets the start-state contribution ``Σ_n C_tn exp(A_dn Σ_{s≤t} Δ_s) s_j``: a
       cumulative sum of Δ ≥ 0 times A < 0, so every exponent is ≤ 0 and nothing overflows.

    The (b, d, K, n) decays and inputs are formed one step at a time on (b, d, m, n) tensors that
    stay in cache; nothing of size (b, d, K, n) is materialised in one piece.
    """
    b, d, k = u.shape
    n = A.shape[1]
    pad = -k % sub
    if pad:  # identity steps (Δ = 0: decay 1, input 0) at the end; their outputs are cropped
        u, delta = F.pad(u, (0, pad)), F.pad(delta, (0, pad))
        B, C = F.pad(B, (0, pad)), F.pad(C, (0, pad))
    m = (k + pad) // sub
    dl = delta.view(b, d, m, sub)
    du = (delta * u).view(b, d, m, sub)
    bt = B.view(b, n, m, sub).permute(0, 2, 3, 1)  # (b, m, T, n)
    ct = C.view(b, n, m, sub).permute(0, 2, 3, 1)  # (b, m, T, n)
    a_mat = A[:, None, :]  # (d, 1, n)
    # level 1: every sub-chunk from a zero state, all sub-chunks at once. ``unbind`` (not
    # indexing) so backward stacks the step gradients once instead of scattering each one into
    # a full-size zero tensor.
    h = torch.zeros(b, d, m, n, dtype=u.dtype, device=u.device)
    y_steps = []
    steps = zip(dl.unbind(3), du.unbind(3), bt.unbind(2), ct.unbind(2), strict=True)
    for dl_t, du_t, b_t, c_t in steps:
        h = _decay(dl_t[..., None] * a_mat) * h + du_t[..., None] * b_t[:, None]
        y_steps.append((h * c_t[:, None]).sum(-1))
    y_loc = torch.stack(y_steps, dim=-1)  # (b, d, m, T)
    # level 2: link the sub-chunk start states
    cum = torch.cumsum(dl, dim=-1)  # (b, d, m, T), Σ_{s≤t} Δ_s within the sub-chunk
    total = _decay(cum[..., -1, None] * a_mat)  # (b, d, m, n) decay over each sub-chunk
    starts = []
    state = h0
    for total_j, last_j in zip(total.unbind(2), h.unbind(2), strict=True):
        starts.append(state)
        state = total_j * state + last_j
    h_start = torch.stack(starts, dim=2)  # (b, d, m, n)
    # start-state contribution, again one step at a time: small (b, d, m, n) tensors stay in
    # cache, whereas one (b, d, m, T, n) tensor per block made this several times slower
    y_start = [
        (_decay(cum_t[..., None] * a_mat) * h_start * c_t[:, None]).sum(-1)
        for cum_t, c_t in zip(cum.unbind(3), ct.unbind(2), strict=True)
    ]
    y = (y_loc + torch.stack(y_start, dim=-1)).reshape(b, d, m * sub)
    return y[..., :k], state


class _CheckpointedBlock(torch.autograd.Function):
    """``_scan_block`` that stores only its inputs and recomputes the block in backward.

    Like reentrant activation checkpointing, but it differentiates the recomputed block with
    ``torch.autograd.grad``, so it also works under an outer ``torch.autograd.grad``. (PyTorch's
    non-reentrant checkpoint kept ~O(K·d·n) per block alive here, i.e. O(L·d·n) in total.)
    """

    @staticmethod
    def forward(ctx, u, delta, B, C, h0, A, sub):  # autograd.Function API
        ctx.sub = sub
        ctx.save_for_backward(u, delta, B, C, h0, A)
        with torch.no_grad():
            return _scan_block(u, delta, B, C, h0, A, sub)

    @staticmethod
    def backward(ctx, grad_y, grad_state):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
        with torch.enable_grad():
            y, state = _scan_block(*inputs, ctx.sub)
            grads = torch.autograd.grad(
                (y, state),
                [inputs[i] for i in wanted],
                (grad_y, grad_state),
                allow_unused=True,
            )
        out: list[Tensor | None] = [None] * (len(inputs) + 1)
        for i, g in zip(wanted, grads, strict=True):
            out[i] = g
        return tuple(out)


def _block_length(b: int, d: int, n: int, length: int) -> int:
    k = _BLOCK_ELEMENTS // max(1, b * d * n)
    k = max(_MIN_BLOCK, min(_MAX_BLOCK, k))
    return min(k, length)


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    block_size: int | None = None,
    sub_chunk: int | None = None,
    initial_state: Tensor | None = None,
    return_last_state: bool = False,
    recompute_blocks: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked, checkpointed pure-PyTorch selective scan (see the module docstring).

    Args:
        block_size: steps per checkpointed block K (default: ~8M state elements per block).
        sub_chunk: steps per sub-chunk T inside a block (default ≈ √K, a power of two).
        initial_state: (b, d, n) state h_0 to start from (default zeros); lets a caller scan a
            long sequence piece by piece, carrying the state (``Mamba``'s low-memory path).
        return_last_state: also return the final state (b, d, n) in the compute dtype, like
            mamba-ssm's ``return_last_state``.
        recompute_blocks: force (True) or forbid (False) the recomputing blocks; None = by size.
            A caller that already checkpoints the whole call passes False, so backward does not
            recompute the scan twice.
    """
    _check_shapes(u, delta, A, B, C)
    dtype_in = u.dtype
    cdt = _compute_dtype(dtype_in)
    u_c, delta, A_c, B_c, C_c = (t.to(cdt) for t in (u, delta, A, B, C))
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    b, d, length = u_c.shape
    n = A_c.shape[1]
    k = block_size or _block_length(b, d, n, length)
    k = max(1, min(int(k), length))
    sub = sub_chunk or 2 ** max(0, round(math.log2(math.sqrt(k))))
    sub = max(1, min(int(sub), k))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u_c, delta, A_c, B_c, C_c))
    if initial_state is None:
        state = u_c.new_zeros(b, d, n)
    else:
        if tuple(initial_state.shape) != (b, d, n):
            raise ValueError(
                f"selective_scan: initial_state must be (b, d, n) = {(b, d, n)}, got "
                f"{tuple(initial_state.shape)}"
            )
        state = initial_state.to(cdt)
        grad = grad or (torch.is_grad_enabled() and state.requires_grad)
    ys = []
    for start in range(0, length, k):
        sl = slice(start, min(start + k, length))
        args = (u_c[..., sl], delta[..., sl], B_c[..., sl], C_c[..., sl], state, A_c, sub)
        if recompute_blocks is None:
            recompute = b * d * n * length > _PLAIN_AUTOGRAD_ELEMENTS
        else:
            recompute = recompute_blocks
        if grad and recompute:
            y, state = _CheckpointedBlock.apply(*args)
        else:
            y, state = _scan_block(*args)
        ys.append(y)
    y = torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]
    out = _finish(y, u_c, D, z, dtype_in)
    return (out, state) if return_last_state else out


def cuda_selective_scan_fn() -> Callable[..., Tensor] | None:
    """mamba-ssm's fused ``selective_scan_fn`` when importable (CUDA builds only), else None."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # any import failure (no CUDA build, ABI mismatch) = absent
        return None
    return selective_scan_fn


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    backend: str = "auto",
) -> Tensor:
    """Selective scan with mamba-ssm's ``selective_scan_fn`` signature; picks the fastest path.

    Args:
        backend: ``"auto"`` (CUDA kernel on CUDA tensors when mamba-ssm is importable, else the
            chunked PyTorch scan), ``"cuda"`` (require the kernel), ``"torch"`` (chunked) or
            ``"ref"`` (sequential reference).
    """
    if backend not in ("auto", "cuda", "torch", "ref"):
        raise ValueError(
            f"selective_scan: backend must be 'auto', 'cuda', 'torch' or 'ref', got {backend!r}"
        )
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend in ("auto", "cuda") and u.is_cuda:
        fn = cuda_selective_scan_fn()
        if fn is not None:
            return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend == "cuda":
        raise RuntimeError(
            "selective_scan: backend='cuda' needs CUDA tensors and an importable mamba-ssm "
            "(pip install 'milkit[cuda]'); use backend='auto' to fall back to PyTorch"
        )
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
