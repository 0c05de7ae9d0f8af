"""The ``c2f-med`` command: synth, train, calibrate, interpolate, explain, evaluate, search, bench, audit.

Bad input exits with status 2 and one line ``c2f-med: error: <file>: <problem>`` on stderr, never
a traceback; nothing is written inside the inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from c2f_med.atomic import check_output
from c2f_med.errors import InputError, find_input_error

__all__ = ["main", "build_parser", "parse_params"]

DEFAULT_METHODS = "c2f,vitcx,rollout,attention,gae,gradcam"


def _names(text: str | None) -> list[str]:
    """The non-empty names of a comma-separated option value (none when the option is not given)."""
    return [n for n in (text or "").split(",") if n]


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
                          epoch_steps=a.epoch_steps, init=a.init, recipe=recipe, device=a.device)
    best = result["best"]
    print(f"best validation slice AUROC {best['val_auroc']:.4f}, accuracy {best['val_accuracy']:.4f} "
          f"at step {best['step']}; weights in {Path(a.bundle) / 'models' / 'model.pt'}")


def _calibrate(a: argparse.Namespace) -> None:
    from c2f_med.calibrate import run_calibrate

    measure = []
    for item in a.measure:
        name, sep, rest = item.partition("=")
        path, _, section = rest.partition(":")
        if not sep or not name or not path:
            raise InputError(None, f"--measure {item!r}: expected NAME=DATALIST[:SECTION]")
        measure.append((name, Path(path), section or "testing"))
    result = run_calibrate(a.bundle, a.datalist, section=a.section, specificity=a.specificity, write=not a.dry_run,
                           measure=measure, report=a.report, progress=True)
    point, before, after = result["operating_point"], result["before"], result["after"]
    print(f"temperature {point['temperature']:.4f}, threshold {point['threshold']:.4f} "
          f"({'written to' if result['written'] else 'not written (--dry-run):'} {a.bundle}/configs/inference.json)")
    print(f"validation ECE {before['ece']:.4f} -> {after['ece']:.4f}; specificity {after['specificity']:.3f}, "
          f"lesions found {after['lesion_sensitivity']:.3f}, slice AUROC {after['slice_auroc']:.4f}")
    for name, m in result["measured"].items():
        print(f"{name}: slice AUROC {m['slice_auroc']:.4f}, lesion AUROC {m['lesion_auroc']:.4f}, lesions found "
              f"{m['lesion_sensitivity']:.3f} ({m['lesions']}), specificity {m['specificity']:.3f}, ECE {m['ece']:.4f}")


def _interpolate(a: argparse.Namespace) -> None:
    from c2f_med.models.interpolate import run_interpolate

    try:
        alphas = [float(v) for v in _names(a.alphas)]
    except ValueError:
        alphas = []
    if not alphas or not all(0.0 <= v <= 1.0 for v in alphas):
        raise InputError(None, f"--alphas {a.alphas!r}: expected comma-separated numbers in [0, 1]")
    result = run_interpolate(a.bundle, a.start, a.tuned, a.datalist, alphas=alphas, section=a.section,
                             progress=True)
    for row in result["alphas"]:
        print(f"alpha {row['alpha']:.2f}: validation slice AUROC {row['val_auroc']:.4f}")
    print(f"selected alpha {result['selected']:.2f}; weights in {Path(a.bundle) / 'models' / 'model.pt'} "
          "(run c2f-med calibrate next)")


def _explain(a: argparse.Namespace) -> None:
    from c2f_med.case import explain_case
    from c2f_med.models.bundle import load_bundle
    from c2f_med.pacs.cli import explain_input

    with explain_input(a) as source:  # a DICOMweb series URL: its cached copy (and --mask server); else the files
        check_output(a.out, [source.image, source.mask])
        bundle = load_bundle(a.bundle, a.device)
        result = explain_case(bundle, source.image, a.out, mask=source.mask, method=a.method,
                              params=parse_params(a.param).get(a.method), axis=a.axis,
                              min_probability=a.min_probability, normalise=a.normalise, series_uid=a.series_uid,
                              deidentify=a.deidentify, case_id=source.case_id, stack=a.stack, segment=a.segment,
                              roi=a.roi)
        source.finish(result.folder, a.method, bundle)  # --store-results: STOW-RS the DICOM exports
    print(f"{result.case_id}: {result.explained_slices} slices explained in {result.seconds:.1f} s -> {result.folder}")


def _evaluate(a: argparse.Namespace) -> None:
    from c2f_med.evaluate import run_evaluate

    check_output(a.out, [a.datalist])
    run_evaluate(a.bundle, a.datalist, _names(a.methods), a.out, limit=a.limit,
                 workers=a.workers, params=parse_params(a.param), section=a.section, device=a.device,
                 stability_slices=a.stability_slices, item_defaults=_mask_options(a))


def _search(a: argparse.Namespace) -> None:
    from c2f_med.search import BASELINES, run_search

    check_output(a.out, a.datalist)
    report = run_search(a.bundle, a.datalist, a.out, variants=_names(a.variants) or None,
                        baselines=_names(a.baselines) or BASELINES, section=a.section, limit=a.limit, device=a.device)
    print(f"selected variant: {report['selection']['selected']} ({a.out / 'search.md'})")


def _bench(a: argparse.Namespace) -> None:
    from c2f_med.bench import run_bench

    check_output(a.out)
    run_bench(a.bundle, _names(a.methods), a.slices, a.out, params=parse_params(a.param),
              datalist=a.datalist, device=a.device)


def _audit(a: argparse.Namespace) -> None:
    from c2f_med.audit import run_audit
    from c2f_med.pacs.cli import audit_datalist, options_from_args

    check_output(a.out, [a.datalist])
    datalist = audit_datalist(a)  # --dicomweb: the QIDO-RS query's series, as a datalist of URLs in OUT
    run_audit(a.bundle, datalist, a.out, method=a.method, params=parse_params(a.param).get(a.method),
              section=a.section, device=a.device, dicomweb=options_from_args(a), item_defaults=_mask_options(a))


def _mask_options(a: argparse.Namespace) -> dict[str, Any]:
    """``--stack``, ``--segment``, ``--roi`` as datalist item defaults (an item's own keys win)."""
    return {k: getattr(a, k) for k in ("stack", "segment", "roi") if getattr(a, k, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="c2f-med", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)

    from c2f_med.models import DEFAULT_BUNDLE
    from c2f_med.pacs.cli import add_audit_arguments, add_explain_arguments, input_path
    from c2f_med.synth.lesions import HELD_OUT_SHAPES, SHAPES

    def bundle_args(s: argparse.ArgumentParser) -> None:
        s.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="MONAI bundle folder")
        s.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
        s.add_argument("--param", action="append", metavar="METHOD.NAME=VALUE",
                       help="override an explainer parameter, e.g. c2f.relation=rollout-last (repeatable)")
        s.add_argument("--target-class", metavar="NAME|INDEX",
                       help="class to explain, by its name in the bundle's metadata.json or its index (default: "
                            "the bundle's target_class / lesion_class, else each slice's predicted class)")
        s.add_argument("--preset", help="intensity preset: auto, ct, mr, brain, soft_tissue, lung, bone or "
                                        "LEVEL,WIDTH (default: the bundle's preset)")
        s.add_argument("--backbone-attr", metavar="PATH",
                       help="dotted name of the ViT inside a larger network_def module, e.g. backbone or model.vit")

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
    t.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    t.add_argument("--online-lesions", action="store_true",
                   help="train on synthetic anatomies with lesions drawn afresh for every volume")
    t.add_argument("--init", type=Path,
                   help="start from this state dict (a model.pt of the bundle's network) instead of random weights")
    t.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change one field of the training recipe (c2f_med.models.train.TrainConfig; JSON "
                        "values), e.g. --set lr=3e-4 --set curriculum_fraction=0 to fine-tune; repeatable")
    t.set_defaults(func=_train)

    c = sub.add_parser("calibrate", help="fit the bundle's temperature and decision threshold on validation scans")
    c.add_argument("--bundle", required=True, type=Path, help="bundle whose configs/inference.json gets the point")
    c.add_argument("--datalist", required=True, type=Path, help="labelled cases to fit on")
    c.add_argument("--section", default="validation", help="datalist section to fit on")
    c.add_argument("--specificity", type=float, default=0.9,
                   help="share of lesion-free slices the threshold calls negative on those cases")
    c.add_argument("--measure", action="append", default=[], metavar="NAME=DATALIST[:SECTION]",
                   help="after fitting, score the bundle at its operating point on these cases (section default "
                        "testing); repeatable")
    c.add_argument("--report", type=Path, help="write the fitted point and every score as JSON here")
    c.add_argument("--dry-run", action="store_true", help="fit and measure, but leave the bundle unchanged")
    c.set_defaults(func=_calibrate)

    i = sub.add_parser("interpolate", help="blend fine-tuned weights with their starting weights, "
                       "the blend chosen on validation scans")
    i.add_argument("--bundle", required=True, type=Path, help="bundle whose models/model.pt gets the blend")
    i.add_argument("--start", required=True, type=Path, help="the weights the fine-tune started from (alpha 0)")
    i.add_argument("--tuned", required=True, type=Path, help="the fine-tuned weights (alpha 1)")
    i.add_argument("--datalist", required=True, type=Path, help="labelled cases to choose alpha on")
    i.add_argument("--section", default="validation", help="datalist section to choose alpha on")
    i.add_argument("--alphas", default="0,0.25,0.5,0.75,1",
                   help="comma-separated blends (1 - alpha) * start + alpha * tuned to score")
    i.set_defaults(func=_interpolate)

    e = sub.add_parser("explain", help="saliency volume, overlay, predictions (and scores) for one scan")
    bundle_args(e)
    e.add_argument("--input", required=True, type=input_path,
                   help="NIfTI/MHA/NRRD file, DICOM folder or DICOM file, or a DICOMweb series URL")
    e.add_argument("--mask", type=Path, help="lesion mask (adds scores.json): NIfTI/MHA/NRRD on the scan's grid, "
                                             "Slicer .seg.nrrd, DICOM SEG or RTSTRUCT file, or 'server'")
    e.add_argument("--method", default="c2f")
    e.add_argument("--axis", type=int, default=2, choices=(0, 1, 2))
    e.add_argument("--out", required=True, type=Path)
    e.add_argument("--min-probability", type=float, help="explain only slices at or above this lesion probability")
    e.add_argument("--normalise", choices=("slice", "volume"), default="slice")
    e.add_argument("--series-uid", help="SeriesInstanceUID, for a folder holding several series")
    e.add_argument("--deidentify", action="store_true", help="strip patient identifiers from DICOM outputs")
    dicom_choice_args(e)
    add_explain_arguments(e)
    e.set_defaults(func=_explain)

    v = sub.add_parser("evaluate", help="score explanation methods against lesion masks over a datalist")
    bundle_args(v)
    v.add_argument("--datalist", required=True, type=Path)
    v.add_argument("--methods", default=DEFAULT_METHODS)
    v.add_argument("--out", required=True, type=Path)
    v.add_argument("--limit", type=int, help="only the first N cases")
    v.add_argument("--workers", type=int, default=1, help="worker processes")
    v.add_argument("--section", default="testing", help="datalist section to evaluate")
    v.add_argument("--stability-slices", type=int, default=3, metavar="N",
                   help="slices per case explained again on the scan stored as int16 and with noise at its noise "
                        "floor (saliency correlation per method); 0 switches the test off")
    dicom_choice_args(v, "; an item's own key wins")
    v.set_defaults(func=_evaluate)

    r = sub.add_parser(
        "search", help="C2F design search: score named c2f variants and the baselines on validation data"
    )
    r.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="MONAI bundle folder")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    r.add_argument("--datalist", required=True, type=Path, action="append", help="repeatable")
    r.add_argument("--variants", help="comma-separated names of c2f_med.search.VARIANTS (default: all)")
    r.add_argument("--baselines", help="comma-separated methods compared with the variants; vitcx is needed by "
                   "the selection rule (default: all the registered baselines)")
    r.add_argument("--section", default="validation")
    r.add_argument("--limit", type=int, help="only the first N cases of each datalist")
    r.add_argument("--out", required=True, type=Path)
    r.set_defaults(func=_search)

    b = sub.add_parser("bench", help="time every method on the same slices")
    bundle_args(b)
    b.add_argument("--methods", default=DEFAULT_METHODS + ",gradcam-attn,legrad,attnlrp,attnlrp-uniform,rise")
    b.add_argument("--slices", type=int, default=16)
    b.add_argument("--datalist", type=Path, help="take slices from its testing cases (default: synthesise)")
    b.add_argument("--out", required=True, type=Path)
    b.set_defaults(func=_bench)

    u = sub.add_parser("audit", help="resumable cohort run (torchrun for several processes)")
    bundle_args(u)
    u.add_argument("--datalist", type=Path, help="datalist JSON (or --dicomweb)")
    u.add_argument("--out", required=True, type=Path)
    u.add_argument("--method", default="c2f")
    u.add_argument("--section", default="testing")
    dicom_choice_args(u, "; an item's own key wins")
    add_audit_arguments(u)
    u.set_defaults(func=_audit)
    return p


