"""The weights committed in the bundle: they load safely and really detect lesions on fresh scans."""

from __future__ import annotations

import numpy as np
import torch

from c2f_med.io.transforms import MRPercentileNorm
from c2f_med.metrics.localisation import pixel_auroc
from c2f_med.models.bundle import DEFAULT_BUNDLE, load_bundle
from c2f_med.models.train import bundle_network, slice_dataset
from c2f_med.models.vit import LesionViT
from c2f_med.synth.dataset import synth_case

FRESH_SEED = 101  # never used by training (online seeds 0, 11, 12), validation (2, 5) or the demo test split (3)


def test_weights_load_with_weights_only():
    state = torch.load(DEFAULT_BUNDLE / "models" / "model.pt", weights_only=True, map_location="cpu")
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    img_size, kwargs = bundle_network(DEFAULT_BUNDLE)
    LesionViT(img_size=img_size, **kwargs).load_state_dict(state)


def fresh_slice_auroc(cases: int = 6) -> tuple[float, int, int]:
    """Slice AUROC of the committed model on ``cases`` fresh synth cases, with slice and lesion-slice counts."""
    bundle = load_bundle(DEFAULT_BUNDLE)
    probs, labels = [], []
    for index in range(cases):
        case = synth_case(FRESH_SEED, index)
        image = MRPercentileNorm()(torch.from_numpy(case.image.astype(np.float32))[None])[0]
        x, y, _, _ = slice_dataset(torch.as_tensor(image), torch.from_numpy(case.label), bundle.model.input_size[0])
        with torch.inference_mode():
            probs.append(torch.softmax(bundle.model(x), 1)[:, bundle.lesion_class].numpy())
        labels.append(y.numpy())
    p, y = np.concatenate(probs), np.concatenate(labels)
    assert 0 < y.sum() < len(y)
    return pixel_auroc(p, y), len(y), int(y.sum())


def test_committed_model_detects_lesions_on_fresh_scans():
    """A small-set check (random weights score about 0.5). It is not the 0.95 target: on 6 cases the
    AUROC varies by several hundredths with the cases drawn (the bundle README gives 30 cases)."""
    auroc, n, pos = fresh_slice_auroc()
    assert auroc >= 0.9, f"slice AUROC {auroc:.3f} on {n} fresh slices ({pos} with lesion)"


HELD_OUT_SEED = 161  # never used by training (online seed 18), validation (5, 41) or the reported tests (61-63, 101)
LESION_AUROC_MIN = 0.70  # 0.4.0 weights: 0.795 on the 30 reported held-out-family cases; random weights ~0.5


def held_out_measures(cases: int = 4) -> dict:
    """The committed bundle at its own operating point on fresh cases of the held-out lesion families
    (cystic, satellites), two lesions each, on any tissue regime (the held-out one included)."""
    from c2f_med.calibrate import classifier_measures, volume_logits
    from c2f_med.synth.randomised import HELD_OUT_FAMILIES, REGIMES, synth_randomised_case

    bundle = load_bundle(DEFAULT_BUNDLE)
    scored = []
    for index in range(cases):
        case, _, _ = synth_randomised_case(HELD_OUT_SEED, index, families=HELD_OUT_FAMILIES, regimes=REGIMES,
                                           n_lesions=2)
        image = MRPercentileNorm()(torch.from_numpy(case.image.astype(np.float32))[None])[0]
        scored.append(volume_logits(bundle, torch.as_tensor(image), torch.from_numpy(case.label), case.case_id))
    return classifier_measures(scored, bundle.operating_point, bundle.lesion_class)


def test_committed_bundle_has_a_calibrated_operating_point():
    point = load_bundle(DEFAULT_BUNDLE).operating_point
    assert point.source == "bundle" and 0.05 < point.threshold < 0.95 and 0.2 < point.temperature < 5


def test_committed_model_finds_held_out_lesion_families():
    """Random weights score a lesion AUROC near 0.5 and, at a threshold for 90 % specificity, find
    about a tenth of the lesions."""
    m = held_out_measures()
    assert m["lesions"] >= 6
    assert m["lesion_auroc"] >= LESION_AUROC_MIN, m
    assert m["specificity"] >= 0.8, m
