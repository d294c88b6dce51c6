"""Write the tutorial notebooks (``notebooks/0*.ipynb``) from the cell sources below.

The notebooks are generated, not hand-edited, so that they stay small, output-free and reviewable
as plain Python. Run ``python notebooks/_build.py`` after editing a cell here; the test suite
(``tests/test_notebooks.py``) checks that the committed files equal this script's output and
executes each one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
KERNEL = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}

# Shared by every notebook: a temp work folder (nothing is written into the repository) and a
# helper that runs the `milkit` command line exactly as a user would in a terminal.
SETUP = '''\
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

WORK = Path(tempfile.mkdtemp(prefix="milkit-{tag}-"))
print("working in", WORK)


def run_milkit(*args):
    """Run `milkit ARGS...` in a subprocess; print its output; fail loudly on a non-zero exit."""
    cmd = [sys.executable, "-m", "milkit", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print("$ milkit", " ".join(map(str, args)))
    print(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"milkit {{args[0]}} exited with status {{proc.returncode}}")
    return proc.stdout


def show_png(path, ax=None, title=None):
    """imshow a PNG file (QC thumbnails, ROC curves, heatmaps) without axes."""
    ax = ax or plt.figure(figsize=(7, 7)).gca()
    ax.imshow(plt.imread(path))
    ax.set_title(title or Path(path).name, fontsize=9)
    ax.axis("off")
'''

CLEANUP = """\
shutil.rmtree(WORK, ignore_errors=True)
print("removed", WORK)
"""


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip("\n"))


def code(text: str) -> nbformat.NotebookNode:
    return new_code_cell(text.strip("\n"))


# ---------------------------------------------------------------------------------------------
# 01: preprocess slides and inspect bags


def notebook_01() -> nbformat.NotebookNode:
    cells = [
        md("""
# 1 · Preprocess slides and inspect the bags

This tutorial turns whole-slide images into **bags**: one HDF5 file per slide holding a feature
vector for every tissue tile (`features`, N × D) and the tile's level-0 position (`coords`, N × 2).
Every later step (training, heatmaps, assumption checks) starts from bags.

We use a few **synthetic slides** (pyramidal Aperio-style TIFFs with a known tumour mask, made in
seconds) and, when it is available, the real sample slide `CMU-1-Small-Region.svs`. The `fast`
encoder is weight-free, so nothing is downloaded and the whole notebook runs on a laptop CPU in
about a minute. Everything is written to a temporary folder that the last cell deletes.
"""),
        code(SETUP.format(tag="nb01")),
        md("""
## Synthetic slides

`make_synthetic_slide` streams a pyramidal JPEG-tiled TIFF tile by tile. Two slides get planted
tumour regions, one is normal tissue only. The ground-truth masks are saved beside each slide
(`<name>.masks.npz`), which lets us check later that the features see the tumour.
"""),
        code("""
from milkit.feature_extraction.synthetic import make_synthetic_slide

SLIDES = WORK / "slides"
SLIDES.mkdir()
synthetic = []
for i, regions in enumerate([2, 2, 0]):
    s = make_synthetic_slide(
        SLIDES / f"synth_{i}.svs", 2048, 1536, mpp=0.5, seed=i,
        tumour_regions=regions, tumour_fraction=0.2 if regions else 0.0,
    )
    synthetic.append(s)
    print(f"{s.path.name}: {s.width}x{s.height} px at {s.mpp} µm/px, "
          f"tumour covers {s.tumour_mask.sum() / max(s.tissue_mask.sum(), 1):.0%} of the tissue")
"""),
        md("""
## The real sample slide (optional)

