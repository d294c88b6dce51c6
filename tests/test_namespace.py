"""milkit installs one top-level package: ``models/`` and ``feature_extraction/`` are
``milkit.models`` and ``milkit.feature_extraction``, so a user's own ``models/`` folder (CLAM,
TransMIL and DSMIL checkouts each have one) can never shadow them, nor they it."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.conftest import REPO
from tests.milkit.training.test_cv import make_cohort

# The same names a CLAM/TransMIL/DSMIL checkout puts first on sys.path when a user runs
# `python -m milkit` from inside it.
_FOREIGN = "raise ImportError('the user checkout package was imported instead of milkit')\n"


def _foreign_checkout(root: Path) -> Path:
    for name in ("models", "feature_extraction"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(_FOREIGN)
    return root


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_milkit_models_runs_inside_a_checkout_with_its_own_models_package(tmp_path):
    cwd = _foreign_checkout(tmp_path / "CLAM")
    out = subprocess.run(
        [sys.executable, "-m", "milkit", "models"],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "abmil" in out.stdout and "transmil" in out.stdout


def test_no_top_level_models_or_feature_extraction_is_importable(tmp_path):
    # From a neutral folder, the installed distribution exposes only `milkit`.
    code = (
        "import importlib.util as u; "
        "print(u.find_spec('models'), u.find_spec('feature_extraction'), "
        "u.find_spec('milkit.models').origin, u.find_spec('milkit.feature_extraction').origin)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    none_models, none_fe, models_origin, fe_origin = out.stdout.split()
    assert (none_models, none_fe) == ("None", "None")
    assert Path(models_origin).parent.name == "models"
    assert Path(fe_origin).parent.name == "feature_extraction"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed beside this Python")  # fmt: skip
def test_torchrun_train_runs_inside_a_checkout_with_its_own_models_package(tmp_path):
    csv, bags = make_cohort(tmp_path / "data", n=12, shift=10.0)
    cwd = _foreign_checkout(tmp_path / "TransMIL")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    out = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "milkit", "train",
         "--bags", str(bags), "--labels", str(csv), "--out", str(tmp_path / "run"),
         "--folds", "2", "--epochs", "1", "--model", "abmil", "--model-arg", "fc_dim=8",
         "--model-arg", "attn_dim=4", "--device", "cpu", "--no-progress"],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert (tmp_path / "run" / "fold_1" / "best.pt").exists()


def _package_dirs() -> set[str]:
    """Installed package name for every folder with an ``__init__.py`` under the three roots."""
    names = set()
    for root, prefix in (("milkit", "milkit"), ("models", "milkit.models"),
                         ("feature_extraction", "milkit.feature_extraction")):  # fmt: skip
        for init in (REPO / root).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / root).parts
            names.add(".".join((prefix, *rel)))
    return names


def test_pyproject_lists_every_package_folder():
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert set(listed) == _package_dirs()


def test_no_source_imports_the_top_level_names():
    offenders = []
    roots = ("milkit", "models", "feature_extraction", "tests", "benchmarks", "notebooks")
    for root in roots:
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    mods = [node.module or ""]
                else:
                    continue
                if any(m.split(".")[0] in ("models", "feature_extraction") for m in mods):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
