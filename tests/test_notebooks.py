"""The tutorial notebooks: committed output-free and in sync with ``notebooks/_build.py``, and each
one runs top to bottom (nbclient, kernel ``python3`` of this venv) without a cell error and
without leaving files behind."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
SAMPLE_SLIDE = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
NAMES = (
    "01_preprocess_and_inspect.ipynb",
    "02_train_and_compare.ipynb",
    "03_mil_assumption_checks.ipynb",
)
CELL_TIMEOUT_S = 300  # one cell; the slowest (training two models) takes ~30 s on 2 idle cores


def _build_module():
    spec = importlib.util.spec_from_file_location("_notebook_build", NOTEBOOKS / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_tutorial_is_built_by_the_generator():
    assert sorted(_build_module().NOTEBOOKS) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_equals_generator_output(name):
    committed = (NOTEBOOKS / name).read_text(encoding="utf-8")
    assert committed == _build_module().build()[name], (
        f"{name} is out of date: run `python notebooks/_build.py`"
    )


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
    nb = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{name} has no code cells"
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None, "".join(cell["source"])[
            :80
        ]
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    # Each tutorial explains itself: it opens with a Markdown title.
    assert nb["cells"][0]["cell_type"] == "markdown"
    assert "".join(nb["cells"][0]["source"]).startswith("# ")


def _execute(name: str, cwd: Path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    return nb


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _images(nb) -> int:
    return sum(
        "image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", [])
    )


@pytest.fixture
def kernel_env(monkeypatch, tmp_path):
    """The kernel inherits this environment: one thread per process, the sample slide if any."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel must keep its inline backend
    if SAMPLE_SLIDE.is_file():
        monkeypatch.setenv("MILKIT_SAMPLE_SLIDE", str(SAMPLE_SLIDE))
    else:
        monkeypatch.delenv("MILKIT_SAMPLE_SLIDE", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def _assert_cleaned_up(nb, cwd: Path) -> None:
    """Nothing was written where the notebook ran, and its temp work folder is gone."""
    assert list(cwd.iterdir()) == []
    match = re.search(r"working in (\S+)", _text(nb))
    assert match, "the notebook did not print its work folder"
    assert not Path(match.group(1)).exists()


@pytest.mark.slow
def test_01_preprocess_and_inspect_runs(kernel_env):
    nb = _execute(NAMES[0], kernel_env)
    text = _text(nb)
    assert "0 failed" in text
    assert "CLAM:    patch_level 0 patch_size 256" in text
    if SAMPLE_SLIDE.is_file():
        assert "CMU-1-Small-Region" in text and "4 slide(s): 4 ok" in text
    else:
        assert "skipping the real slide" in text and "3 slide(s): 3 ok" in text
    assert _images(nb) == 2  # QC thumbnails, feature PCA
    _assert_cleaned_up(nb, kernel_env)


@pytest.mark.slow
def test_01_skips_a_missing_sample_slide(kernel_env, monkeypatch, tmp_path):
    """The real-slide cell prints a note and goes on when the slide is absent (no preprocessing
    needed to test that: setup, a stand-in for the synthetic slides, that cell, cleanup)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MILKIT_SAMPLE_SLIDE", str(tmp_path / "absent.svs"))
    nb = nbformat.read(NOTEBOOKS / NAMES[0], as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    sample = next(c for c in code if "MILKIT_SAMPLE_SLIDE" in c.source)
    stand_in = nbformat.v4.new_code_cell("synthetic = []")
    probe = nbformat.v4.new_code_cell("print('inputs:', len(inputs), real_slide)")
    nb.cells = [code[0], stand_in, sample, probe, code[-1]]
    nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(kernel_env)}}).execute()  # fmt: skip
    text = _text(nb)
    assert "skipping the real slide" in text
    assert "inputs: 0 None" in text
    _assert_cleaned_up(nb, kernel_env)


@pytest.mark.slow
def test_02_train_and_compare_runs(kernel_env):
    nb = _execute(NAMES[1], kernel_env)
    text = _text(nb)
    for model in ("abmil", "transmil"):
        assert model in text
    assert "auc" in text and "±" in text
    assert _images(nb) == 2  # ROC curves, attention heatmap
    _assert_cleaned_up(nb, kernel_env)


@pytest.mark.slow
def test_03_mil_assumption_checks_runs(kernel_env):
    nb = _execute(NAMES[2], kernel_env)
    text = _text(nb)
    for model in ("mi-net", "threshold-mil", "abmil"):
        assert model in text
    assert "PASS" in text or "FAIL" in text or "DID NOT LEARN" in text
    assert _images(nb) == 1  # AUC chart
    _assert_cleaned_up(nb, kernel_env)


def test_kernel_is_this_venv():
    """nbclient starts kernel ``python3``; it must resolve to this interpreter, not a system one."""
    jupyter_client = pytest.importorskip("jupyter_client.kernelspec")
    spec = jupyter_client.KernelSpecManager().get_kernel_spec("python3")
    argv0 = spec.argv[0]
    assert argv0 in {"python", "python3"} or Path(argv0).resolve() == Path(sys.executable).resolve()