`CMU-1-Small-Region.svs` (OpenSlide's public test data) is used when the environment variable
`MILKIT_SAMPLE_SLIDE` points at it, or when the repository sits next to `shared/data/slides`.
Without it the notebook goes on with the synthetic slides only.
"""),
        code("""
import milkit


def find_sample_slide():
    env = os.environ.get("MILKIT_SAMPLE_SLIDE")
    if env:
        return Path(env) if Path(env).is_file() else None
    repo = Path(milkit.__file__).resolve().parent.parent
    candidate = repo.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
    return candidate if candidate.is_file() else None


real_slide = find_sample_slide()
inputs = [s.path for s in synthetic]
if real_slide is None:
    print("note: CMU-1-Small-Region.svs not found (set MILKIT_SAMPLE_SLIDE); "
          "skipping the real slide and using the synthetic slides only")
else:
    print("real slide:", real_slide)
    inputs.append(real_slide)
"""),
        md("""
## `milkit preprocess`

One command segments tissue (HSV saturation + Otsu on a ~8 µm/px level), lays a grid of
256-px tiles at 0.5 µm/px (20×) over it, encodes every tile and writes `<slide_id>.h5`, a QC
thumbnail per slide and `manifest.csv` (one row per slide: status, tile counts, timings). A
failing slide is recorded there and the others still run; rerunning skips finished bags.
"""),
        code("""
BAGS = WORK / "bags"
run_milkit("preprocess", *inputs, "--out", BAGS, "--encoder", "fast", "--mpp", 0.5,
       "--patch-size", 256, "--workers", 0, "--device", "cpu", "--no-progress")
manifest = pd.read_csv(BAGS / "manifest.csv")
manifest[["slide_id", "status", "n_tiles", "embed_dim", "mpp", "read_level", "total_s"]]
"""),
        code("""
assert (manifest["status"] == "ok").all(), manifest[["slide_id", "status", "error"]]
assert len(manifest) == len(inputs)
"""),
        md("""
## Quality control thumbnails

Green lines outline the detected tissue (blue: holes), red boxes are the tiles that were kept
(at least 25 % tissue). This is the first thing to look at on a new cohort: pen marks, folds or
a wrong threshold show up here long before they show up in the metrics.
"""),
        code("""
qc_pngs = sorted((BAGS / "qc").glob("*.png"))
fig, axes = plt.subplots(1, len(qc_pngs), figsize=(4 * len(qc_pngs), 4))
for ax, png in zip(np.atleast_1d(axes), qc_pngs):
    show_png(png, ax=ax, title=png.stem)
plt.tight_layout()
plt.show()
"""),
        md("""
## `milkit info`: what is in a bag

`milkit info BAG` prints the header of a bag (tile count, feature size, encoder, resolution)
without reading the features. Where that command is not available in this version, the same
facts come from `milkit.io.bags.read_bag_header`.
"""),
        code("""
import importlib.util

from milkit.io.bags import list_bags, read_bag_header

bags = list_bags(BAGS)
first = bags["synth_0"]
if importlib.util.find_spec("milkit.commands.info") is not None:
    run_milkit("info", first)
else:
    h = read_bag_header(first)
    print(f"{h.path.name}: {h.num_instances} tiles x {h.dim} features ({h.dtype}), "
          f"encoder {h.features_attrs.get('encoder')!r}, target {h.coords_attrs.get('target_mpp')} "
          f"µm/px, patch {h.coords_attrs.get('patch_size')} px, source {h.source}")
pd.DataFrame(
    [
        {"slide_id": sid, "tiles": (hh := read_bag_header(p)).num_instances, "dim": hh.dim,
         "encoder": hh.features_attrs.get("encoder"), "level0": (
             hh.coords_attrs.get("level0_width"), hh.coords_attrs.get("level0_height"))}
        for sid, p in bags.items()
    ]
)
"""),
        md("""
## Opening a bag with plain h5py, as CLAM and TRIDENT do

A bag is an ordinary HDF5 file: `features` and `coords` at the root, with the attribute names
CLAM (`patch_level`, `downsample`, ...) and TRIDENT (`patch_size_level0`, `target_magnification`,
...) read. Coordinates are level-0 pixels of each tile's top-left corner, rows in raster order
(by y, then x) — order-aware models such as TransMIL and MambaMIL rely on that.
"""),
        code("""
import h5py

with h5py.File(first, "r") as f:
    features = f["features"][:]
    coords = f["coords"][:]
    coords_attrs = dict(f["coords"].attrs)
    features_attrs = dict(f["features"].attrs)
    root_attrs = dict(f.attrs)

print("features", features.shape, features.dtype, "| coords", coords.shape, coords.dtype)
print("CLAM:    patch_level", coords_attrs["patch_level"], "patch_size", coords_attrs["patch_size"])
print("TRIDENT: patch_size_level0", coords_attrs["patch_size_level0"],
      "target_magnification", coords_attrs["target_magnification"])
print("encoder:", features_attrs["encoder"], "| format version:", root_attrs["milkit_format"])
order = np.lexsort((coords[:, 0], coords[:, 1]))
assert (order == np.arange(len(coords))).all(), "rows are not in raster order"
assert features.shape[0] == coords.shape[0]
"""),
        md("""
## Do the features see the tumour?

The synthetic slides come with their ground truth, so we can measure, per tile, which fraction of
it is tumour and compare that with the features. A 2-D PCA of the tiles of the two tumour slides
coloured by tumour fraction should show the tumour tiles apart from the rest: that is the signal
a MIL model has to find without ever being told which tiles are tumour.
"""),
        code("""
from milkit.io.bags import read_bag
from milkit.feature_extraction.synthetic import load_synthetic_masks, tumour_fraction_of_tiles

feats, fracs = [], []
for s in synthetic[:2]:
    bag = read_bag(bags[s.path.stem])
    truth = load_synthetic_masks(s.path)
    ps0 = float(bag.coords_attrs["patch_size_level0"])
    feats.append(bag.features)
    fracs.append(tumour_fraction_of_tiles(truth, bag.coords, ps0))
X, frac = np.concatenate(feats), np.concatenate(fracs)
Xc = X - X.mean(axis=0)
_, _, vt = np.linalg.svd(Xc, full_matrices=False)
pc = Xc @ vt[:2].T
plt.figure(figsize=(5, 4))
sc = plt.scatter(pc[:, 0], pc[:, 1], c=frac, cmap="viridis", s=14)
plt.colorbar(sc, label="tumour fraction of the tile")
plt.xlabel("PC 1")
plt.ylabel("PC 2")
plt.title("fast-encoder features of tumour-slide tiles")
plt.show()
print(f"{(frac > 0.5).sum()} of {len(frac)} tiles are mostly tumour")
"""),
        md("Clean up the temporary folder (comment this out to keep the bags and QC images)."),
        code(CLEANUP),
    ]
    return _notebook(cells)


# ---------------------------------------------------------------------------------------------
# 02: train and compare two aggregators


def notebook_02() -> nbformat.NotebookNode:
    cells = [
        md("""
# 2 · Train and compare slide classifiers

A slide label ("tumour" / "normal") says nothing about which tiles carry it: that is a
multiple-instance learning (MIL) problem. An **aggregator** turns a bag of tile features into one
slide prediction. Here we cross-validate two of them on the same folds and compare:

- `abmil` — attention-based MIL (Ilse et al. 2018): a learned weight per tile, weighted mean;
- `transmil` — TransMIL (Shao et al. 2021): a Nyström transformer over the tiles.

The cohort is 20 small synthetic slides (half with planted tumour), preprocessed with the
weight-free `fast` encoder; training is kept to a few epochs so the notebook runs on a CPU in
about a minute. Real cohorts use the same commands with a foundation-model encoder and the
models' official recipes (`--preset official`).
"""),
        code(SETUP.format(tag="nb02")),
        md("""
## A labelled synthetic cohort

`make_synthetic_cohort` writes the slides and `labels.csv` (`slide_id,label,case_id,...`); the
`case_id` column keeps all slides of one patient in the same fold (here: one slide per case).
"""),
        code("""
from milkit.feature_extraction.synthetic import make_synthetic_cohort
from milkit.feature_extraction.extract import ExtractConfig, preprocess

SLIDES, BAGS = WORK / "slides", WORK / "bags"
labels = make_synthetic_cohort(SLIDES, 20, size=(1536, 1536), tumour_fraction=0.08, seed=0)
summary = preprocess([SLIDES], BAGS, ExtractConfig(encoder="fast", patch_size=128, mpp=0.5,
                                                    num_workers=0, device="cpu", progress=False))
print(summary.format())
assert summary.exit_code == 0
labels["label"].value_counts()
"""),
        md("""
## Cross-validation with `milkit train`

3-fold CV, stratified by label and grouped by case. Inside each fold an inner validation split
picks the epoch (lowest validation loss); the test fold is only predicted once, with that
checkpoint — no information leaks from test to model selection. TransMIL is made narrower than
its paper size (`dim=128`, 64 landmarks instead of 512 / 256) because 218-d features and a CPU
do not need a 512-wide transformer.
"""),
        code("""
RUNS = WORK / "runs"
common = ["--bags", BAGS, "--labels", SLIDES / "labels.csv", "--folds", 3, "--epochs", 12,
          "--batch-size", 4, "--lr", 2e-3, "--monitor", "val_loss", "--val-fraction", 0.2, "--seed", 0,
          "--device", "cpu", "--cache", "--no-progress"]
_ = run_milkit("train", *common, "--model", "abmil", "--out", RUNS / "abmil")
_ = run_milkit("train", *common, "--model", "transmil", "--model-arg", "dim=128",
               "--model-arg", "num_landmarks=64", "--out", RUNS / "transmil")
"""),
        md("""
## Compare the CV metrics

Each run folder holds `summary.csv` (one row per fold, then mean and std). `milkit evaluate`
recomputes the same numbers from the saved test-fold predictions.
"""),
        code("""
_ = run_milkit("evaluate", "--run", RUNS / "abmil")
metrics = ["auc", "accuracy", "balanced_accuracy", "f1_macro"]
rows = {}
for model in ("abmil", "transmil"):
    s = pd.read_csv(RUNS / model / "summary.csv").set_index("fold")
    rows[model] = {m: f"{float(s.loc['mean', m]):.3f} ± {float(s.loc['std', m]):.3f}"
                   for m in metrics}
comparison = pd.DataFrame(rows).T
comparison
"""),
        md("""
## ROC curves from the out-of-fold predictions

Every slide is in exactly one test fold, so pooling the folds' `predictions.csv` gives one
out-of-fold prediction per slide: one ROC curve per model.
"""),
        code("""
from milkit.training.metrics import classification_metrics, plot_roc

classes = sorted(labels["label"].unique())
roc_pngs = {}
for model in ("abmil", "transmil"):
    preds = pd.concat(pd.read_csv(p) for p in sorted((RUNS / model).glob("fold_*/predictions.csv")))
    y = preds["label"].map(classes.index).to_numpy()
    probs = preds[[f"prob_{c}" for c in classes]].to_numpy()
    pooled = classification_metrics(y, probs, classes)
    print(f"{model}: {len(preds)} slides, pooled out-of-fold AUC {pooled['auc']:.3f}")
    roc_pngs[model] = plot_roc(y, probs, classes, WORK / f"roc_{model}.png",
                               title=f"{model}: pooled out-of-fold AUC {pooled['auc']:.3f}")
# plot_roc writes its PNG through matplotlib's file-only Agg backend, which turns inline plots
# off; switch them back on.
%matplotlib inline
fig, axes = plt.subplots(1, 2, figsize=(10, 5))
for ax, (model, png) in zip(axes, roc_pngs.items()):
    show_png(png, ax=ax, title=model)
plt.show()
"""),
        md("""
## Where does the model look? An attention heatmap

`milkit heatmap` runs every fold's model on one slide, averages their attention and paints it on
the slide thumbnail. On a tumour slide the high-attention tiles should sit on the planted tumour
(the ground truth is drawn beside it). ABMIL's softmax attention is usually peaked: a few tumour
tiles carry most of the weight, so a second tumour region can stay cool even when the slide is
classified correctly. Use `--normalize rank` for CLAM-style percentile colouring.
"""),
        code("""
from milkit.feature_extraction.synthetic import load_synthetic_masks

slide_id = labels.loc[labels["label"] == "tumour", "slide_id"].iloc[0]
slide_path = SLIDES / f"{slide_id}.svs"
out_png = WORK / f"{slide_id}_attention.png"
_ = run_milkit("heatmap", "--run", RUNS / "abmil", "--slide", slide_path,
               "--bag", BAGS / f"{slide_id}.h5", "--out", out_png)
truth = load_synthetic_masks(slide_path)
fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
show_png(out_png, ax=axes[0], title=f"abmil attention, {slide_id}")
axes[1].imshow(truth.tissue_mask.astype(float) + truth.tumour_mask, cmap="magma")
axes[1].set_title("ground truth: tissue (magenta), tumour (yellow)")
axes[1].axis("off")
plt.show()
"""),
        md("Clean up the temporary folder (comment this out to keep the run folders)."),
        code(CLEANUP),
    ]
    return _notebook(cells)


# ---------------------------------------------------------------------------------------------
# 03: MIL assumption checks


def notebook_03() -> nbformat.NotebookNode:
    cells = [
        md("""
# 3 · Does an aggregator respect the MIL assumption?

The standard MIL assumption says a slide is positive **iff at least one** instance is positive.
Its consequence: adding a tile can never make a positive slide negative, and the *absence* of
something is never evidence for the positive class. Many popular aggregators can break this
silently: trained on data with a shortcut such as "this artefact only appears on negative
slides", they learn "no artefact ⇒ positive".

Raff & Holt's algorithmic unit tests (NeurIPS 2023) make that measurable. Each test trains on a
synthetic task whose training data contain a perfectly predictive but MIL-violating shortcut,
then tests on data where the shortcut is moved to the other class:

| test | task | shortcut in training |
|---|---|---|
| `t1` | single concept: positive iff a concept instance is present | a "poison" instance in every negative bag |
| `t2` | threshold MIL: positive iff concepts A **and** B are present | poison in negative bags |
| `t3` | false frequency: positive iff A and B present | how often A appears |

A model that uses the shortcut ranks test bags *below chance* (AUC < 0.5).
"""),
        code(SETUP.format(tag="nb03")),
        md("""
## Reading the verdicts

Every (model, test) is trained on several seeds; the verdict uses the mean test AUC and its
bootstrap 95 % confidence interval:

- **PASS** — the model fitted the training data (mean training AUC ≥ 0.9) and its test AUC is not
  below chance: it did not use the MIL-violating shortcut.
- **FAIL** — test AUC below 0.5 − δ (δ = 0.1) or the CI lies entirely below 0.5: the model learned
  the shortcut, "absence as evidence". This is reported even when the training fit is imperfect,
  because under-training can hide a violation but not fake one.
- **DID NOT LEARN** — no FAIL, but the training AUC stayed below 0.9: the model could not fit the
  task, so the test says nothing about the assumption (e.g. a max-pooling mi-Net cannot express
  "A **and** B" in `t2`). Not a violation — and not a pass either.
- **ERROR** — the model crashed; the message is kept and the other checks go on.

Three models: `mi-net` (max over instance scores; MIL-respecting by construction),
`threshold-mil` (max-pooled concept detectors + noisy-AND; respects threshold MIL) and `abmil`
(attention-weighted mean; can learn absence-based rules).
"""),
        md("""
## Run the checks

The default check runs all three tests with 400 + 400 bags per draw and three seeds. Here we run
`t1` and `t2` on smaller draws (120 + 120 bags), two seeds and 30 epochs at a higher learning
rate, so that the notebook finishes in about a minute on a CPU; on a real question use the
defaults, `CheckConfig()`, which add `t3`. Task draws are shared by all models.
"""),
        code("""
from milkit.assumptions.runner import CheckConfig, run_checks

cfg = CheckConfig(tests=("t1", "t2"), seeds=(0, 1), num_train=120, num_test=120,
                  epochs=30, patience=None, lr=5e-3, n_boot=300)
results = run_checks(["mi-net", "threshold-mil", "abmil"], cfg, progress=False)
report = pd.DataFrame([r.to_dict() for r in results])
report[["model", "test", "verdict", "train_auc", "test_auc", "ci_low", "ci_high",
        "mil_respecting", "wall_s"]].round(3)
"""),
        md("""
## The verdict table

One row per model, one column per test; `mil_respecting` is what the model class claims about
itself, the verdicts are what the checks observed.
"""),
        code("""
table = report.pivot(index="model", columns="test", values="verdict")
table.insert(0, "claims MIL-respecting",
             report.groupby("model")["mil_respecting"].first().reindex(table.index))
assert set(report["verdict"]) <= {"PASS", "FAIL", "DID NOT LEARN", "ERROR"}
assert not (report["verdict"] == "ERROR").any(), report.loc[report["verdict"] == "ERROR", "error"]
table
"""),
        md("""
## Test AUC with confidence intervals

Bars are the mean test AUC over seeds, whiskers the bootstrap 95 % CI. The dashed line is chance
(0.5), the dotted line the FAIL threshold (0.5 − δ). Hatched bars did not fit the training data.
"""),
        code("""
colours = {"PASS": "tab:green", "FAIL": "tab:red", "DID NOT LEARN": "tab:grey", "ERROR": "black"}
tests = list(cfg.tests)
models_ = list(dict.fromkeys(report["model"]))
width = 0.8 / len(models_)
fig, ax = plt.subplots(figsize=(8, 4))
for j, model in enumerate(models_):
    sub = report[report["model"] == model].set_index("test").reindex(tests)
    x = np.arange(len(tests)) + (j - (len(models_) - 1) / 2) * width
    err = np.vstack([sub["test_auc"] - sub["ci_low"], sub["ci_high"] - sub["test_auc"]])
    bars = ax.bar(x, sub["test_auc"], width, yerr=np.nan_to_num(err.clip(min=0)), capsize=3,
                  color=[colours[v] for v in sub["verdict"]], edgecolor="black")
    for bar, v in zip(bars, sub["verdict"]):
        bar.set_hatch("//" if v == "DID NOT LEARN" else "")
    # a diamond at the mean keeps a FAIL bar of height ~0 visible
    ax.scatter(x, sub["test_auc"], c=[colours[v] for v in sub["verdict"]], marker="D", s=25,
               edgecolors="black", zorder=3)
    tops = np.nan_to_num(np.fmax(sub["ci_high"], sub["test_auc"]).to_numpy())
    for xi, top in zip(x, tops):  # name above the whisker: a FAIL bar can have height ~0
        ax.text(xi, top + 0.02, model, rotation=90, ha="center", va="bottom", fontsize=8)
ax.axhline(0.5, ls="--", color="black", lw=1)
ax.axhline(0.5 - cfg.delta, ls=":", color="tab:red", lw=1)
ax.set_xticks(np.arange(len(tests)), tests)
ax.set_ylim(-0.03, 1.35)
ax.set_ylabel("test AUC (mean over seeds)")
handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
ax.legend(handles, colours.keys(), fontsize=8, loc="upper center", ncol=4,
          bbox_to_anchor=(0.5, -0.1))
plt.show()
"""),
        md("""
**How to read it.** A red bar is a model that learned "absence as evidence": its predictions
would flip on real slides where the shortcut does not hold (an artefact, a stain, a scanner that
happens to correlate with the label in the training cohort). A green bar means the model fitted
the task *and* kept the MIL direction. A grey bar is inconclusive — the model could not fit the
task in this budget; rerun with the default (larger) `CheckConfig` before drawing conclusions.
With only two seeds and small draws, verdicts near a boundary can change between runs.
"""),
        md(
            "Nothing was written to disk in this notebook except the temporary folder, removed here."
        ),
        code(CLEANUP),
    ]
    return _notebook(cells)


# ---------------------------------------------------------------------------------------------


def _notebook(cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = KERNEL
    nb.metadata["language_info"] = {"name": "python"}
    # Stable cell ids keep regenerated files byte-identical (nbformat would draw random ones).
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


NOTEBOOKS = {
    "01_preprocess_and_inspect.ipynb": notebook_01,
    "02_train_and_compare.ipynb": notebook_02,
    "03_mil_assumption_checks.ipynb": notebook_03,
}


def build() -> dict[str, str]:
    """File name → notebook JSON text (no outputs) for every tutorial."""
    out = {}
    for name, make in NOTEBOOKS.items():
        nb = make()
        nbformat.validate(nb)
        out[name] = nbformat.writes(nb) + "\n"
    return out


def main() -> int:
    for name, text in build().items():
        (HERE / name).write_text(text, encoding="utf-8")
        print("wrote", HERE / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
