"""``make demo``: the main job on the embedded demo data.

1. Synthesise the demo scans if they are missing (validation: synth seed 2, 12 cases; testing:
   synth seed 3, 8 cases; the folders ``data_manifests/demo.json`` points to; and the design
   search's second validation seed 4, 12 cases, of ``data_manifests/search_seed4.json``; the
   classifier's checkpoint-selection set, seed 5, 36 cases, of ``data_manifests/classifier_val.json``).
2. Run the bundle with MONAI's own runner on the testing cases: per-slice prediction, C2F
   explanation, lesion scores and exports (saliency NIfTI on each scan's grid, PNG overlays).
3. Score every explainer against the lesion masks on the same slices (``c2f-med evaluate``).
4. Print where the overlays, saliency volumes and summary table are.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from c2f_med.models.bundle import DEFAULT_BUNDLE

REPO = DEFAULT_BUNDLE.parents[1]
DATALIST = REPO / "data_manifests" / "demo.json"
DATA = REPO / "demo_data"  # where DATALIST's relative paths point
SPLITS = {"val": (2, 12), "test": (3, 8), "val4": (4, 12), "val5": (5, 36)}  # folder: (synth seed, cases)
METHODS = "c2f,vitcx,vitcx-sq,rollout,attention,gae,gradcam"


def ensure_data(data: Path) -> None:
    """Write the demo scans that are missing (deterministic for their seeds)."""
    from c2f_med.synth.dataset import write_dataset

    for folder, (seed, cases) in SPLITS.items():
        if not (data / folder / "datalist.json").exists():
            print(f"synthesising {cases} demo cases (seed {seed}) into {data / folder}")
            write_dataset(data / folder, cases=cases, seed=seed, fmt="nifti")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "demo_out")
    p.add_argument("--method", default="c2f", help="explainer the bundle runs")
    a = p.parse_args(argv)
    start = time.time()
    ensure_data(DATA)
    bundle_out = a.out / "bundle"
    cfg = DEFAULT_BUNDLE / "configs"
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(DEFAULT_BUNDLE),
                    "--config_file", f"['{cfg / 'inference.json'}','{cfg / 'evaluate.json'}']",
                    "--meta_file", str(cfg / "metadata.json"), "--datalist", str(DATALIST),
                    "--output_dir", str(bundle_out), "--method", a.method], check=True)
    subprocess.run([sys.executable, "-m", "c2f_med.cli", "evaluate", "--bundle", str(DEFAULT_BUNDLE),
                    "--datalist", str(DATALIST), "--methods", METHODS, "--out", str(a.out / "evaluate")],
                   check=True)
    print(f"\ndemo finished in {time.time() - start:.0f} s")
    print(f"  saliency volumes and overlays: {bundle_out}/<case>/saliency.nii.gz, overlay.png")
    print(f"  scores of every explainer:     {a.out / 'evaluate' / 'summary.md'}")
    print(f"  gallery and curves:            {a.out / 'evaluate' / 'gallery.png'}, curves.png")
    print((a.out / "evaluate" / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
