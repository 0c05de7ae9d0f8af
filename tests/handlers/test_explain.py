"""ExplainHandler on a SupervisedEvaluator: a gradient method under inference mode, outputs with the scan's meta."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor

from c2f_med.explain import create, explain_volume
from c2f_med.handlers import ExplainHandler, case_ids, no_forward


def test_gradient_method_runs_in_inference_mode(evaluate, bundle):
    items, _ = evaluate([ExplainHandler("gae", target=bundle.lesion_class)], inference_mode=True)
    assert len(items) == 2
    for item in items:
        image, saliency, result = item["image"], item["saliency"], item["explanation"]
        assert isinstance(saliency, MetaTensor) and saliency.shape == image.shape
        torch.testing.assert_close(saliency.affine, image.affine)
        assert [op["class"] for op in saliency.applied_operations] == [op["class"] for op in image.applied_operations]
        assert result.backward_passes > 0 and result.method == "gae"
        assert float(saliency.min()) >= 0 and float(saliency.max()) == pytest.approx(1.0)
        # the same maps and probabilities as explain_volume outside any engine
        reference = explain_volume(image.clone(), create("gae", bundle.model), target=bundle.lesion_class,
                                   progress=False)
        torch.testing.assert_close(saliency.as_tensor(), reference.saliency.as_tensor())
        expected = torch.tensor([p.probability for p in reference.predictions])
        torch.testing.assert_close(item["pred"], expected, equal_nan=True)
        assert item["pred"].shape == (image.shape[-1],)
        assert item["explain_info"]["method"] == "gae" and item["explain_info"]["seconds"] > 0


def test_min_probability_skips_slices(evaluate, bundle):
    items, _ = evaluate([ExplainHandler("rollout", min_probability=1.1)])
    for item in items:
        assert not any(p.explained for p in item["explanation"].predictions)
        assert float(item["saliency"].abs().max()) == 0
        assert not any(math.isnan(p) for p in item["pred"].tolist())  # every slice was classified


def test_case_ids_from_datalist(evaluate):
    items, evaluator = evaluate([ExplainHandler("attention")])
    evaluator.state.batch = [{"case_id": "x"}, {"image": items[0]["image"]}]
    names = case_ids(evaluator)
    assert names == ["x", "a"]


def test_no_forward_is_a_placeholder():
    assert no_forward(torch.ones(3, 1, 4, 5, 6), torch.nn.Identity()).shape == (3, 0)


def _engine(output, network) -> Engine:
    engine = Engine(lambda _engine, _batch: output)
    engine.network = network
    ExplainHandler("attention").attach(engine)
    return engine


def test_refuses_other_networks_and_collated_output(bundle):
    decollated = [{"image": MetaTensor(torch.rand(1, 8, 8, 2))}]
    with pytest.raises(TypeError, match="TokenViT"):
        _engine(decollated, torch.nn.Linear(2, 2)).run([0])
    with pytest.raises(TypeError, match="decollate"):
        _engine({"image": decollated[0]["image"][None]}, bundle.model).run([0])


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown explainer 'nope'"):
        ExplainHandler("nope")
