"""The audit's HTML report: calibration numbers, self-contained structure, and a headless render."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from c2f_med.report import SUMMARY_COLUMNS, reliability, render_report, write_report

SECTIONS = ["summary", "distributions", "gallery", "calibration", "failures"]


class Parsed(HTMLParser):
    """Tags with their attributes, section ids in order, and the text of every element by id/class."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.sections: list[str] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "section":
            self.sections.append(attrs.get("id"))

    def handle_data(self, data):
        self.text.append(data)

    def images(self) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == "img"]


def png_files(folder: Path, names: list[str]) -> dict[str, Path]:
    """One small distinct PNG per name (a grey level per case)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate(names):
        out[name] = folder / f"{name}.png"
        Image.fromarray(np.full((20, 1200, 3), 20 * i, dtype=np.uint8)).save(out[name])
    return out


def example(tmp_path: Path):
    """A summary, 6 scored cases (ap = 0.1 ... 0.6) and one failure, their overlays, slice probabilities."""
    rng = np.random.default_rng(0)
    names = [f"case{i}" for i in range(6)]
    rows = [{"case": n, "error": "", "method": "c2f", "ap": 0.1 * (i + 1), "relevance_mass": rng.uniform(),
             "deletion_auc": rng.uniform(), "slices": 3} for i, n in enumerate(names)]
    rows.append({"case": "broken", "error": "/data/broken.nii.gz: not a NIfTI file <bad header>", "method": "c2f"})
    summary = {"bundle": {"path": "/b", "sha256": "ab" * 32}, "datalist": "dl.json", "cases": 6, "lesion_slices": 18,
               "classifier": {"slice_auroc": 0.875, "slice_accuracy": 0.75, "lesions": 7, "lesion_auroc": 0.9625,
                              "lesion_sensitivity": 0.857},
               "methods": {"c2f": {k: 0.5 for k in SUMMARY_COLUMNS} | {"ap": 0.4321, "slices": 18}}}
    p = rng.uniform(size=200)
    y = rng.uniform(size=200) < p
    return summary, rows, png_files(tmp_path / "overlays", names), p, y


def test_reliability_bins_and_ece():
    p = np.array([0.05, 0.15, 0.12, 0.95, math.nan])
    y = np.array([0, 0, 1, 1, 1])
    r = reliability(p, y, bins=10)
    assert r.counts.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]
    np.testing.assert_allclose(r.confidence[[0, 1, 9]], [0.05, 0.135, 0.95], atol=1e-6)
    np.testing.assert_allclose(r.frequency[[0, 1, 9]], [0.0, 0.5, 1.0])
    assert np.isnan(r.confidence[5]) and np.isnan(r.frequency[5])
    # ECE = sum_b n_b / N |freq_b - conf_b| over the 4 finite probabilities
    assert r.ece == pytest.approx((0.05 + 2 * abs(0.5 - 0.135) + 0.05) / 4, abs=1e-6)


def test_reliability_calibrated_vs_overconfident():
    rng = np.random.default_rng(1)
    p = rng.uniform(size=20000)
    assert reliability(p, rng.uniform(size=p.size) < p).ece < 0.02
    assert reliability(np.full(100, 0.9), np.zeros(100)).ece == pytest.approx(0.9, abs=1e-6)
    empty = reliability([math.nan], [1])
    assert math.isnan(empty.ece) and empty.counts.sum() == 0
    with pytest.raises(ValueError, match="shape"):
        reliability([0.1, 0.2], [1])


def test_report_is_self_contained_with_every_section(tmp_path):
    summary, rows, overlays, p, y = example(tmp_path)
    path = write_report(tmp_path / "report.html", summary, rows, probabilities=p, labels=y, overlays=overlays,
                        rank_by="ap", gallery=2)
    text = path.read_text()
    doc = Parsed(text)
    assert doc.sections == SECTIONS
    # nothing outside the file: no scripts, stylesheets, frames or remote references
    assert not [t for t, _ in doc.tags if t in ("script", "link", "iframe", "object", "embed")]
    for _, attrs in doc.tags:
        for key in ("src", "href"):
            assert not (attrs.get(key) or "").startswith(("http:", "https:", "file:", "//")), attrs
    images = doc.images()
    # distributions + 2 best + 2 worst overlays + calibration
    assert len(images) == 6
    for img in images:
        head, data = img["src"].split(",", 1)
        assert head == "data:image/png;base64"
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "PNG"
            if img["alt"] in overlays:  # 1200 px wide overlays are shrunk
                assert im.width == 900
    body = " ".join(doc.text)
    assert "0.432" in body and "0.875" in body  # the summary table's numbers
    assert "7 3-D lesions" in body and "0.963" in body and "0.857" in body  # the per-lesion classifier
    assert "1 failed" in body and "/data/broken.nii.gz: not a NIfTI file <bad header>" in body
    assert "<bad header>" not in text  # escaped in the markup


def test_gallery_ranks_best_and_worst(tmp_path):
    summary, rows, overlays, p, y = example(tmp_path)
    doc = Parsed(render_report(summary, rows, overlays=overlays, rank_by="ap", gallery=2))
    shown = [a["alt"] for a in doc.images() if a["alt"] in overlays]
    assert shown == ["case5", "case4", "case0", "case1"]  # best first, then worst first
    doc = Parsed(render_report(summary, rows, overlays=overlays, rank_by="deletion_auc", gallery=1))
    shown = [a["alt"] for a in doc.images() if a["alt"] in overlays]
    by_deletion = sorted(rows[:6], key=lambda r: r["deletion_auc"])  # lower is better
    assert shown == [by_deletion[0]["case"], by_deletion[-1]["case"]]


def test_report_without_labels_or_successes(tmp_path):
    summary = {"bundle": {}, "methods": {}, "classifier": {}}
    rows = [{"case": "a", "error": "a.nii.gz: file not found", "method": "c2f"}]
    doc = Parsed(render_report(summary, rows))
    assert doc.sections == SECTIONS
    assert doc.images() == []
    body = " ".join(doc.text)
    assert "No labelled slices" in body and "a.nii.gz: file not found" in body


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_chromium_renders_what_a_reader_sees(tmp_path):
    """In a real browser: the page renders (a non-blank screenshot), and the DOM Chromium built holds every
    section, the tables with their rows, and images that decoded (natural width > 0)."""
    summary, rows, overlays, p, y = example(tmp_path)
    path = write_report(tmp_path / "report.html", summary, rows, probabilities=p, labels=y, overlays=overlays)
    # a script run by the browser writes what it rendered into the DOM that --dump-dom prints
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text().replace("</body>", """<script>window.addEventListener("load", () => {
  const ids = [...document.querySelectorAll("section[id]")].map(s => s.id);
  const rows = [...document.querySelectorAll("table")].map(t => t.rows.length);
  const images = [...document.images].map(i => i.complete && i.naturalWidth > 0);
  const out = document.createElement("pre"); out.id = "rendered";
  out.textContent = JSON.stringify({ids, rows, images});
  document.body.appendChild(out);
});</script></body>"""))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600"]
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", path.resolve().as_uri()], check=True,
                   capture_output=True, timeout=120)
    with Image.open(shot) as im:
        grey = np.asarray(im.convert("L"), dtype=np.float64)
    assert grey.shape == (1600, 1200)
    assert grey.std() > 10  # text, tables and plots, not a blank page
    assert (grey < 128).mean() > 0.01
    dom = subprocess.run(["chromium", *flags, "--virtual-time-budget=5000", "--dump-dom", probe.resolve().as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    rendered = json.loads(html.unescape(dom.split('<pre id="rendered">', 1)[1].split("</pre>", 1)[0]))
    assert [i for i in rendered["ids"] if i in SECTIONS] == SECTIONS
    assert rendered["rows"] and all(n >= 2 for n in rendered["rows"])  # every table has a header and a row
    assert len(rendered["images"]) >= 3 and all(rendered["images"])  # the plots and overlays decoded


def test_summary_shows_the_strata_tp_first(tmp_path):
    summary, rows, overlays, p, y = example(tmp_path)
    scores = summary["methods"]["c2f"]
    summary = {**summary, "operating_point": {"threshold": 0.5, "source": "default"},
               "classifier": {**summary["classifier"], "threshold": 0.5, "specificity": 0.8125, "ece": 0.04},
               "strata": {"tp": {"slices": 12, "methods": {"c2f": {**scores, "ap": 0.6543}}},
                          "fn": {"slices": 6, "methods": {"c2f": {**scores, "ap": 0.0123}}},
                          "fp": {"slices": 4, "methods": {"c2f": {"mass_foreground": 0.7777, "slices": 4}}}}}
    text = render_report(summary, rows)
    assert text.index('id="tp"') < text.index('id="fn"') < text.index('id="all"') < text.index('id="fp"')
    body = " ".join(Parsed(text).text)
    assert "0.654" in body and "0.012" in body and "0.778" in body and "0.812" in body
    assert "a default threshold" in body
