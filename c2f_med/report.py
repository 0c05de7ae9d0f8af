"""The cohort audit's HTML report: one self-contained file.

``report.html`` needs nothing beside itself: CSS is inline, every image is a base64 PNG in a
``data:`` URI, there is no script and no external link. Sections (each an ``<section id=...>``):

* ``summary``: the ``summary.json`` numbers: the slice classifier's at its operating point, then one
  row per method for the lesion slices the model called positive (TP, the primary table), those it
  missed (FN), all lesion slices, and where the saliency of its false alarms falls (FP);
* ``distributions``: per-case score distributions, one box per method and score;
* ``gallery``: the overlays of the best and the worst cases of each method by one score;
* ``calibration``: reliability diagram of the slice lesion probabilities, with the expected
  calibration error;
* ``failures``: every case that failed, with its error.

Calibration (Guo et al., "On calibration of modern neural networks", ICML 2017): probabilities
are put into ``B`` equal-width bins of [0, 1] (MONAI's ``calibration_binning``); for bin ``b`` with
``n_b`` slices, mean probability ``conf_b`` and lesion frequency ``freq_b``,
``ECE = sum_b n_b / N * |freq_b - conf_b|``.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from monai.metrics.calibration import calibration_binning
from numpy.typing import ArrayLike, NDArray
from PIL import Image

from c2f_med.atomic import write_text
from c2f_med.metrics.localisation import FP_KEYS
from c2f_med.summary import LOWER_IS_BETTER

__all__ = ["Reliability", "reliability", "png_data_uri", "render_report", "write_report", "SUMMARY_COLUMNS",
           "DISTRIBUTION_SCORES"]

#: per-method columns of the summary table, in order (keys of ``summary.json``'s ``methods``)
SUMMARY_COLUMNS = ("pointing_game", "pointing_game_tol", "relevance_mass", "miou", "dice", "iou_topk", "auroc",
                   "ap", "deletion_auc", "insertion_auc", "seconds_per_slice", "forward_passes_per_slice",
                   "slices")
#: per-case scores whose distributions are drawn (those present in the rows)
DISTRIBUTION_SCORES = ("pointing_game", "pointing_game_tol", "relevance_mass", "dice", "iou_topk", "auroc", "ap",
                       "deletion_auc", "insertion_auc", "seconds_per_slice")

_GALLERY_WIDTH = 900  # px; overlays wider than this are shrunk before embedding

_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.error { text-align: left; font-family: monospace; white-space: pre-wrap; }
figure { display: inline-block; margin: .5em; vertical-align: top; }
figcaption { font-size: .85em; text-align: center; }
img { max-width: 100%; }
.meta { color: #555; font-size: .9em; }
.wide { overflow-x: auto; }
"""


@dataclass
class Reliability:
    """A reliability diagram's numbers over ``bins`` equal-width probability bins.

    Attributes:
        confidence: ``[bins]`` mean predicted probability per bin (NaN where empty).
        frequency: ``[bins]`` observed lesion frequency per bin (NaN where empty).
        counts: ``[bins]`` slices per bin.
        ece: expected calibration error (NaN without slices).
    """

    confidence: NDArray[np.float64]
    frequency: NDArray[np.float64]
    counts: NDArray[np.int64]
    ece: float


def reliability(probabilities: ArrayLike, labels: ArrayLike, bins: int = 10) -> Reliability:
    """Bin ``[N]`` probabilities against ``[N]`` 0/1 labels; non-finite probabilities are dropped."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"probabilities shape {p.shape} does not match labels shape {y.shape}")
    keep = np.isfinite(p)
    p, y = p[keep], y[keep]
    if p.size == 0:
        nan = np.full(bins, math.nan)
        return Reliability(nan, nan.copy(), np.zeros(bins, dtype=np.int64), math.nan)
    # MONAI bins (B, C, spatial...) tensors and clamps p = 1 into the last bin
    conf, freq, counts = (t[0, 0].double().numpy() for t in calibration_binning(
        torch.from_numpy(p)[None, None], torch.from_numpy(y)[None, None], num_bins=bins))
    filled = counts > 0
    ece = float(np.sum(counts[filled] / p.size * np.abs(freq[filled] - conf[filled])))
    return Reliability(conf, freq, counts.astype(np.int64), ece)


def png_data_uri(source: Figure | str | Path, max_width: int | None = None) -> str:
    """``data:image/png;base64,...`` of a matplotlib figure or of an image file (shrunk to ``max_width``)."""
    buf = io.BytesIO()
    if isinstance(source, Figure):
        source.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    else:
        with Image.open(source) as im:
            im = im.convert("RGB")
            if max_width and im.width > max_width:
                im = im.resize((max_width, round(im.height * max_width / im.width)), Image.Resampling.LANCZOS)
            im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _number(value: Any) -> float:
    """A row value as a float; NaN for empty, missing or non-numeric values."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: Any) -> str:
    v = _number(value)
    return "n/a" if math.isnan(v) else f"{v:.3f}"


