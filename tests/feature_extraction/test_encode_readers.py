"""How many tile-reader processes ``encode_grid`` starts when the user did not say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from milkit.feature_extraction import encode
from milkit.feature_extraction.encode import encode_grid, reader_processes

SLIDE = "CMU-1-Small-Region.svs"


@pytest.mark.parametrize(
    ("requested", "device", "threads", "cores", "expected"),
    [
        (None, "cpu", 2, 2, 0),  # the encoder's threads cover every core: read in-process
        (None, "cpu", 4, 2, 0),
        (None, "cpu", 1, 2, 2),  # a spare core for the readers
        (None, "cuda", 2, 2, 2),  # the GPU encodes: readers keep it fed
        (1, "cpu", 2, 2, 1),  # asked for: kept
        (0, "cuda", 2, 2, 0),
    ],
)
def test_reader_processes(monkeypatch, requested, device, threads, cores, expected):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(encode.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert reader_processes(requested, torch.device(device)) == expected


def test_cpu_encoder_on_every_core_reads_in_process(slides_dir, monkeypatch):
    from milkit.feature_extraction.encoders import create_encoder
    from milkit.feature_extraction.slides import Slide
    from milkit.feature_extraction.tiling import TileSpec, plan_tiles
    from milkit.feature_extraction.tissue import segment_tissue

    def no_readers():
        raise AssertionError("a reader process was started")

    monkeypatch.setattr(encode, "_mp_context", no_readers)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)  # more threads than cores
    with Slide(slides_dir / SLIDE) as slide:
        grid = plan_tiles(slide, segment_tissue(slide), TileSpec(patch_size=256, mpp=0.5))
    enc, _ = create_encoder("fast")
    feats, ok, _, _ = encode_grid(
        slides_dir / SLIDE, None, grid, enc, batch_size=8, num_workers=None
    )
    assert ok.all() and feats.shape == (len(grid), enc.cfg.embed_dim)
    assert np.isfinite(feats).all() and feats.std(0).max() > 0
    with pytest.raises(AssertionError, match="reader process was started"):
        encode_grid(slides_dir / SLIDE, None, grid, enc, batch_size=8, num_workers=1)
