"""Out-of-memory on one bag: say which slide, how many instances, in which phase, and a remedy
that works for that phase.

``--max-instances`` subsamples *training* bags only; a 300,000-tile test bag still has to go
through the model whole at validation, test, predict and heatmap time. The remedies named here:

- ``train``: ``--max-instances N`` (random subsample per epoch) and ``--batch-size 1``;
- ``validate`` / ``test`` (inside ``milkit train``): ``--eval-max-instances N``, an evenly spaced,
  deterministic subsample of larger evaluation bags (recorded in run.json);
- ``predict``: ``milkit predict --max-instances N`` (the same evenly spaced subsample);
- ``heatmap``: a heatmap needs every tile's score, so no subsampling: ``--device cpu`` (host
  memory is usually larger) or a bigger machine.

Subsampling at evaluation is an approximation (the prediction sees N of the slide's tiles); exact
chunked inference would need per-model support (attention pooling is exactly chunkable,
TransMIL's self-attention is not) and is not done here.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

from milkit.errors import MilkitError

PHASES = ("train", "validate", "test", "predict", "heatmap")


def is_out_of_memory(err: BaseException) -> bool:
    """True for host or device out-of-memory errors raised by torch or numpy.

    The one check used by the trainer, ``predict``, the demo and the command line's exit status 3.
    """
    if isinstance(err, MemoryError):
        return True
    torch = sys.modules.get("torch")  # a torch error exists only once torch is imported
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(err, oom_type):
        return True
    if not isinstance(err, RuntimeError):
        return False
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text


class BagOutOfMemoryError(MilkitError):
    """Out of memory on a batch of bags; ``slide_ids``, ``n_instances`` and ``phase`` say where.

    The CLI exits with status 3 for it (as for any out-of-memory error).
    """

    def __init__(
        self,
        phase: str,
        slide_ids: Sequence[str],
        n_instances: int,
        cause: BaseException,
        *,
        model: str | None = None,
        device: str | None = None,
        batch_size: int = 1,
        max_instances: int | None = None,
        where: str | None = None,
    ) -> None:
        self.phase = phase
        self.slide_ids = [str(s) for s in slide_ids]
        self.n_instances = int(n_instances)
        first = (str(cause).splitlines() or [""])[0][:160]
        slides = ", ".join(self.slide_ids[:3]) + (", ..." if len(self.slide_ids) > 3 else "")
        what = (
            f"out of memory in phase '{phase}' on slide {slides} "
            f"(N={self.n_instances:,} instances{f', batch of {len(self.slide_ids)}' if len(self.slide_ids) > 1 else ''}"
            f"{f', model {model}' if model else ''}{f', device {device}' if device else ''}"
            f"{f', {where}' if where else ''}): {first}"
        )
        super().__init__(what, hint=remedy(phase, self.n_instances, device=device,
                                           batch_size=batch_size, max_instances=max_instances))  # fmt: skip


def remedy(
    phase: str,
    n_instances: int,
    *,
    device: str | None = None,
    batch_size: int = 1,
    max_instances: int | None = None,
) -> str:
    """The option that fixes an out-of-memory error in ``phase`` (see the module docstring)."""
    cap = max_instances if max_instances and max_instances < n_instances else None
    cap = cap or max(1, n_instances // 4)
    gpu = device is not None and str(device).startswith("cuda")
    more = "run on a machine with more memory" + (" or with --device cpu" if gpu else "")
    batch = " and --batch-size 1" if batch_size > 1 else ""
    if phase == "train":
        text = f"Subsample training bags with --max-instances {cap}{batch}, or {more}"
    elif phase in ("validate", "test"):
        text = (
            "--max-instances subsamples training bags only; cap validation and test bags with "
            f"--eval-max-instances {cap} (an evenly spaced subsample of larger bags, recorded "
            f"in run.json){batch}, or {more}"
        )
    elif phase == "predict":
        text = (
            f"Cap large bags with milkit predict --max-instances {cap} (an evenly spaced "
            f"subsample){batch}, or {more}"
        )
    else:  # heatmap: every tile needs a score
        text = f"A heatmap needs every tile's score (no subsampling): {more}"
    return text + "; finished work (bags, checkpoints, finished folds) is kept and reruns resume"


@contextlib.contextmanager
def oom_context(
    phase: str,
    slide_ids: Sequence[str],
    n_instances: int,
    **kwargs: object,
) -> Iterator[None]:
    """Turn an out-of-memory error raised inside into a ``BagOutOfMemoryError``."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        raise BagOutOfMemoryError(phase, slide_ids, n_instances, err, **kwargs) from err  # type: ignore[arg-type]


__all__ = ["PHASES", "BagOutOfMemoryError", "is_out_of_memory", "oom_context", "remedy"]
