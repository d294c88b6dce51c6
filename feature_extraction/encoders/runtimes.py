"""Opt-in CPU runtimes for patch encoders: ONNX Runtime and OpenVINO (``--runtime``).

The default runtime is ``torch`` (eager PyTorch, oneDNN kernels). On CPU, two well-kept
inference runtimes run the same network faster: the encoder (already built, weights loaded, in
eval mode) is handed over once per run (OpenVINO: ``openvino.convert_model`` on the module; ONNX
Runtime: ``torch.onnx.export`` to a temporary file, opset 17) and every batch then runs there.

- ``onnxruntime``: fp32, or int8 (``--precision int8``): static post-training quantisation
  (``onnxruntime.quantization.quantize_static``: QDQ, int8 weights per output channel, uint8
  activations with MinMax ranges) calibrated on 16 fixed synthetic H&E tiles
  (:func:`calibration_tiles`), so the quantised model, hence every feature, is the same in every
  run and on every slide. Measured with a random-weight resnet50-trunc (the only weights here):
  worst per-tile cosine 0.9998 to fp32 on the real tiles of CMU-1-Small-Region, ~3x the fp32
  speed. Trained weights have other activation ranges; the test holds the bound for the weights
  it has, not for every checkpoint (see README).
  No bf16 (the CPU execution provider has no bf16 kernels worth using).
- ``openvino``: fp32, or bf16 where the CPU runs bf16 natively (AVX512-BF16 / AMX); the
  precision is set explicitly (``INFERENCE_PRECISION_HINT``), so fp32 never silently becomes
  bf16 on CPUs where OpenVINO would default to it, and the precision actually used is read back
  from the compiled model.

Both use ``torch.get_num_threads()`` threads for one batch at a time (latency mode), i.e. the
same threads as the torch runtime. Features agree with the torch fp32 reference within cosine
≥ 0.999 per tile (fp32: ≥ 0.99999; tests/feature_extraction/test_fast_path.py holds it).
Install with ``pip install 'milkit[fast-cpu]'``.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from milkit.errors import MilkitError

RUNTIMES = ("torch", "onnxruntime", "openvino")
# Precisions each runtime can run (before the CPU's own bf16 check).
RUNTIME_PRECISIONS = {
    "torch": ("fp32", "fp16", "bf16"),
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "bf16"),
}
# Modules each runtime needs (torch.onnx.export needs the onnx package).
_NEEDS = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino",)}


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` (eval mode) with every BatchNorm that directly follows a convolution folded
    into that convolution's weights and bias (torch.fx ``optimization.fuse``).

    One kernel less per convolution: ~1.15x faster resnet50-trunc on CPU, same features
    (cosine ≥ 0.9999998 per tile). Models without BatchNorm, or that torch.fx cannot trace,
    are returned unchanged.
    """
    if model.training or not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model, inplace=False)
    except Exception:  # untraceable (data-dependent control flow): run it as it is
        return model


def check_runtime(runtime: str, device: torch.device, precision: str) -> None:
    """Raise a :class:`MilkitError` when ``runtime`` cannot run ``precision`` on ``device``."""
    if runtime not in RUNTIMES:
        raise MilkitError(
            "unknown runtime", value=runtime, hint=f"Use one of {', '.join(RUNTIMES)}"
        )
    if runtime == "torch":
        if precision == "int8":
            raise MilkitError(
                "int8 runs with --runtime onnxruntime only",
                value=precision,
                hint="Add --runtime onnxruntime (pip install 'milkit[fast-cpu]')",
            )
        return
    if device.type != "cpu":
        raise MilkitError(
            f"runtime {runtime!r} runs on CPU only",
            value=str(device),
            hint="Use --device cpu, or --runtime torch on a GPU",
        )
    if precision not in RUNTIME_PRECISIONS[runtime]:
        ok = ", ".join(RUNTIME_PRECISIONS[runtime])
        raise MilkitError(
            f"runtime {runtime!r} runs {ok} only",
            value=precision,
            hint="Use --runtime openvino for bf16, or --runtime torch",
        )
    for module in _NEEDS[runtime]:
        try:
            __import__(module)
        except ImportError as err:
            raise MilkitError(
                f"runtime {runtime!r} is not installed (no module {module!r})",
                hint=f"pip install {' '.join(_NEEDS[runtime])}  (or pip install 'milkit[fast-cpu]')",
            ) from err


class RuntimeModel(nn.Module):
    """A network compiled for another runtime: float (B, 3, S, S) → float32 (B, D).

    Attributes:
        runtime: ``onnxruntime`` or ``openvino``.
        precision: the precision the runtime actually runs at (read back where it can be).
    """

    def __init__(self, runtime: str, precision: str, run: Callable[[np.ndarray], np.ndarray]):
        super().__init__()
        self.runtime = runtime
        self.precision = precision
        self._run = run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())  # NCHW
        return torch.from_numpy(np.array(self._run(arr), dtype=np.float32, copy=True))


