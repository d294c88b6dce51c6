"""Time CLAM's own segmentation + patching (create_patches_fp.py defaults) from a CLAM checkout.

Usage: ``clam_tiling_anchor.py CLAM_DIR SLIDE OUT_DIR``; prints one JSON line with ``seg_s``,
``patch_s``, ``tiles`` and ``coords_h5`` (CLAM's patch file, level-0 coords of 256-px tiles at
level 0). Nothing of CLAM is copied here: ``wsi_core.WholeSlideImage`` is imported from
``CLAM_DIR`` (github.com/mahmoodlab/CLAM) and called the way ``seg_and_patch`` calls it with the
script's default parameters (seg_level: best level for a 64x downsample; sthresh 8, mthresh 7,
close 4, no Otsu; a_t 100, a_h 16, max_n_holes 8; patch_level 0, patch_size = step_size = 256,
use_padding, contour_fn four_pt). Used by ``bench_tiling_clam.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys
import time


def main() -> None:
    clam_dir, slide, out_dir = sys.argv[1:4]
    sys.path.insert(0, clam_dir)
    wsi_mod = importlib.import_module("wsi_core.WholeSlideImage")
    import h5py

    with contextlib.redirect_stdout(io.StringIO()):
        wsi = wsi_mod.WholeSlideImage(slide)
        seg_level = (
            0 if len(wsi.level_dim) == 1 else wsi.getOpenSlide().get_best_level_for_downsample(64)
        )
        seg_params = {
            "seg_level": seg_level,
            "sthresh": 8,
            "mthresh": 7,
            "close": 4,
            "use_otsu": False,
            "keep_ids": [],
            "exclude_ids": [],
        }
        filter_params = {"a_t": 100, "a_h": 16, "max_n_holes": 8}
        t0 = time.perf_counter()
        wsi.segmentTissue(**seg_params, filter_params=filter_params)
        t1 = time.perf_counter()
        wsi.process_contours(
            save_path=out_dir,
            patch_level=0,
            patch_size=256,
            step_size=256,
            use_padding=True,
            contour_fn="four_pt",
        )
        t2 = time.perf_counter()
    path = os.path.join(out_dir, f"{wsi.name}.h5")  # where process_contours writes
    with h5py.File(path, "r") as f:
        tiles = len(f["coords"])
    print(json.dumps({"seg_s": t1 - t0, "patch_s": t2 - t1, "tiles": tiles, "coords_h5": path}))


if __name__ == "__main__":
    main()
