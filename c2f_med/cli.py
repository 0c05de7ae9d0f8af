"""The ``c2f-med`` command: synth, train, explain, evaluate, search, bench, audit.

Bad input exits with status 2 and one line ``c2f-med: error: <file>: <problem>`` on stderr, never
a traceback; nothing is written inside the inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from c2f_med.errors import InputError, find_input_error

__all__ = ["main", "build_parser", "parse_params"]

DEFAULT_METHODS = "c2f,vitcx,rollout,attention,gae,gradcam"


def parse_params(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["c2f.relation=rollout-last", "c2f.alpha1=0.8"]`` -> ``{"c2f": {"relation": "rollout-last",
    "alpha1": 0.8}}``. Values are read as JSON when they parse (numbers, booleans, lists), else as text."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise InputError(None, f"--param {item!r}: expected METHOD.NAME=VALUE, e.g. c2f.relation=rollout-last")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[name] = parsed
    return out


def _synth(a: argparse.Namespace) -> None:
    from c2f_med.synth.dataset import write_dataset

    path = write_dataset(a.out, cases=a.cases, seed=a.seed, fmt=a.format, shapes=tuple(a.shapes.split(",")))
    print(f"wrote {a.cases} cases and {path}")


def _train(a: argparse.Namespace) -> None:
    from c2f_med.models.train import recipe_value, run_training

    recipe = dict(recipe_value(item) for item in a.set)
    result = run_training(a.datalist, a.bundle, epochs=a.epochs, seed=a.seed, online_lesions=a.online_lesions,
                          epoch_steps=a.epoch_steps, init=a.init, recipe=recipe)
    best = result["best"]
    print(f"best validation slice AUROC {best['val_auroc']:.4f}, accuracy {best['val_accuracy']:.4f} "
          f"at step {best['step']}; weights in {Path(a.bundle) / 'models' / 'model.pt'}")


def _explain(a: argparse.Namespace) -> None:
    from c2f_med.case import explain_case
    from c2f_med.models.bundle import load_bundle

    _check_out(a.out, [a.input, a.mask])
    bundle = load_bundle(a.bundle, a.device)
    result = explain_case(bundle, a.input, a.out, mask=a.mask, method=a.method,
                          params=parse_params(a.param).get(a.method), axis=a.axis,
                          min_probability=a.min_probability, normalise=a.normalise, series_uid=a.series_uid,
                          deidentify=a.deidentify, stack=a.stack, segment=a.segment, roi=a.roi)
    print(f"{result.case_id}: {result.explained_slices} slices explained in {result.seconds:.1f} s -> {result.folder}")


def _evaluate(a: argparse.Namespace) -> None:
    from c2f_med.evaluate import run_evaluate

    _check_out(a.out, [a.datalist])
    run_evaluate(a.bundle, a.datalist, [m for m in a.methods.split(",") if m], a.out, limit=a.limit,
                 workers=a.workers, params=parse_params(a.param), section=a.section, device=a.device,
                 item_defaults=_mask_options(a))


def _search(a: argparse.Namespace) -> None:
    from c2f_med.search import run_search

    _check_out(a.out, a.datalist)
    report = run_search(a.bundle, a.datalist, a.out, variants=[v for v in (a.variants or "").split(",") if v] or None,
                        section=a.section, limit=a.limit, device=a.device)
    print(f"selected variant: {report['selection']['selected']} ({a.out / 'search.md'})")


def _bench(a: argparse.Namespace) -> None:
    from c2f_med.bench import run_bench

    _check_out(a.out, [])
    run_bench(a.bundle, [m for m in a.methods.split(",") if m], a.slices, a.out, params=parse_params(a.param),
              datalist=a.datalist, device=a.device)


def _audit(a: argparse.Namespace) -> None:
    from c2f_med.audit import run_audit

    _check_out(a.out, [a.datalist])
    run_audit(a.bundle, a.datalist, a.out, method=a.method, params=parse_params(a.param).get(a.method),
              section=a.section, device=a.device, item_defaults=_mask_options(a))


def _mask_options(a: argparse.Namespace) -> dict[str, Any]:
    """``--stack``, ``--segment``, ``--roi`` as datalist item defaults (an item's own keys win)."""
    return {k: getattr(a, k) for k in ("stack", "segment", "roi") if getattr(a, k, None) is not None}


def _check_out(out: Path, inputs: list[Path | None]) -> None:
    """Refuse an output folder inside an input, or one that cannot be written, before any work."""
    import os

    out = Path(out).resolve()
    for path in inputs:
        if path is None:
            continue
        src = Path(path).resolve()
        if src.is_dir() and (out == src or src in out.parents):
            raise InputError(out, f"output folder lies inside the input {src}; choose another --out")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(out, "output folder cannot be written (permission denied or not a folder)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="c2f-med", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)

    from c2f_med.models import DEFAULT_BUNDLE
    from c2f_med.synth.lesions import HELD_OUT_SHAPES, SHAPES

    def bundle_args(s: argparse.ArgumentParser) -> None:
        s.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="MONAI bundle folder")
        s.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
        s.add_argument("--param", action="append", metavar="METHOD.NAME=VALUE",
                       help="override an explainer parameter, e.g. c2f.relation=rollout-last (repeatable)")

    def dicom_choice_args(s: argparse.ArgumentParser, per_case: str = "") -> None:
        s.add_argument("--stack", type=int,
                       help=f"stack number of a multi-frame DICOM image holding several (1-based){per_case}")
        s.add_argument("--segment", help=f"segment of a DICOM SEG or .seg.nrrd mask, by number or label{per_case}")
        s.add_argument("--roi", help=f"ROI of an RTSTRUCT mask, by number or name{per_case}")

    s = sub.add_parser("synth", help="write semi-synthetic lesion scans on MNI152 anatomy")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--cases", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", choices=("nifti", "dicom", "both"), default="nifti")
    s.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"comma-separated lesion shapes: the generator's {','.join(SHAPES)} (default) and / or "
                        f"the held-out {','.join(HELD_OUT_SHAPES)} (lesions drawn unlike the training data)")
    s.set_defaults(func=_synth)

    t = sub.add_parser("train", help="train the slice classifier into a bundle")
    t.add_argument("--datalist", required=True, type=Path,
                   help="its 'validation' cases select the best checkpoint; its 'training' cases are "
                        "trained on unless --online-lesions")
    t.add_argument("--bundle", required=True, type=Path)
    t.add_argument("--epochs", type=int, default=26,
                   help="epochs of --epoch-steps steps, a validation after each (the shipped model: 26 x 500)")
    t.add_argument("--epoch-steps", type=int, default=500, help="optimiser steps per epoch")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--online-lesions", action="store_true",
                   help="train on synthetic anatomies with lesions drawn afresh for every volume")
    t.add_argument("--init", type=Path,
                   help="start from this state dict (a model.pt of the bundle's network) instead of random weights")
    t.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change one field of the training recipe (c2f_med.models.train.TrainConfig; JSON "
                        "values), e.g. --set lr=3e-4 --set curriculum_fraction=0 to fine-tune; repeatable")
    t.set_defaults(func=_train)

    e = sub.add_parser("explain", help="saliency volume, overlay, predictions (and scores) for one scan")
    bundle_args(e)
    e.add_argument("--input", required=True, type=Path, help="NIfTI/MHA/NRRD file, DICOM folder or DICOM file")
    e.add_argument("--mask", type=Path, help="lesion mask (adds scores.json): NIfTI/MHA/NRRD on the scan's grid, "
                                             "Slicer .seg.nrrd, DICOM SEG or RTSTRUCT file")
    e.add_argument("--method", default="c2f")
    e.add_argument("--axis", type=int, default=2, choices=(0, 1, 2))
    e.add_argument("--out", required=True, type=Path)
    e.add_argument("--min-probability", type=float, help="explain only slices at or above this lesion probability")
    e.add_argument("--normalise", choices=("slice", "volume"), default="slice")
    e.add_argument("--series-uid", help="SeriesInstanceUID, for a folder holding several series")
    e.add_argument("--deidentify", action="store_true", help="strip patient identifiers from DICOM outputs")
    dicom_choice_args(e)
    e.set_defaults(func=_explain)

    v = sub.add_parser("evaluate", help="score explanation methods against lesion masks over a datalist")
    bundle_args(v)
    v.add_argument("--datalist", required=True, type=Path)
    v.add_argument("--methods", default=DEFAULT_METHODS)
    v.add_argument("--out", required=True, type=Path)
    v.add_argument("--limit", type=int, help="only the first N cases")
    v.add_argument("--workers", type=int, default=1, help="worker processes")
    v.add_argument("--section", default="testing", help="datalist section to evaluate")
    dicom_choice_args(v, "; an item's own key wins")
    v.set_defaults(func=_evaluate)

    r = sub.add_parser(
        "search", help="C2F design search: score named c2f variants and the baselines on validation data"
    )
    r.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="MONAI bundle folder")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    r.add_argument("--datalist", required=True, type=Path, action="append", help="repeatable")
    r.add_argument("--variants", help="comma-separated names of c2f_med.search.VARIANTS (default: all)")
    r.add_argument("--section", default="validation")
    r.add_argument("--limit", type=int, help="only the first N cases of each datalist")
    r.add_argument("--out", required=True, type=Path)
    r.set_defaults(func=_search)

    b = sub.add_parser("bench", help="time every method on the same slices")
    bundle_args(b)
    b.add_argument("--methods", default=DEFAULT_METHODS)
    b.add_argument("--slices", type=int, default=16)
    b.add_argument("--datalist", type=Path, help="take slices from its testing cases (default: synthesise)")
    b.add_argument("--out", required=True, type=Path)
    b.set_defaults(func=_bench)

    u = sub.add_parser("audit", help="resumable cohort run (torchrun for several processes)")
    bundle_args(u)
    u.add_argument("--datalist", required=True, type=Path)
    u.add_argument("--out", required=True, type=Path)
    u.add_argument("--method", default="c2f")
    u.add_argument("--section", default="testing")
    dicom_choice_args(u, "; an item's own key wins")
    u.set_defaults(func=_audit)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except Exception as exc:  # bad input (possibly wrapped by MONAI) -> one line, no traceback
        err = find_input_error(exc)
        if err is None:
            raise
        print(f"c2f-med: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
