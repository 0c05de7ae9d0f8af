"""The twin probe: seeded lesion / twin slices, and AUROCs that follow what the model scores."""

import pytest
import torch

from c2f_med.models.probe import TwinSlices, twin_scores, twin_slices


class SumModel(torch.nn.Module):
    """Lesion score = sign * the slice's intensity sum (logits ``[0, s]``)."""

    def __init__(self, sign: float):
        super().__init__()
        self.sign = sign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.sign * x.flatten(1).sum(1)
        return torch.stack([torch.zeros_like(s), s], 1)


def test_twin_slices_are_seeded_and_differ_only_by_the_lesion():
    a = twin_slices("homogeneous", volumes=1, seed=3, img_size=32)
    b = twin_slices("homogeneous", volumes=1, seed=3, img_size=32)
    assert len(a) == 1 and a[0].lesioned.shape == a[0].twin.shape and a[0].lesioned.shape[1:] == (1, 32, 32)
    assert torch.equal(a[0].lesioned, b[0].lesioned) and torch.equal(a[0].twin, b[0].twin)
    diff = (a[0].lesioned - a[0].twin).abs().flatten(1)
    assert (diff.amax(1) > 0.05).all()  # every kept slice shows the lesion
    assert (diff < 1e-3).float().mean() > 0.8  # and nothing else changed much


def test_twin_scores_follow_the_model():
    volumes = [TwinSlices(torch.ones(3, 1, 8, 8) + k, torch.zeros(3, 1, 8, 8)) for k in range(2)]
    seeing = twin_scores(SumModel(1.0), volumes)
    assert seeing == {"volumes": 2, "slices": 6, "paired_auroc": 1.0, "best_slice_auroc": 1.0}
    inverted = twin_scores(SumModel(-1.0), volumes)
    assert inverted["paired_auroc"] == 0.0 and inverted["best_slice_auroc"] == 0.0
    blind = twin_scores(SumModel(0.0), volumes)
    assert blind["paired_auroc"] == pytest.approx(0.5)


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="families must be among"):
        twin_slices("blob", volumes=1, seed=0)


def test_probe_slices_with_context_hold_the_2d_draw_in_their_middle_channel():
    flat = twin_slices("homogeneous", volumes=1, seed=3, img_size=32)
    wide = twin_slices("homogeneous", volumes=1, seed=3, img_size=32, context=2)
    assert wide[0].lesioned.shape[1] == 5
    torch.testing.assert_close(wide[0].lesioned[:, 2:3], flat[0].lesioned)
    torch.testing.assert_close(wide[0].twin[:, 2:3], flat[0].twin)


def test_a_model_with_less_context_than_the_probe_gets_its_middle_channels():
    lesioned = torch.zeros(3, 3, 8, 8)
    lesioned[:, 1] = 1.0  # only the middle slice shows the lesion; the neighbours are darker than the twin
    lesioned[:, [0, 2]] = -1.0
    volumes = [TwinSlices(lesioned, torch.zeros(3, 3, 8, 8))]
    assert twin_scores(SumModel(1.0), volumes)["paired_auroc"] == 1.0  # a 2-D model sees channel 1 alone
    wide = SumModel(1.0)
    wide.slice_context = 1  # sums all three channels: -1 against 0
    assert twin_scores(wide, volumes)["paired_auroc"] == 0.0
    wide.slice_context = 2
    with pytest.raises(ValueError, match="context"):
        twin_scores(wide, volumes)
