"""milkit.io.atomic's JSON writer: the one way run.json, metrics.json and summary.json are written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from milkit.io.atomic import atomic_write_json, json_text, partial_path


def test_numpy_torch_scalars_paths_and_nan_are_written_as_plain_json(tmp_path):
    value = {"n": np.int64(3), "auc": np.float32(0.5), "loss": torch.tensor(1.25),
             "bags": Path("/data/bags"), "nested": [(1, 2)], "ci": float("nan")}  # fmt: skip
    path = tmp_path / "run.json"
    atomic_write_json(path, value)
    text = path.read_text()
    assert text == json_text(value) and text.endswith("}\n") and '\n  "n": 3,' in text
    back = json.loads(text)
    assert back["n"] == 3 and back["auc"] == 0.5 and back["loss"] == 1.25
    assert back["bags"] == "/data/bags" and back["nested"] == [[1, 2]] and math.isnan(back["ci"])


def test_an_object_json_cannot_write_leaves_no_file(tmp_path):
    path = tmp_path / "summary.json"
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        atomic_write_json(path, {"bad": object()})
    assert not path.exists() and not partial_path(path).exists()
