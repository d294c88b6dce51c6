"""Patch-encoder registry: names → (builder, :class:`EncoderCfg`), like timm's model registry.

Each encoder family registers a builder ``fn(cfg, weights_path | None) -> nn.Module`` whose
module maps a normalised float batch (B, 3, S, S) to features (B, D). :func:`create_encoder`
resolves the weights (``--weights FILE``, the Hugging Face cache or torch hub's checkpoints,
offline only), builds the module and wraps it in :class:`PatchEncoder`, which turns uint8 tile
batches into features with batched tensor ops (resize, normalise, channels_last) under the
requested autocast precision.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from milkit.errors import MilkitError, one_line, refused_global

PRECISIONS = ("fp32", "fp16", "bf16")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision/timm ImageNet constants
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderCfg:
    """Everything needed to run a patch encoder and to record its provenance.

    Attributes:
        name: registry name (lowercase, hyphenated).
        embed_dim: output feature dimension D.
        input_size: square input side in pixels after resizing.
        mean, std: per-channel normalisation on [0, 1] RGB.
        precision: the precision the authors/TRIDENT run it in on GPU (fp32/fp16/bf16).
        hub_id: Hugging Face repository holding the weights (None: weight-free).
        weights_file: file name inside ``hub_id``.
        license: weight licence (gated models need the user's own acceptance).
        paper: citation of the model.
        weights_required: False only for weight-free encoders.
        interpolation: resize mode used by the official transform.
        cpu_amp: run under bf16 autocast on CPU when precision is ``auto``.
        cpu_fuse: on CPU in fp32 (torch runtime, ``compile="auto"``), run the convolutions as
            prepacked oneDNN calls with BatchNorm, ReLU and residual adds fused in
            (:mod:`~milkit.feature_extraction.encoders.onednn`), on runs of any length, instead
            of ``torch.compile`` for long runs. Set only for encoders where it was measured.
    """

    name: str
    embed_dim: int
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    precision: str = "fp32"
    hub_id: str | None = None
    weights_file: str | None = None
    license: str = ""
    paper: str = ""
    weights_required: bool = True
    interpolation: str = "bilinear"
    cpu_amp: bool = True
    cpu_fuse: bool = False
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Builder = Callable[[EncoderCfg, "Path | None"], nn.Module]
_REGISTRY: dict[str, tuple[Builder, EncoderCfg]] = {}


def register_encoder(cfg: EncoderCfg) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` under ``cfg.name`` (stackable for variants)."""

    def deco(builder: Builder) -> Builder:
        if cfg.name in _REGISTRY:
            raise ValueError(f"encoder {cfg.name!r} registered twice")
        if cfg.precision not in PRECISIONS:
            raise ValueError(f"encoder {cfg.name!r}: precision must be one of {PRECISIONS}")
        _REGISTRY[cfg.name] = (builder, cfg)
        return builder

    return deco


def list_encoders(pattern: str | None = None) -> list[str]:
    """Registered encoder names, optionally filtered by a shell pattern (``"uni*"``)."""
    names = sorted(_REGISTRY)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def get_encoder_cfg(name: str) -> EncoderCfg:
    """The :class:`EncoderCfg` of a registered encoder; unknown names list close matches."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f"Did you mean {', '.join(close)}? " if close else ""
        raise MilkitError(
            "unknown encoder",
            value=name,
            hint=f"{hint}Available: {', '.join(list_encoders())}",
        )
    return _REGISTRY[name][1]


# ---------------------------------------------------------------------------- weights


def resolve_weights(cfg: EncoderCfg, weights: str | os.PathLike[str] | None) -> Path | None:
    """Local weight file for ``cfg``: ``weights`` if given, else the Hugging Face cache, else
    (encoders that declare ``extra["torch_hub_files"]``) torch hub's checkpoint folder.

    Never touches the network: the Hugging Face cache is looked up with
    ``try_to_load_from_cache`` (``HF_HUB_CACHE``, default ``$HF_HOME/hub``), torch hub's folder is
    ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``, where torchvision's
    ``resnet50(weights=...)`` and CLAM's ``model_zoo.load_url`` put their downloads).

    Raises:
        MilkitError: ``weights`` is not a file, or no weights were found; the message lists every
            place searched (and files seen there but not used, with the reason).
    """
    if not cfg.weights_required:
        if weights is not None:
            raise MilkitError(
                f"encoder {cfg.name!r} has no weights; do not pass --weights",
                value=str(weights),
            )
        return None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MilkitError(
                f"weights file for encoder {cfg.name!r} not found",
                path=path,
                hint=_download_hint(cfg),
            )
        return path
    searched: list[str] = []
    found = _hf_cached_file(cfg, searched) or _torch_hub_file(cfg, searched)
    if found is not None:
        return found
    raise MilkitError(
        f"no weights found for encoder {cfg.name!r}; looked in: " + "; ".join(searched),
        hint=_download_hint(cfg),
    )


def _download_hint(cfg: EncoderCfg) -> str:
    gated = " (gated: accept the licence on the model page first)" if "gated" in cfg.license else ""
    hint = (
        f"Pass --weights FILE, or download it once{gated} with "
        f"`huggingface-cli download {cfg.hub_id} {cfg.weights_file}` and rerun (milkit reads the "
        "cache offline, HF_HUB_OFFLINE=1 is fine)"
    )
    if cfg.extra.get("torch_hub_download"):
        hint += f", or fill torch hub's cache with `{cfg.extra['torch_hub_download']}`"
    return hint


def _hf_cached_file(cfg: EncoderCfg, searched: list[str]) -> Path | None:
    """The weight file in the Hugging Face cache (offline lookup); records what was searched."""
    if not cfg.hub_id or not cfg.weights_file:
        return None
    repos = [cfg.hub_id, *cfg.extra.get("alt_hub_ids", ())]  # the cache folder keeps the case
    names = [cfg.weights_file, *cfg.extra.get("alt_weights_files", ())]
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # a base dependency; a broken install must not pass for "searched"
        searched.append(
            "the Hugging Face cache was NOT searched: huggingface_hub is not installed "
            "(pip install huggingface_hub)"
        )
        return None
    files = ", ".join(f"{r}/{n}" for r in repos for n in names)
    searched.append(f"the Hugging Face cache {constants.HF_HUB_CACHE} for {files}")
    for repo in repos:
        for fname in names:
            found = try_to_load_from_cache(repo_id=repo, filename=fname)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    return None


def _torch_hub_file(cfg: EncoderCfg, searched: list[str]) -> Path | None:
    """A file of ``cfg.extra["torch_hub_files"]`` in ``torch.hub.get_dir()/checkpoints``.

    Other files matching ``cfg.extra["torch_hub_pattern"]`` there are not used (e.g.
    torchvision's ImageNet V2 ResNet-50, other weights than CLAM's); they are named in
    ``searched`` with the reason, so that the error says why they were passed over.
    """
    wanted: tuple[str, ...] = tuple(cfg.extra.get("torch_hub_files", ()))
    if not wanted:
        return None
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    searched.append(f"torch hub's checkpoints {folder} for {', '.join(wanted)}")
    for name in wanted:
        if (folder / name).is_file():
            return folder / name
    pattern = cfg.extra.get("torch_hub_pattern")
    others = sorted(folder.glob(pattern)) if pattern and folder.is_dir() else []
    known: dict[str, str] = dict(cfg.extra.get("torch_hub_not_used", {}))
    for other in others:
        why = known.get(other.name, "not a known file of these weights")
        searched.append(f"{other} found but not used ({why}; pass --weights to use it anyway)")
    return None


def file_sha256(path: str | os.PathLike[str], chunk: int = 8 * 1024 * 1024) -> str:
    """SHA-256 hex digest of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint (``.safetensors`` or a torch pickle, loaded with ``weights_only``).

    Unwraps the common containers (``{"state_dict": ...}``, ``{"model": ...}``) and a DDP
    ``module.`` prefix, so checkpoints saved by training scripts load too.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused a global: name it, one line
        what = refused_global(err)
        raise MilkitError(
            "refusing to load weights file: it holds Python objects other than tensors and plain "
            f"values{f' ({what})' if what else ''} (loading it could run code)",
            path=path,
            hint="Only load files you trust; re-save the weights as a state_dict "
            "(torch.save(model.state_dict(), ...)) or a .safetensors file",
        ) from None
    except Exception as err:  # any other decode failure is a user-facing bad file
        raise MilkitError(
            f"cannot read weights file ({type(err).__name__}: {one_line(str(err), limit=200)})",
            path=path,
            hint="Pass a PyTorch state_dict (.bin/.pth/.pt) or a .safetensors file",
        ) from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MilkitError("weights file does not hold a state_dict of tensors", path=path)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_strict(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    path: Path,
    *,
    encoder: str,
    ignore_missing: tuple[str, ...] = (),
    ignore_unexpected: tuple[str, ...] = (),
) -> None:
    """Load ``state_dict`` strictly; only keys with the listed prefixes may be absent/extra.

    A mismatch (wrong model, wrong file) raises a :class:`MilkitError` listing the first
    offending keys, instead of silently running an encoder with random layers.
    """
    from milkit.io.checkpoint import state_dict_mismatch

    own = module.state_dict()
    missing, unexpected, misshapen = state_dict_mismatch(
        own, state_dict, ignore_missing=ignore_missing, ignore_unexpected=ignore_unexpected
    )
    shape_bad = [f"{k} {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}" for k in misshapen]
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys e.g. {unexpected[:3]}")
        if shape_bad:
            parts.append(f"{len(shape_bad)} shape mismatches e.g. {shape_bad[:2]}")
        raise MilkitError(
            f"weights do not match encoder {encoder!r}: " + "; ".join(parts),
            path=path,
            hint=f"Check that the file is the {encoder} checkpoint",
        )
    filtered = {k: v for k, v in state_dict.items() if k in own}
    module.load_state_dict(filtered, strict=False)


# ---------------------------------------------------------------------------- runtime wrapper

# Tiles in a run from which compile="auto" compiles an encoder without ``cpu_fuse`` (see
# PatchEncoder.prepare).
COMPILE_MIN_TILES = 2000
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_precision(cfg: EncoderCfg, device: torch.device, requested: str = "auto") -> str:
    """Autocast precision to run with; ``auto`` never goes below the encoder's declared precision.

    ``auto``: an encoder declared fp32 (``resnet50-trunc`` "as CLAM", ``fast``) always runs in
    fp32; a half-precision encoder runs at its declared precision on CUDA and, on CPU, in bf16
    where the CPU has native bf16, else fp32. Any other value is used as asked.
    """
    if requested != "auto":
        if requested not in (*PRECISIONS, "int8"):
            raise MilkitError("precision must be auto, fp32, fp16, bf16 or int8", value=requested)
        if device.type == "cpu" and requested == "fp16":
            raise MilkitError(
                "fp16 autocast is not supported on CPU", value=requested, hint="Use bf16 or fp32"
            )
        return requested
    if device.type == "cuda" or cfg.precision == "fp32":
        return cfg.precision  # a declared-fp32 encoder is fp32 unless the user asks otherwise
    # Half-precision encoders on CPUs with native bf16 (AVX512-BF16 / AMX): bf16 autocast is
    # several times faster. Without it bf16 is emulated and ~5x *slower* (measured on a CPU
    # without AVX512-BF16), so fp32. Weight-free encoders always stay fp32.
    if cfg.cpu_amp and cfg.weights_required and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX tiles)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


