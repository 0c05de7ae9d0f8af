"""Montage PNGs: which slices, display orientation, size, content, contour colour."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from c2f_med.export.overlays import (
    CONTOUR_COLOUR,
    DPI,
    display_slice,
    figure_inches,
    montage_slices,
    overlay_montage,
)

SHAPE = (24, 20, 16)


def ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    return ((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(0) <= radius**2


def test_lesion_slices_are_all_shown_when_few():
    mask = np.zeros(SHAPE, bool)
    mask[5:9, 5:9, [3, 4, 9]] = True
    saliency = np.random.default_rng(0).random(SHAPE)
    assert montage_slices(saliency, mask, axis=2, max_slices=12) == [3, 4, 9]
    assert montage_slices(saliency, mask, axis=0, max_slices=12) == [5, 6, 7, 8]


def test_many_lesion_slices_are_spread_and_keep_the_largest():
    mask = np.zeros(SHAPE, bool)
    mask[4:8, 4:8, 1:15] = True  # 14 lesion slices of 16 voxels
    mask[2:12, 2:12, 6] = True  # slice 6 has the largest lesion
    chosen = montage_slices(np.zeros(SHAPE), mask, axis=2, max_slices=4)
    assert len(chosen) == 4 and chosen == sorted(set(chosen))
    assert 6 in chosen
    assert chosen[0] == 1 and chosen[-1] == 14  # spread over the lesion's extent
    assert all(mask[:, :, k].any() for k in chosen)


def test_without_lesion_the_most_salient_slices_are_shown():
    saliency = np.zeros(SHAPE)
    for k, value in [(2, 0.5), (7, 1.0), (11, 0.8), (13, 0.1)]:
        saliency[:, :, k] = value
    assert montage_slices(saliency, None, axis=2, max_slices=3) == [2, 7, 11]
    assert montage_slices(saliency, np.zeros(SHAPE, bool), axis=2, max_slices=3) == [2, 7, 11]  # empty mask


def test_display_is_radiological():
    """RAS array: the patient's right (high i) goes to the image's left, anterior (high j) up."""
    volume = np.zeros(SHAPE)
    volume[SHAPE[0] - 1, SHAPE[1] - 1, 5] = 1.0  # right-anterior corner of axial slice 5
    axial = display_slice(volume, 5, axis=2)
    assert axial.shape == (SHAPE[1], SHAPE[0])  # rows follow j, columns follow i
    assert axial[0, 0] == 1.0  # top left
    volume[:] = 0
    volume[3, SHAPE[1] - 1, SHAPE[2] - 1] = 1.0  # anterior-superior corner of sagittal slice 3
    assert display_slice(volume, 3, axis=0)[0, 0] == 1.0  # superior up, anterior left


def scan_and_saliency():
    rng = np.random.default_rng(1)
    image = np.clip(ball(SHAPE, (12, 10, 8), 9) * 0.6 + rng.normal(0, 0.05, SHAPE), 0, 1)
    mask = ball(SHAPE, (15, 8, 8), 3)
    saliency = np.exp(-((np.indices(SHAPE) - np.reshape((15, 8, 8), (3, 1, 1, 1))) ** 2).sum(0) / 18.0)
    return image.astype(np.float32), saliency.astype(np.float32), mask


def contour_pixels(png: np.ndarray) -> int:
    """Pixels within a small distance of the contour colour (antialiasing blends the line's edges)."""
    return int((np.abs(png[..., :3] - np.asarray(to_rgb(CONTOUR_COLOUR))).max(-1) < 0.1).sum())


def test_montage_png_shows_scan_saliency_and_lesion_contour(tmp_path):
    image, saliency, mask = scan_and_saliency()
    path = overlay_montage(image, saliency, mask, axis=2, path=tmp_path / "out" / "overlay.png", title="case: c2f")
    assert sorted(p.name for p in path.parent.iterdir()) == ["overlay.png"]  # no temporary left
    png = matplotlib.image.imread(path)
    panels = len(montage_slices(saliency, mask, 2))  # 7 lesion slices: 2 rows of 4
    width, height = figure_inches(panels)
    assert png.shape[:2] == (round(height * DPI), round(width * DPI))
    assert png[..., :3].std() > 0.05
    assert contour_pixels(png) > 20


def test_montage_without_mask_has_no_contour(tmp_path):
    image, saliency, _ = scan_and_saliency()
    path = overlay_montage(image, saliency, None, axis=1, path=tmp_path / "overlay.png", title="no mask",
                           slices=[4, 8, 12], spacing=(1.0, 1.0, 2.0))
    png = matplotlib.image.imread(path)
    width, height = figure_inches(3)
    assert png.shape[:2] == (round(height * DPI), round(width * DPI))
    assert png[..., :3].std() > 0.05
    assert contour_pixels(png) == 0


def test_mismatched_shapes_are_refused(tmp_path):
    image, saliency, mask = scan_and_saliency()
    with pytest.raises(ValueError, match="one shape"):
        overlay_montage(image, saliency[:-1], mask, axis=2, path=tmp_path / "x.png", title="")
    with pytest.raises(ValueError, match="indices below 16"):
        overlay_montage(image, saliency, mask, axis=2, path=tmp_path / "x.png", title="", slices=[16])
    assert not list(tmp_path.iterdir())


def test_without_lesion_the_montage_stays_inside_the_body():
    image = np.zeros(SHAPE, np.float32)
    image[:, :, 3:13] = ball(SHAPE, (12, 10, 8), 9)[:, :, 3:13] * 0.6  # a "head" on slices 3-12
    image[10:12, 10:12, 0] = 0.6  # a near-empty end slice
    saliency = np.zeros(SHAPE, np.float32)
    saliency[:, :, 0] = 1.0  # all the saliency on the end slice, as per-slice normalised noise would be
    saliency[:, :, 8] = 0.2
    chosen = montage_slices(saliency, None, axis=2, max_slices=3, image=image)
    assert 0 not in chosen and 8 in chosen
    probability = np.full(SHAPE[2], 0.1)
    probability[[5, 11]] = [0.9, 0.8]
    probability[0] = 0.99  # outside the body: never chosen
    assert montage_slices(saliency, None, axis=2, max_slices=2, image=image, probability=probability) == [5, 11]


def test_titles_and_footers_fit_a_one_panel_figure(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    captured = {}
    original = Figure.savefig

    def spy(fig, *args, **kwargs):
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        captured["boxes"] = [t.get_window_extent(renderer) for t in (fig._suptitle, fig._supxlabel)]
        captured["figure"] = fig.bbox
        captured["texts"] = (fig._suptitle.get_text(), fig._supxlabel.get_text())
        return original(fig, *args, **kwargs)

    image = np.full(SHAPE, 0.5, np.float32)
    Figure.savefig = spy
    try:
        overlay_montage(image, np.random.default_rng(1).random(SHAPE), None, axis=2, path=tmp_path / "o.png",
                        title="a-rather-long-case-identifier-from-a-dicom-series: c2f", slices=[4])
    finally:
        Figure.savefig = original
    for box in captured["boxes"]:
        assert box.x0 >= 0 and box.x1 <= captured["figure"].x1 and box.y0 >= 0 and box.y1 <= captured["figure"].y1
    title, footer = captured["texts"]
    assert "no lesion annotated" in title
    assert "lesion outline" not in footer  # nothing outlined, so no legend for it
