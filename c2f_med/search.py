"""The C2F design search: named parameter sets of ``c2f`` and the baselines, scored on
validation datalists, and the selection rule that picks the shipped defaults.

Every variant is a method name plus parameter overrides, so each one is also runnable as
``c2f-med evaluate --methods c2f --param c2f.NAME=VALUE ...``. :func:`run_search` explains the
lesion slices of the validation cases with every variant (the real explainers, through
:func:`~c2f_med.evaluate.evaluate_case`, without the faithfulness curves), and writes

    OUT/search.csv    one row per variant and lesion slice (evaluate's per-slice columns + "variant")
    OUT/search.json   per variant: method, params, AP, iou_topk, mIoU, relevance mass, costs, on the
                      TP stratum ("results") and on all lesion slices ("results_all"); the rule and
                      the variant it selects
    OUT/search.md     the same as a table (TP stratum)

The scores that decide are those of the TP stratum: the lesion slices the model calls positive
(lesion probability >= the bundle's operating threshold, 0.5 when the bundle declares none;
``operating_point`` says which). Where the model misses the lesion every explainer points elsewhere,
so averaging those slices in says nothing about the explainers. (Without any TP slice, all lesion
slices decide and ``stratum`` says ``"all"``.)

Selection rule (:func:`select`), fixed before the test split is looked at:

    among the c2f variants whose validation mIoU is at least the best baseline's, and whose cost
    (forward passes + 2 x backward passes per slice) is at most vitcx's, the highest
    (AP + iou_topk) / 2; if no variant passes both conditions, the highest (AP + iou_topk) / 2
    among those within the cost (among all variants if none is), and the report says which
    condition failed.

Baselines are every non-C2F method of :data:`BASELINES` (``vitcx-sq`` included).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from c2f_med.atomic import write_csv, write_json, write_text
from c2f_med.errors import InputError
from c2f_med.evaluate import PER_SLICE_HEAD, check_methods, evaluate_case, warm_up
from c2f_med.explain.c2f import SPEC_FIRST_DEFAULTS
from c2f_med.io.manifest import read_datalist
from c2f_med.models.bundle import load_bundle
from c2f_med.provenance import provenance
from c2f_med.summary import aggregate, comparison_table, paired_comparison

__all__ = ["BASELINES", "VARIANTS", "variant_params", "run_search", "select"]

logger = logging.getLogger(__name__)

#: the compared methods (no parameter changes)
BASELINES = ("attention", "rollout", "gae", "gradcam", "gradcam-attn", "vitcx", "vitcx-sq", "occlusion", "legrad",
             "attnlrp", "attnlrp-uniform", "rise")

#: C2F variants: name -> overrides of the reconstruction's first defaults (``c2f-first``,
#: :data:`~c2f_med.explain.c2f.SPEC_FIRST_DEFAULTS`), so a variant means the same whatever ``c2f``'s
#: shipped defaults are. The first blocks change one design choice; the last combines choices.
VARIANTS: dict[str, dict[str, Any]] = {
    # the reconstruction's first defaults and the two ablations
    "first": {},
    "noS3WM": {"s3wm": False},
    "noAF": {"af": False},
    # S3WM: evaluation function, band removal, granularity, cost-aware sequence, thresholds
    "best": {"evaluation": "best"},
    "best-wide": {"evaluation": "best", "alpha1": 0.8, "beta1": 0.2},
    "sharpen-all": {"sharpen_accepted": True},
    "best-sharpen-all": {"evaluation": "best", "sharpen_accepted": True},
    "split": {"granularity": "split"},
    "best-split": {"evaluation": "best", "granularity": "split"},
    "costaware": {"costaware": True},
    "best-costaware": {"evaluation": "best", "costaware": True},
    "best-costaware-split": {"evaluation": "best", "costaware": True, "granularity": "split"},
    # AF: relation, layers, patch importance, refinement
    "rollout-last": {"relation": "rollout-last"},
    "rollout-all": {"relation": "rollout-all"},
    "gae-last3": {"l0": 4},
    "contrast": {"importance": "contrast"},
    "cls": {"importance": "cls"},
    "rollout-last-cls": {"relation": "rollout-last", "importance": "cls"},
    "propagate": {"refine": "propagate"},
    # combinations of the cheap sequence with the AF choices
    "best-costaware-contrast": {"evaluation": "best", "costaware": True, "importance": "contrast"},
    "best-costaware-cls": {"evaluation": "best", "costaware": True, "importance": "cls"},
    "best-costaware-sharpen-all": {"evaluation": "best", "costaware": True, "sharpen_accepted": True},
    "best-costaware-rollout-last": {"evaluation": "best", "costaware": True, "relation": "rollout-last"},
    "best-costaware-split-cls": {"evaluation": "best", "costaware": True, "granularity": "split", "importance": "cls"},
    # the clustering tree cut in its widest merge gap near the thresholds (stable to tiny input changes)
    "best-costaware-split-cls-gap": {"evaluation": "best", "costaware": True, "granularity": "split",
                                     "importance": "cls", "cut": "gap"},
    # AF on LeGrad's per-layer class-gradient relation (importance: LeGrad's map)
    "best-costaware-split-legrad": {"evaluation": "best", "costaware": True, "granularity": "split",
                                    "importance": "cls", "relation": "legrad"},
    "best-costaware-split-legrad-gap": {"evaluation": "best", "costaware": True, "granularity": "split",
                                        "importance": "cls", "relation": "legrad", "cut": "gap"},
    "legrad-noS3WM": {"s3wm": False, "importance": "cls", "relation": "legrad"},
    # stability: one noise draw shared by a slice's masks; the coarse map on its scores' own scale
    "best-costaware-split-cls-shared": {"evaluation": "best", "costaware": True, "granularity": "split",
                                        "importance": "cls", "noise_draws": "shared"},
    "best-costaware-split-cls-stable": {"evaluation": "best", "costaware": True, "granularity": "split",
                                        "importance": "cls", "noise_draws": "shared", "coarse_scale": "scores"},
    "best-costaware-split-legrad-stable": {"evaluation": "best", "costaware": True, "granularity": "split",
                                           "importance": "cls", "relation": "legrad", "noise_draws": "shared",
                                           "coarse_scale": "scores"},
    "legrad-noS3WM-stable": {"s3wm": False, "importance": "cls", "relation": "legrad", "noise_draws": "shared",
                             "coarse_scale": "scores"},
}

RULE = ("among c2f variants with validation mIoU >= the best baseline's and cost (forward + 2 x backward passes "
        "per slice) <= vitcx's, the highest (AP + iou_topk) / 2")


def variant_params(name: str) -> dict[str, Any]:
    """The full ``c2f`` parameter set of variant ``name``: the reconstruction's first defaults with its overrides."""
    return {**SPEC_FIRST_DEFAULTS, **VARIANTS[name]}


