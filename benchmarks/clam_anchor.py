"""Time CLAM's own extract_features_fp.py loop from a CLAM checkout (bench_extract.py's anchor).

Usage: ``clam_anchor.py CLAM_DIR SLIDE COORDS_H5 WEIGHTS THREADS BATCH OUT_H5``; prints one JSON
line ``{"seconds", "tiles", "threads"}``. Nothing of CLAM is copied here: its modules are imported
from ``CLAM_DIR`` (github.com/mahmoodlab/CLAM): ``get_encoder("resnet50_trunc")``,
``Whole_Slide_Bag_FP`` and ``compute_w_loader``. Only the pretrained download is replaced by the
given weight file (the same random weights milkit loads), since this machine is offline.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
import time


def main() -> None:
    clam_dir, slide, coords_h5, weights, threads, batch, out_h5 = sys.argv[1:8]
    import openslide
    import timm
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(int(threads))
    sys.path.insert(0, clam_dir)
    create = timm.create_model

    def no_download(name, **kw):  # CLAM asserts pretrained=True; the weights are loaded below
        kw["pretrained"] = False
        return create(name, **kw)

    timm.create_model = no_download
    # extract_features_fp parses its arguments at import time (its main is __main__-guarded).
    sys.argv = ["extract_features_fp.py", "--csv_path", "unused", "--batch_size", batch]
    efp = importlib.import_module("extract_features_fp")
    dataset_h5 = importlib.import_module("dataset_modules.dataset_h5")
    with contextlib.redirect_stdout(io.StringIO()):
        model, transforms = efp.get_encoder("resnet50_trunc", target_img_size=224)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    missing, _ = model.model.load_state_dict(state, strict=False)
    assert not missing, missing
    model = model.eval().to(efp.device)
    wsi = openslide.open_slide(slide)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        dataset = dataset_h5.Whole_Slide_Bag_FP(
            file_path=coords_h5, wsi=wsi, img_transforms=transforms
        )
        loader = DataLoader(dataset=dataset, batch_size=int(batch))  # CPU: no loader kwargs
        efp.compute_w_loader(out_h5, loader=loader, model=model, verbose=0)
    seconds = time.perf_counter() - t0
    print(
        json.dumps({"seconds": seconds, "tiles": len(dataset), "threads": torch.get_num_threads()})
    )


if __name__ == "__main__":
    main()