def _count(value: Any) -> str:
    v = _number(value)
    return "n/a" if math.isnan(v) else str(int(v))


def _by_method(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Rows of successful cases grouped by their ``method`` (in order of appearance)."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if not row.get("error"):
            out.setdefault(str(row.get("method", "")), []).append(row)
    return out


def _methods_table(methods: Mapping[str, Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in ("method", *columns))
    body = "".join(
        "<tr>" + f"<td>{html.escape(name)}</td>"
        + "".join(f"<td>{(_count if c == 'slices' else _fmt)(scores.get(c))}</td>" for c in columns)
        + "</tr>" for name, scores in methods.items())
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _summary_section(summary: Mapping[str, Any]) -> str:
    clf = summary.get("classifier", {})
    point = summary.get("operating_point") or {}
    source = "the bundle's operating point" if point.get("source") == "bundle" else "a default threshold"
    parts = [
        '<section id="summary"><h2>Summary</h2>'
        f'<p class="meta">{_count(summary.get("cases"))} cases, {_count(summary.get("lesion_slices"))} lesion '
        f'slices; slice classifier AUROC {_fmt(clf.get("slice_auroc"))}, accuracy '
        f'{_fmt(clf.get("slice_accuracy"))}, sensitivity {_fmt(clf.get("sensitivity"))}, specificity '
        f'{_fmt(clf.get("specificity"))} at threshold {_fmt(clf.get("threshold"))} ({source}), ECE '
        f'{_fmt(clf.get("ece"))}; per lesion ({_count(clf.get("lesions"))} 3-D lesions, each by its '
        f'best slice) AUROC {_fmt(clf.get("lesion_auroc"))}, found {_fmt(clf.get("lesion_sensitivity"))}.</p>']
    strata = summary.get("strata")
    if strata:
        parts += [f'<h3 id="tp">Lesion slices the model called positive (TP, {_count(strata["tp"]["slices"])} '
                  "slices): is it looking at the lesion when it flags it?</h3>",
                  _methods_table(strata["tp"]["methods"], SUMMARY_COLUMNS),
                  f'<h3 id="fn">Lesion slices the model missed (FN, {_count(strata["fn"]["slices"])} slices)</h3>',
                  _methods_table(strata["fn"]["methods"], SUMMARY_COLUMNS),
                  '<h3 id="all">All lesion slices, whatever the model decided</h3>']
    parts.append(_methods_table(summary.get("methods", {}), SUMMARY_COLUMNS))
    if strata:
        parts += [f'<h3 id="fp">False alarms: lesion-free slices the model called positive (FP, '
                  f'{_count(strata["fp"]["slices"])} slices)</h3><p class="meta">Share of the saliency mass, and of '
                  "the 5 % most salient pixels, inside the body; whether the peak is inside; the body's share of "
                  "the slice is what a map that looks nowhere in particular gets.</p>",
                  _methods_table(strata["fp"]["methods"], (*FP_KEYS, "slices"))]
    return "".join(parts) + "</section>"


def _distributions_section(rows: Sequence[Mapping[str, Any]]) -> str:
    groups = _by_method(rows)
    scores = [s for s in DISTRIBUTION_SCORES
              if any(math.isfinite(_number(r.get(s))) for g in groups.values() for r in g)]
    if not scores:
        return '<section id="distributions"><h2>Score distributions</h2><p>No per-case scores.</p></section>'
    cols = min(4, len(scores))
    nrows = math.ceil(len(scores) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.8 * nrows))
    for i, score in enumerate(scores):
        ax = fig.add_subplot(nrows, cols, i + 1)
        names = list(groups)
        data = [[v for v in (_number(r.get(score)) for r in groups[m]) if math.isfinite(v)] for m in names]
        ax.boxplot([d if d else [math.nan] for d in data], showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, fontsize=8)
        for j, d in enumerate(data):  # the cases themselves, jittered
            jitter = np.random.default_rng(j).uniform(-0.15, 0.15, len(d))
            ax.plot(np.full(len(d), j + 1) + jitter, d, ".", alpha=0.4, color="tab:blue")
        ax.set_title(score, fontsize=9)
    fig.tight_layout()
    return ('<section id="distributions"><h2>Score distributions</h2>'
            '<p class="meta">Per-case scores (means over lesion slices); boxes: quartiles, triangle: mean.</p>'
            f'<img alt="score distributions" src="{png_data_uri(fig)}"></section>')


def _gallery_section(rows: Sequence[Mapping[str, Any]], overlays: Mapping[str, str | Path], rank_by: str,
                     size: int) -> str:
    parts = ['<section id="gallery"><h2>Best and worst cases</h2>',
             f'<p class="meta">Ranked by {html.escape(rank_by)} '
             f'({"lower" if rank_by in LOWER_IS_BETTER else "higher"} is better).</p>']
    for method, group in _by_method(rows).items():
        ranked = sorted((r for r in group if math.isfinite(_number(r.get(rank_by))) and str(r["case"]) in overlays),
                        key=lambda r: _number(r.get(rank_by)), reverse=rank_by not in LOWER_IS_BETTER)
        best = ranked[:min(size, math.ceil(len(ranked) / 2))]  # too few cases: half best, half worst
        worst = ranked[::-1][:min(size, len(ranked) - len(best))]
        for label, chosen in (("best", best), ("worst", worst)):
            figures = "".join(
                f'<figure><img alt="{html.escape(str(r["case"]))}" '
                f'src="{png_data_uri(overlays[str(r["case"])], _GALLERY_WIDTH)}">'
                f'<figcaption>{html.escape(str(r["case"]))}: {html.escape(rank_by)} {_fmt(r.get(rank_by))}'
                "</figcaption></figure>" for r in chosen)
            parts.append(f'<h3 class="{label}">{html.escape(method)}: {label}</h3>' + (figures or "<p>none</p>"))
    parts.append("</section>")
    return "".join(parts)


def _calibration_section(probabilities: ArrayLike, labels: ArrayLike, bins: int) -> str:
    rel = reliability(probabilities, labels, bins)
    if not rel.counts.sum():
        return ('<section id="calibration"><h2>Classifier calibration</h2>'
                "<p>No labelled slices (the datalist gives no lesion masks).</p></section>")
    edges = np.linspace(0, 1, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot(1, 2, 1)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar(centres, np.nan_to_num(rel.frequency), width=1 / bins, edgecolor="black", alpha=0.6,
           label="lesion frequency")
    ax.plot(rel.confidence, rel.frequency, "o-", color="tab:red", label="per bin")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted lesion probability", ylabel="fraction of lesion slices",
           title=f"reliability (ECE {rel.ece:.3f})")
    ax.legend(fontsize=7, loc="upper left")
    hist = fig.add_subplot(1, 2, 2)
    hist.bar(centres, rel.counts, width=1 / bins, edgecolor="black")
    hist.set(xlim=(0, 1), xlabel="predicted lesion probability", ylabel="slices", title="slices per bin")
    fig.tight_layout()
    return ('<section id="calibration"><h2>Classifier calibration</h2>'
            f'<p class="meta">{int(rel.counts.sum())} slices in {bins} bins; expected calibration error '
            f'<span id="ece">{rel.ece:.4f}</span>.</p>'
            f'<img alt="reliability diagram" src="{png_data_uri(fig)}"></section>')


def _failures_section(rows: Sequence[Mapping[str, Any]]) -> str:
    failed = [r for r in rows if r.get("error")]
    if not failed:
        return '<section id="failures"><h2>Failed cases</h2><p>None: every case finished.</p></section>'
    body = "".join(f'<tr><td>{html.escape(str(r["case"]))}</td><td class="error">{html.escape(str(r["error"]))}</td>'
                   "</tr>" for r in failed)
    return (f'<section id="failures"><h2>Failed cases ({len(failed)})</h2>'
            f"<table><thead><tr><th>case</th><th>error</th></tr></thead><tbody>{body}</tbody></table></section>")


def render_report(
    summary: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    *,
    probabilities: ArrayLike = (),
    labels: ArrayLike = (),
    overlays: Mapping[str, str | Path] | None = None,
    rank_by: str = "ap",
    gallery: int = 4,
    bins: int = 10,
    title: str = "c2f-med cohort audit",
) -> str:
    """The report as one HTML string.

    Args:
        summary: the ``summary.json`` mapping (``bundle``, ``cases``, ``classifier``, ``methods``, ...).
        rows: per-case rows (``per_case.csv``): ``case``, ``error`` (empty on success), ``method`` and scores.
        probabilities, labels: ``[N]`` slice lesion probabilities and 0/1 lesion labels of the
            labelled slices (NaN probabilities, i.e. background slices, are ignored).
        overlays: case -> overlay PNG, for the galleries.
        rank_by: the per-case score that ranks the galleries.
        gallery: cases shown at each end.
        bins: reliability-diagram bins.
    """
    bundle = summary.get("bundle", {})
    failed = sum(bool(r.get("error")) for r in rows)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="meta">Bundle {html.escape(str(bundle.get("path", "")))} '
        f'(sha256 {html.escape(str(bundle.get("sha256", ""))[:16])}...), datalist '
        f'{html.escape(str(summary.get("datalist", "")))}: {len(rows)} cases, {failed} failed.</p>'
        + _summary_section(summary)
        + _distributions_section(rows)
        + _gallery_section(rows, overlays or {}, rank_by, gallery)
        + _calibration_section(probabilities, labels, bins)
        + _failures_section(rows)
        + "</body></html>\n")


def write_report(path: str | Path, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                 **kwargs: Any) -> Path:
    """Write :func:`render_report` atomically to ``path``; ``kwargs`` go to it."""
    write_text(path, render_report(summary, rows, **kwargs))
    return Path(path)