def _cost(summary: Mapping[str, Any]) -> float:
    return summary["forward_passes_per_slice"] + 2 * summary["backward_passes_per_slice"]


def select(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Apply the selection rule (module docstring) to ``{name: {"method", "params", **aggregate}}``.

    Returns ``{"rule", "selected", "best_baseline_miou", "vitcx_cost", "qualified": [names],
    "within_cost": [names], "fallback": bool}`` (``fallback``: no variant met both conditions).
    """
    baselines = [r for r in results.values() if r["method"] != "c2f"]
    variants = {n: r for n, r in results.items() if r["method"] == "c2f"}
    if not baselines or not variants or "vitcx" not in results:
        raise ValueError("the search needs vitcx, at least one other baseline and one c2f variant")
    best_miou = max(r["miou"] for r in baselines)
    vitcx_cost = _cost(results["vitcx"])
    within = {n: r for n, r in variants.items() if _cost(r) <= vitcx_cost}
    qualified = {n: r for n, r in within.items() if r["miou"] >= best_miou}
    pool = qualified or within or variants
    selected = max(pool, key=lambda n: (pool[n]["ap"] + pool[n]["iou_topk"]) / 2)
    return {"rule": RULE, "selected": selected, "best_baseline_miou": best_miou, "vitcx_cost": vitcx_cost,
            "qualified": sorted(qualified), "within_cost": sorted(within), "fallback": not qualified}


def run_search(
    bundle_dir: str | os.PathLike,
    datalists: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    variants: Sequence[str] | None = None,
    baselines: Sequence[str] = BASELINES,
    section: str = "validation",
    limit: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Score the C2F ``variants`` (names of :data:`VARIANTS`, default all) and ``baselines`` on the lesion
    slices of ``section`` of every datalist; write ``out/search.{csv,json,md}``; return the JSON dict."""
    names = list(VARIANTS) if variants is None else list(variants)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise InputError(None, f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    items = []
    for datalist in datalists:
        part = read_datalist(datalist, section)[:limit]
        if not part or any("label" not in item for item in part):
            raise InputError(datalist, f'the "{section}" list is empty or has items without a "label"')
        items += part
    bundle = load_bundle(bundle_dir, device)
    runs = [(b, b, {}) for b in baselines] + [(n, "c2f", variant_params(n)) for n in names]
    used = {name: check_methods(bundle, [method], {method: params})[method] for name, method, params in runs}
    warm_up(bundle, sorted({method for _, method, _ in runs}))

    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(items) * len(runs), desc="search", unit="run", disable=not progress)
    for index, item in enumerate(items):
        for name, method, params in runs:
            case = evaluate_case(bundle, item, index, [method], {method: params}, faithfulness=False)
            rows += [{**r, "variant": name} for r in case.rows]
            bar.update(1)
    bar.close()

    point = bundle.operating_point
    tp_rows = [r for r in rows if float(r["probability"]) >= point.threshold]

    def results_of(subset: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {name: {"method": method, "params": used[name],
                       **{k: v for k, v in aggregate([r for r in subset if r["variant"] == name]).items()
                          if k != "not_applicable"}}
                for name, method, _ in runs}

    stratum = "tp" if tp_rows else "all"  # without a slice the model calls positive, all lesion slices decide
    results = results_of(tp_rows if tp_rows else rows)
    report = {
        "section": section,
        "datalists": [str(d) for d in datalists],
        "cases": len(items),
        "lesion_slices": len({(r["case"], r["slice"]) for r in rows}),
        "stratum": stratum,
        "operating_point": {"threshold": point.threshold, "source": point.source},
        "tp_slices": len({(r["case"], r["slice"]) for r in tp_rows}),
        "results": results,
        "results_all": results_of(rows),
        "selection": select(results),
        "provenance": provenance(
            bundle,
            inputs={f"datalist_{i}": d for i, d in enumerate(datalists)},
            method="search",
            params={n: p for n, _, p in runs},
        ),
    }
    selected = report["selection"]["selected"]
    as_methods = [{**r, "method": r["variant"]} for r in (tp_rows if tp_rows else rows)]
    report["comparisons"] = {f"{selected} - {name}": paired_comparison(as_methods, selected, name)
                             for name, _, _ in runs if name != selected}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extras = list(dict.fromkeys(k for r in rows for k in r if k not in PER_SLICE_HEAD and k != "variant"))
    write_csv(out / "search.csv", rows, ["variant", *PER_SLICE_HEAD, *extras])
    write_json(out / "search.json", report)
    write_text(out / "search.md", render_search(report))
    logger.info("selected %s -> %s", report["selection"]["selected"], out / "search.md")
    return report


def render_search(report: Mapping[str, Any]) -> str:
    """``search.md``: one row per variant, sorted by (AP + iou_topk) / 2, the selection below."""
    sel = report["selection"]
    res = report["results"]
    head = (
        "| variant | method | params | AP | IoU top-k | mIoU | mass | (AP+IoU top-k)/2 | fwd | bwd | s/slice |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for name in sorted(res, key=lambda n: -(res[n]["ap"] + res[n]["iou_topk"])):
        r = res[name]
        changed = {k: v for k, v in r["params"].items() if k in VARIANTS.get(name, {})}
        lines.append(
            f"| {'**' + name + '**' if name == sel['selected'] else name} | {r['method']} | "
            f"{', '.join(f'{k}={v}' for k, v in changed.items()) or '-'} | {r['ap']:.3f} | "
            f"{r['iou_topk']:.3f} | {r['miou']:.3f} | {r['relevance_mass']:.3f} | "
            f"{(r['ap'] + r['iou_topk']) / 2:.3f} | {r['forward_passes_per_slice']:.1f} | "
            f"{r['backward_passes_per_slice']:.1f} | {_fmt(r['seconds_per_slice'])} |"
        )
    point = report["operating_point"]
    return (
        f"# C2F design search: {report['section']} split, {report['cases']} cases, "
        f"{report['lesion_slices']} lesion slices\n\n"
        + (f"Scores on the TP stratum: the {report['tp_slices']} lesion slices the model calls positive "
           f"(p >= {point['threshold']:g}, threshold from the {point['source']}).\n\n"
           if report["stratum"] == "tp" else "No lesion slice is called positive: scores on all lesion slices.\n\n")
        + head
        + "\n".join(lines)
        + f"\n\nRule: {sel['rule']}.\n\nBest baseline mIoU {sel['best_baseline_miou']:.3f}; vitcx cost "
        f"{sel['vitcx_cost']:.1f} passes. Qualified: {', '.join(sel['qualified']) or 'none'}. "
        f"Selected: **{sel['selected']}**{_fallback_reason(sel)}.\n"
        + "\n".join(comparison_table(f"## Paired bootstrap on the same slices, {sel['selected']} minus each "
                                      "(95% CI)", report.get("comparisons", {}))) + "\n"
    )


def _fallback_reason(sel: Mapping[str, Any]) -> str:
    """Which condition of the rule no variant met, for ``search.md`` (empty when one qualified)."""
    if not sel["fallback"]:
        return ""
    if not sel["within_cost"]:
        return " (fallback: no variant was within vitcx's cost)"
    return " (fallback: no variant within the cost met the mIoU condition)"


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