class PatchEncoder(nn.Module):
    """A built encoder plus its transforms: uint8 (B, H, W, 3) tiles → float32 (B, D).

    Args:
        model: maps normalised (B, 3, S, S) float to (B, D).
        cfg: the encoder's configuration.
        weights_path: the weight file used (provenance), None for weight-free encoders.
    """

    def __init__(self, model: nn.Module, cfg: EncoderCfg, weights_path: Path | None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.weights_path = weights_path
        self.precision = "fp32"
        self.runtime = "torch"  # or an opt-in CPU runtime (see encoders.runtimes)
        # torch runtime on CPU in fp32, see prepare(): "auto" (oneDNN fusion for cpu_fuse
        # encoders, torch.compile for long runs of the others), "on" (torch.compile), "off".
        self.compile = "off"
        self.fused = False  # the runner is the oneDNN-fused graph (encoders.onednn)
        self._fuse_batch = 0  # > 0: fuse on the first batch, weights laid out for this size
        self._fuse_failed = False
        # What runs the batches when it is not ``model`` itself (BatchNorm folded, compiled, or
        # another runtime); kept in a tuple so that it is not a second copy in the state_dict.
        self._runner: tuple[nn.Module, ...] = ()
        self._eager: tuple[nn.Module, ...] = ()  # the uncompiled runner while compiled
        self._compiled_batch = 0
        self._run_tiles = 0  # tiles announced to prepare() so far in this run
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255.0, False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1) * 255.0, False)
        self._sha256: str | None = None

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def weights_sha256(self) -> str | None:
        """SHA-256 of the weight file (computed once, lazily)."""
        if self.weights_path is None:
            return None
        if self._sha256 is None:
            self._sha256 = file_sha256(self.weights_path)
        return self._sha256

    def preprocess(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) → normalised float (B, 3, S, S), channels_last, on the device."""
        if tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError(f"expected uint8 tiles (B, H, W, 3), got {tuple(tiles.shape)}")
        x = tiles.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # channels_last view
        size = self.cfg.input_size
        if x.shape[-2:] != (size, size):
            mode = self.cfg.interpolation
            if not (mode == "bilinear" and x.device.type == "cpu"):
                x = x.float()  # uint8 fast path exists for antialiased bilinear on CPU only
            # Resizing uint8 (as torchvision/PIL transforms do) is ~10x faster than float.
            x = F.interpolate(x, size=(size, size), mode=mode, antialias=True, align_corners=False)
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    @property
    def compiled(self) -> bool:
        """True once :meth:`prepare` has compiled the model with ``torch.compile``."""
        return bool(self._eager)

    @property
    def execution(self) -> str:
        """What encodes the batches, as recorded in the bag: ``eager`` (PyTorch; on CPU with
        BatchNorm folded), ``onednn-fused``, ``torch.compile``, or the other runtime's name."""
        if self.runtime != "torch":
            return self.runtime
        if self.compiled:
            return "torch.compile"
        return "onednn-fused" if self.fused else "eager"

    @property
    def runner(self) -> nn.Module:
        """The module that encodes batches: ``model``, or its optimised stand-in."""
        return self._runner[0] if self._runner else self.model

    def set_runner(self, module: nn.Module) -> None:
        """Run batches with ``module`` (same features as ``model``) instead of ``model``."""
        self._runner = (module,)

    def prepare(self, n_tiles: int, batch_size: int) -> None:
        """Called before encoding ``n_tiles`` more tiles (one slide) in batches of ``batch_size``;
        readies the fastest fp32 CPU execution that pays off for the run so far.

        Only the torch runtime on CPU in fp32; ``compile="off"`` keeps the eager model
        (BatchNorm folded). The rule, from measurements of resnet50-trunc on the 2-core AVX-512
        machine (2 threads; eager 8.5–9.2 patches/s in the loop):

        - ``compile="auto"`` and an encoder with ``cfg.cpu_fuse`` (resnet50-trunc): the oneDNN
          fusion (:func:`~milkit.feature_extraction.encoders.onednn.fuse_for_onednn`), whatever
          the run's length, built on the first batch and checked on its first tile (the only
          extra work: that tile through the eager and the fused model, and laying out the
          weights; the run's preparation is 1.1–1.2 s against eager's 0.5–0.7 s, first
          oneDNN kernels included, in benchmarks/bench_extract.py): 12.5–13.3/s in the loop,
          as fast as ``torch.compile`` (12.8–12.9/s; 11.8 vs 11.5/s end to end), which takes
          8 s (cached) to 18–35 s (cold) to compile, so compiling never pays off for it.
        - ``compile="auto"``, other encoders: ``torch.compile`` (inductor, frozen weights) once
          the run's slides so far (this one included) add up to :data:`COMPILE_MIN_TILES`
          tiles, so a cohort of small slides is compiled too; ``compile="on"``: at once.

        Later calls are no-ops. A preparation that fails (oneDNN operators missing or giving
        other numbers, no C++ compiler, an unsupported operator) warns and keeps the eager
        model (a failed fusion still lets ``auto`` compile a long run): the features are the
        same either way (cosine ≥ 0.99999 per tile, tests/feature_extraction/test_fast_path.py).
        """
        self._run_tiles += n_tiles
        if self.compiled or self.fused or self._fuse_batch:
            return
        if self.compile == "off" or self.runtime != "torch":
            return
        if self.device.type != "cpu" or self.precision != "fp32":
            return
        if self.compile == "auto" and self.cfg.cpu_fuse and not self._fuse_failed:
            self._fuse_batch = batch_size  # forward() fuses on the first batch
            return
        if self.compile == "auto" and (
            self._run_tiles < COMPILE_MIN_TILES or not self.cfg.weights_required
        ):
            return
        import torch._inductor.config as inductor_config

        # Frozen weights let inductor fold BatchNorm into the convolutions and pre-pack the
        # oneDNN weights once.
        inductor_config.freezing = True
        eager = self.runner
        compiled = torch.compile(eager, dynamic=False)
        example = torch.zeros(batch_size, 3, self.cfg.input_size, self.cfg.input_size)
        try:
            with torch.inference_mode():
                compiled(example.contiguous(memory_format=torch.channels_last))
        except Exception as err:  # any backend failure: eager gives the same features
            _warn_eager(f"torch.compile of encoder {self.cfg.name!r}", err)
            self.compile = "off"
            return
        self._eager, self._compiled_batch = (eager,), batch_size
        self.set_runner(compiled)

    def _fuse_on(self, x: torch.Tensor) -> torch.Tensor:
        """Features of the first batch ``x``, by the oneDNN-fused graph of the (BatchNorm-folded)
        runner, which from now on runs every batch; checked first against that runner on the
        batch's first tile (the folding itself: test_fast_path). A failure warns, and the
        batch and the run stay eager."""
        from milkit.feature_extraction.encoders.onednn import fuse_for_onednn

        batch, self._fuse_batch = self._fuse_batch, 0
        try:
            fused = fuse_for_onednn(self.runner, self.cfg.input_size, batch, example=x[:1])
            out = fused(x)
        except Exception as err:  # eager gives the same features, only slower
            _warn_eager(f"oneDNN fusion of encoder {self.cfg.name!r}", err)
            self._fuse_failed = True
            return self.runner(x)
        self.set_runner(fused)
        self.fused = True
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of a preprocessed batch, under autocast at ``self.precision``, as float32."""
        b = x.shape[0]
        if self._fuse_batch:
            return self._fuse_on(x).float()
        full = self._compiled_batch
        if self.compiled and full // 2 <= b < full:
            # One static shape: a short last batch is padded instead of compiled again.
            pad = x.new_zeros((full - b, *x.shape[1:]))
            x = torch.cat([x, pad]).contiguous(memory_format=torch.channels_last)
        if self.compiled and not full // 2 <= b <= full:
            out = self._eager[0](x)  # a few tiles (small slide) or a bigger batch: eager
        elif self.precision == "fp32" or self.runtime != "torch":
            out = self.runner(x)[:b]
        else:
            with torch.autocast(self.device.type, dtype=_DTYPES[self.precision]):
                out = self.runner(x)
        return out.float()[:b]

    @torch.inference_mode()
    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) tiles → float32 (B, D) features on the CPU."""
        return self(self.preprocess(tiles)).cpu()

    def features_attrs(self) -> dict[str, Any]:
        """Provenance stored on the bag's ``features`` dataset (docs/architecture.md §4)."""
        return {
            "encoder": self.cfg.name,
            "name": self.cfg.name,  # TRIDENT's key
            "embed_dim": self.cfg.embed_dim,
            "encoder_precision": self.precision,
            "encoder_runtime": self.runtime,
            "encoder_compiled": self.compiled,
            "encoder_execution": self.execution,
            "encoder_input_size": self.cfg.input_size,
            "encoder_weights_sha256": self.weights_sha256,
            "encoder_weights_file": None if self.weights_path is None else self.weights_path.name,
            "encoder_hub_id": self.cfg.hub_id,
        }