def compile_for_runtime(
    model: nn.Module,
    runtime: str,
    precision: str,
    input_size: int,
    calibration: torch.Tensor | None = None,
) -> RuntimeModel:
    """Hand ``model`` (eval mode, on CPU) to ``runtime`` at ``precision``; see module docstring.

    ``calibration``: normalised (B, 3, S, S) inputs the int8 activation ranges are set on
    (required for int8).

    Raises:
        MilkitError: the runtime is missing, cannot run ``precision``, or the CPU lacks native
            bf16 for an OpenVINO bf16 run.
    """
    check_runtime(runtime, torch.device("cpu"), precision)
    model = model.float().eval().to(memory_format=torch.contiguous_format)
    example = torch.zeros(1, 3, input_size, input_size)
    threads = torch.get_num_threads()
    if runtime == "onnxruntime":
        if precision == "int8" and calibration is None:
            raise ValueError("int8 needs calibration inputs")
        return _onnxruntime(model, example, threads, calibration if precision == "int8" else None)
    return _openvino(model, example, threads, precision)


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Both hand-overs trace the module with torch.jit, whose deprecation notice means nothing
    to a milkit user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def calibration_tiles(n: int = 16, size: int = 256) -> torch.Tensor:
    """``n`` fixed synthetic H&E tiles, uint8 (n, size, size, 3): the int8 calibration set.

    Rendered by :mod:`~milkit.feature_extraction.synthetic` (seed 0, 0.5 µm/px, 80 % tissue of
    which 40 % tumour), tiles on a regular grid: the same in every run, so int8 features do not
    depend on which slide a run starts with (calibrating on a run's own tiles would).
    """
    from milkit.feature_extraction.synthetic import SyntheticSlide, make_layout, render_region

    side = 4 * 2 * size  # a 4 x 4 grid of tiles, one tile apart
    tissue, tumour, ds = make_layout(
        side, side, seed=0, tissue_fraction=0.8, tumour_regions=2, tumour_fraction=0.4
    )
    slide = SyntheticSlide(Path("calibration"), side, side, 0.5, tissue, tumour, ds)
    step = 2 * size
    tiles = [
        render_region(slide, x, y, size, size)
        for y in range(0, side, step)
        for x in range(0, side, step)
    ]
    return torch.from_numpy(np.stack(tiles[:n]))


def _quantize_int8(path: Path, calibration: torch.Tensor) -> bytes:
    """Static int8 quantisation of the ONNX model at ``path`` (see module docstring)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [{"x": b.contiguous().numpy()} for b in calibration.split(4)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    pre, out = path.with_name("pre.onnx"), path.with_name("int8.onnx")
    quant_pre_process(str(path), str(pre))  # shapes + graph clean-up, as the docs advise
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return out.read_bytes()


def _onnxruntime(
    model: nn.Module, example: torch.Tensor, threads: int, calibration: torch.Tensor | None
) -> RuntimeModel:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="milkit-onnx-") as tmp:
        path = Path(tmp) / "encoder.onnx"
        with torch.no_grad(), _quiet_tracing():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["x"],
                output_names=["features"],
                dynamic_axes={"x": {0: "batch"}, "features": {0: "batch"}},
                opset_version=17,
                dynamo=False,  # the TorchScript exporter needs no extra packages
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        data = path.read_bytes() if calibration is None else _quantize_int8(path, calibration)
        session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {"x": x})[0]

    return RuntimeModel("onnxruntime", "fp32" if calibration is None else "int8", run)


def _openvino(
    model: nn.Module, example: torch.Tensor, threads: int, precision: str
) -> RuntimeModel:
    import openvino as ov

    core = ov.Core()
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise MilkitError(
            "this CPU has no native bf16 (AVX512-BF16 / AMX), so OpenVINO would emulate it",
            value=precision,
            hint="Use --precision fp32 with --runtime openvino",
        )
    with torch.no_grad(), _quiet_tracing():
        converted = ov.convert_model(model, example_input=example)
    hint = {"fp32": "f32", "bf16": "bf16"}[precision]
    compiled = core.compile_model(
        converted,
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": hint,
            "PERFORMANCE_HINT": "LATENCY",  # one stream: all threads on one batch
        },
    )
    used = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32" / "bf16"
    actual = {"f32": "fp32", "bf16": "bf16"}.get(used)
    if actual != precision:  # never record a precision the runtime did not use
        raise MilkitError(
            f"OpenVINO compiled the encoder at {used}, not the requested {precision}",
            value=precision,
        )
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return request.infer({0: x})[0]

    return RuntimeModel("openvino", precision, run)


__all__ = [
    "RUNTIMES",
    "RuntimeModel",
    "calibration_tiles",
    "check_runtime",
    "compile_for_runtime",
    "fold_batchnorm",
]
