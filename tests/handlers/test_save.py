"""SaliencySaver: the case folders equal ``c2f-med explain``'s, the saliency on the input file's grid."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Invertd

from c2f_med.case import explain_case
from c2f_med.handlers import ExplainHandler, LesionScoreHandler, SaliencySaver

from .conftest import AFFINE, SHAPE


def test_case_folders_match_explain_case(evaluate, bundle, cases, tmp_path):
    out = tmp_path / "run"
    items, evaluator = evaluate([ExplainHandler("rollout", score=True, bundle=bundle), LesionScoreHandler(),
                                 SaliencySaver(out, bundle)])
    loading = evaluator.data_loader.dataset.transform  # load_case_transforms, as Invertd needs it
    explain_case(bundle, cases / "images" / "a.nii.gz", tmp_path / "cli", mask=cases / "labels" / "a.nii.gz",
                 method="rollout", progress=False)
    explain_case(bundle, cases / "images" / "b.nii.gz", tmp_path / "cli", method="rollout", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]  # no temporary folders left
    for case, item in zip("ab", items):
        got, want = out / case, tmp_path / "cli" / case
        assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
        image = nib.load(got / "saliency.nii.gz")
        assert image.shape == SHAPE and image.get_data_dtype() == np.float32
        np.testing.assert_allclose(image.affine, AFFINE)
        # the LPS file grid is the RAS-loaded grid flipped along x and y
        np.testing.assert_allclose(image.get_fdata(), np.flip(item["saliency"][0].numpy(), (0, 1)), atol=1e-6)
        np.testing.assert_allclose(image.get_fdata(), nib.load(want / "saliency.nii.gz").get_fdata(), atol=1e-6)
        # MONAI's Invertd with the loading transforms gives the same volume and affine
        inverted = Invertd("saliency", loading, orig_keys="image")(item)["saliency"]
        np.testing.assert_allclose(inverted[0].numpy(), image.get_fdata(), atol=1e-6)
        np.testing.assert_allclose(inverted.affine.numpy(), AFFINE)
        assert (got / "predictions.csv").read_text() == (want / "predictions.csv").read_text()
        assert (got / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        prov, ref = (json.load(open(f / "provenance.json")) for f in (got, want))
        assert (prov["method"], prov["params"], prov["inputs"]) == (ref["method"], ref["params"], ref["inputs"])
        assert prov["bundle"]["sha256"] == bundle.sha256
    got, want = (json.load(open(f / "a" / "scores.json")) for f in (out, tmp_path / "cli"))
    assert got["volume"] == pytest.approx(want["volume"], nan_ok=True)
    for g, w in zip(got["per_slice"], want["per_slice"], strict=True):
        assert g == pytest.approx(w, nan_ok=True)


def test_scores_only_after_the_score_handler(evaluate, bundle, tmp_path):
    evaluate([ExplainHandler("attention"), SaliencySaver(tmp_path, bundle)])
    assert (tmp_path / "a" / "saliency.nii.gz").exists() and not (tmp_path / "a" / "scores.json").exists()
