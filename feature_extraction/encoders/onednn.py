"""Eager oneDNN fusion of a convolutional encoder for CPU inference in fp32 (prepared in < 1 s).

What ``torch.compile`` (inductor, frozen weights) does for a CNN on CPU, without its 8–35 s of
compiling: every ``Conv2d`` (BatchNorm already folded into it, see
:func:`~milkit.feature_extraction.encoders.runtimes.fold_batchnorm`) becomes one call of oneDNN's
fused convolution, ``torch.ops.mkldnn._convolution_pointwise``, with

- its weight reordered once into oneDNN's preferred blocked layout for the run's input shape
  (``torch.ops.mkldnn._reorder_convolution_weight``), instead of at every call;
- a following ReLU applied inside the convolution (``attr="relu"``);
- a residual ``conv(x) + shortcut`` (+ ReLU) done inside the convolution, written in place into
  the shortcut when nothing reads the shortcut afterwards (``_convolution_pointwise_.binary``):
  one large tensor fewer to allocate and fault in per residual block.

These are the kernels inductor's generated code calls for resnet50-trunc (read off its output
code with torch 2.14); the arithmetic is the same oneDNN convolution as eager PyTorch's, so the
features agree with the eager fp32 model to float32 rounding (cosine ≥ 0.99999 per tile; a
check in :func:`fuse_for_onednn` refuses anything worse). Measured on the 2-core AVX-512 machine,
resnet50-trunc, batch 32, 2 threads: eager with BatchNorm folded 9.0 patches/s, this fusion
12.5–13.3/s (11.3/s without the in-place residual), ``torch.compile`` 12.8–12.9/s.

The ``mkldnn`` operators are private PyTorch API; a PyTorch without them, or one whose results
differ, makes :func:`fuse_for_onednn` raise, and the caller falls back to the eager model.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

# Worst per-sample cosine accepted between the fused and the eager model on the check input:
# only the summation order may differ (float32), as for the other fp32 paths.
CHECK_COSINE = 0.99999

_ADDS = (operator.add, operator.iadd, torch.add)


class OneDNNConv(nn.Module):
    """One ``Conv2d`` (+ residual add) (+ ReLU) as a single oneDNN call with a prepacked weight.

    ``forward(x)`` → ``act(conv(x))``; ``forward(x, other)`` → ``act(conv(x) + other)``, written
    into ``other`` when :attr:`inplace` (set by :func:`fuse_for_onednn` only where no later node
    reads ``other``). Shapes as the convolution's: (B, C_in, H, W) → (B, C_out, H', W').
    """

    def __init__(self, conv: nn.Conv2d, unary: str, input_shape: list[int]) -> None:
        super().__init__()
        self.conv_args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        weight = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight.detach(), *self.conv_args, input_shape
        )
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.unary = unary  # "relu" or "none"
        self.inplace = False

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        ops = torch.ops.mkldnn
        if other is None:
            return ops._convolution_pointwise(
                x, self.weight, self.bias, *self.conv_args, self.unary, [None], ""
            )
        unary = None if self.unary == "none" else self.unary
        args = (self.weight, self.bias, *self.conv_args, "add", 1.0, unary, [None], "")
        if self.inplace:
            return ops._convolution_pointwise_.binary(other, x, *args)
        return ops._convolution_pointwise.binary(x, other, *args)

    def extra_repr(self) -> str:
        return f"unary={self.unary!r}, inplace={self.inplace}"


def fusable(model: nn.Module) -> bool:
    """True when ``model`` has a ``Conv2d`` that :func:`fuse_for_onednn` can run through oneDNN
    (and this PyTorch has oneDNN)."""
    return torch.backends.mkldnn.is_available() and any(_convertible(m) for m in model.modules())


def fuse_for_onednn(
    model: nn.Module,
    input_size: int,
    batch_size: int,
    *,
    example: torch.Tensor | None = None,
    reference: nn.Module | None = None,
) -> fx.GraphModule:
    """A copy of ``model`` (eval mode, fp32, CPU) with its convolutions fused for oneDNN.

    Args:
        model: maps (B, 3, S, S) float32 to features; BatchNorm should already be folded (a
            BatchNorm left between a convolution and its ReLU keeps that ReLU separate).
        input_size: S, the side of the input images.
        batch_size: the batch the weights are laid out for (other batch sizes run correctly,
            a little slower).
        example: one input (1, 3, S, S), e.g. the run's first tile, that the shapes are
            propagated with and the check runs on (default: a fixed random input).
        reference: the model whose features the fused one must give on ``example`` (default
            ``model``, whose output comes free with the shape pass).

    Returns:
        A ``torch.fx.GraphModule`` with the same inputs and outputs (channels_last in, as the
        encoders' preprocessing gives).

    Raises:
        RuntimeError: ``model`` has nothing to fuse, or the fused model's features differ from
            ``reference``'s on ``example`` (cosine < :data:`CHECK_COSINE`).
        Exception: whatever ``torch.fx`` tracing or the oneDNN operators raise (untraceable
            model, operators missing in this PyTorch).
    """
    if not fusable(model):
        raise RuntimeError("no Conv2d that oneDNN can fuse")
    # A new graph over the same leaf modules: ``model`` itself is left as it is, and no weight
    # is copied (the fused convolutions get their own, reordered ones).
    traced = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    gm = fx.GraphModule(traced, copy.deepcopy(traced.graph))
    example = _check_input(input_size) if example is None else example[:1]
    graph = gm.graph
    modules = dict(gm.named_modules())
    for node in list(graph.nodes):  # timm's drop_block / aa placeholders: nothing to run
        if node.op == "call_module" and type(modules.get(node.target)) is nn.Identity:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    with torch.inference_mode():  # shapes of every node; the output is the check's reference
        want = ShapeProp(gm).propagate(example.clone())
        if reference is not None:
            want = reference(example.clone())
    for node in list(graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if conv is None or not _convertible(conv):
            continue
        _fuse_node(gm, node, conv, modules, batch_size)
    graph.eliminate_dead_code()
    _mark_inplace_residuals(gm)
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    with torch.inference_mode():
        got = gm(example.clone())
    _check_same(want, got)
    return gm


def _convertible(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
    )


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_) and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _shape(node: object) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _fuse_node(
    gm: fx.GraphModule,
    conv_node: fx.Node,
    conv: nn.Conv2d,
    modules: dict[str, nn.Module],
    batch_size: int,
) -> None:
    """Replace ``conv_node`` (and the add / ReLU it feeds alone) by one :class:`OneDNNConv`."""
    graph = gm.graph
    unary, other, last = "none", None, conv_node
    users = list(conv_node.users)
    if len(users) == 1 and _is_relu(users[0], modules):
        unary, last = "relu", users[0]
    elif len(users) == 1 and _is_plain_add(users[0]):
        add = users[0]
        shortcut = add.args[1] if add.args[0] is conv_node else add.args[0]
        # Same shape as the convolution's output: no broadcasting inside oneDNN's binary post-op.
        if isinstance(shortcut, fx.Node) and _shape(shortcut) == _shape(conv_node):
            other, last = shortcut, add
            after = list(add.users)
            if len(after) == 1 and _is_relu(after[0], modules):
                unary, last = "relu", after[0]
    in_shape = list(_shape(conv_node.args[0]) or ())
    if len(in_shape) != 4:
        raise RuntimeError(f"no 4-d input shape for {conv_node.target}")
    in_shape[0] = batch_size
    # One module per call: a Conv2d called twice may be fused differently each time.
    base = f"{str(conv_node.target).replace('.', '_')}_onednn"
    name, k = base, 1
    while hasattr(gm, name):
        name, k = f"{base}_{k}", k + 1
    gm.add_submodule(name, OneDNNConv(conv, unary, in_shape))
    with graph.inserting_after(last):
        args = (conv_node.args[0],) if other is None else (conv_node.args[0], other)
        fused = graph.call_module(name, args)
    fused.meta = dict(last.meta)
    last.replace_all_uses_with(fused)
    replaced = [last]
    if other is not None and last is not users[0]:
        replaced.append(users[0])  # the add, when a ReLU followed it
    if last is not conv_node:
        replaced.append(conv_node)
    for old in replaced:
        graph.erase_node(old)


def _is_plain_add(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target in _ADDS
        and len(node.args) == 2
        and not node.kwargs
        and all(isinstance(a, fx.Node) for a in node.args)
    )


def _mark_inplace_residuals(gm: fx.GraphModule) -> None:
    """Let a residual convolution write into its shortcut when that is safe: the shortcut is a
    fresh tensor made by another fused convolution (not the caller's input, not a view of a
    tensor used later) and no node after this one reads it."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.args) != 2:
            continue
        module = gm.get_submodule(str(node.target))
        other = node.args[1]
        if not isinstance(module, OneDNNConv) or not isinstance(other, fx.Node):
            continue
        maker = gm.get_submodule(str(other.target)) if other.op == "call_module" else None
        later = [u for u in other.users if u is not node and order[u] > order[node]]
        module.inplace = isinstance(maker, OneDNNConv) and not later and node.args[0] is not other


def _check_input(input_size: int) -> torch.Tensor:
    """A fixed random input with the spread of normalised tiles, (1, 3, S, S) channels_last."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, input_size, input_size, generator=gen) * 4 - 2
    return x.contiguous(memory_format=torch.channels_last)


def _check_same(want: torch.Tensor, got: torch.Tensor) -> None:
    """Raise unless ``got`` is ``want`` to float32 rounding (cosine ≥ CHECK_COSINE per sample)."""
    want, got = want.double().flatten(1), got.double().flatten(1)
    cos = F.cosine_similarity(got, want, dim=1) if got.shape == want.shape else torch.zeros(1)
    if not bool(torch.isfinite(got).all()) or cos.min() < CHECK_COSINE:
        raise RuntimeError(
            f"fused model differs from the eager one (worst cosine {cos.min().item():.7f} "
            f"< {CHECK_COSINE})"
        )


__all__ = ["CHECK_COSINE", "OneDNNConv", "fusable", "fuse_for_onednn"]