def _warn_eager(what: str, err: Exception) -> None:
    import warnings

    first = str(err).splitlines()[0] if str(err) else ""
    warnings.warn(
        f"{what} failed ({type(err).__name__}: {first}); running it eagerly",
        RuntimeWarning,
        stacklevel=3,
    )


def create_encoder(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    runtime: str = "torch",
    compile: str = "auto",
) -> tuple[PatchEncoder, EncoderCfg]:
    """Build a registered encoder in eval mode on ``device``.

    Args:
        name: registry name (see :func:`list_encoders`).
        weights: local checkpoint; default looks in the Hugging Face cache (offline).
        device: ``cpu``, ``cuda``, ``cuda:1``, ...
        precision: ``auto`` (see :func:`resolve_precision`: declared-fp32 encoders stay fp32),
            ``fp32``, ``fp16``, ``bf16``, or ``int8`` (``runtime="onnxruntime"`` only).
        runtime: ``torch`` (default), or an opt-in CPU runtime, ``onnxruntime`` (fp32, int8) or
            ``openvino`` (fp32, or bf16 on CPUs with native bf16); see
            :mod:`~milkit.feature_extraction.encoders.runtimes`.
        compile: ``auto`` / ``on`` / ``off``: how the torch runtime runs on CPU in fp32 —
            ``auto``: oneDNN fusion for encoders with ``cpu_fuse`` (resnet50-trunc), else
            ``torch.compile`` once the run reaches :data:`COMPILE_MIN_TILES` tiles; ``on``:
            ``torch.compile``; ``off``: eager (see :meth:`PatchEncoder.prepare`, called by the
            extraction with the run size).

    Raises:
        MilkitError: unknown name, missing weights, a runtime that is not installed or cannot
            run the precision on the device.

    Returns:
        ``(encoder, cfg)``; ``encoder.encode(uint8 tiles)`` gives float32 features.
    """
    from milkit.feature_extraction.encoders.runtimes import (
        check_runtime,
        compile_for_runtime,
        fold_batchnorm,
    )

    cfg = get_encoder_cfg(name)
    dev = torch.device(device)
    # Every argument is checked before weights are read or a model is built; argument errors
    # (a precision the runtime cannot run) come before "not installed".
    if compile not in ("auto", "on", "off"):
        raise MilkitError("compile must be auto, on or off", value=compile)
    resolved = resolve_precision(cfg, dev, precision)
    if runtime == "onnxruntime" and precision == "auto":
        resolved = "fp32"  # its CPU kernels are fp32
    check_runtime(runtime, dev, resolved)
    builder = _REGISTRY[name][0]
    path = resolve_weights(cfg, weights)
    enc = PatchEncoder(builder(cfg, path), cfg, path)
    enc.precision, enc.runtime, enc.compile = resolved, runtime, compile
    enc = enc.to(dev).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    if runtime == "torch":
        enc.model.to(memory_format=torch.channels_last)
        if dev.type == "cpu":
            enc.set_runner(fold_batchnorm(enc.model).to(memory_format=torch.channels_last))
    else:
        from milkit.feature_extraction.encoders.runtimes import calibration_tiles

        calib = enc.preprocess(calibration_tiles()).cpu() if resolved == "int8" else None
        enc.set_runner(compile_for_runtime(enc.model, runtime, resolved, cfg.input_size, calib))
    return enc, cfg