#: verbs that score against lesion masks: they need a declared class to explain
_SCORING_VERBS = ("evaluate", "bench", "audit")


@contextlib.contextmanager
def _bundle_options(a: argparse.Namespace) -> Iterator[None]:
    """``--target-class``, ``--preset`` and ``--backbone-attr`` as the environment variables the bundle loader
    reads (so worker processes see them too), for the duration of the command."""
    from c2f_med.models import BACKBONE_ENV, PRESET_ENV, TARGET_ENV

    values = {TARGET_ENV: getattr(a, "target_class", None), PRESET_ENV: getattr(a, "preset", None),
              BACKBONE_ENV: getattr(a, "backbone_attr", None)}
    values = {k: str(v) for k, v in values.items() if v is not None}
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        if a.verb in _SCORING_VERBS:
            _require_target(a.bundle)
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _require_target(bundle: Path) -> None:
    """Scoring against lesion masks needs the lesion class: refuse a bundle that declares none."""
    from c2f_med.models.bundle import declared_target, inference_config

    if Path(bundle).is_dir() and declared_target(inference_config(bundle)) is None:
        raise InputError(Path(bundle) / "configs" / "inference.json",
                         "declares no class to explain (target_class or lesion_class); pass --target-class NAME|INDEX")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with _bundle_options(args):
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
