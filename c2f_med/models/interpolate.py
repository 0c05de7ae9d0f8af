"""Weight-space interpolation of a fine-tuned classifier with the weights it was fine-tuned from.

Fine-tuning on a new distribution (here: domain-randomised contrasts) tends to gain on it and lose
some of what the starting weights did well. Interpolating the two state dicts,

    w(alpha) = (1 - alpha) * w_start + alpha * w_tuned,      alpha in [0, 1],

keeps both in one network of the same size and cost (WiSE-FT: Wortsman et al., "Robust fine-tuning
of zero-shot models", CVPR 2022); it works because a fine-tune stays in the start's loss basin, so
the straight line between them does not cross a barrier. ``alpha`` is chosen on validation cases,
never on the test sets: :func:`run_interpolate` scores every ``alpha`` by the slice AUROC of the
datalist's validation section (the criterion training selects its checkpoints by) and writes the
best weights into the bundle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from c2f_med.errors import InputError

__all__ = ["interpolate_weights", "run_interpolate"]


def interpolate_weights(start: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * tuned`` for every floating-point tensor; other tensors (counters,
    integer buffers) are taken from ``tuned``.

    Raises:
        ValueError: ``alpha`` outside [0, 1], or the two state dicts differ in keys or shapes.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} is outside [0, 1]")
    if set(start) != set(tuned):
        raise ValueError(f"the state dicts differ in keys: {sorted(set(start) ^ set(tuned))[:5]}")
    out = {}
    for key, b in tuned.items():
        a = start[key]
        if a.shape != b.shape:
            raise ValueError(f"{key}: shape {tuple(a.shape)} against {tuple(b.shape)}")
        out[key] = torch.lerp(a.to(b.dtype), b, alpha) if b.is_floating_point() else b.clone()
    return out


def _state(path: Path, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict at ``path``, fitted to ``net`` (:func:`~c2f_med.models.vit.fit_state_dict`)."""
    from c2f_med.models.bundle import load_weights
    from c2f_med.models.vit import fit_state_dict

    load_weights(net, path, problem="is not a state dict of the bundle's network", adapt=fit_state_dict)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def run_interpolate(bundle_dir: str | Path, start: str | Path, tuned: str | Path, datalist: str | Path, *,
                    alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), section: str = "validation",
                    progress: bool = False) -> dict:
    """``c2f-med interpolate``: score ``w(alpha)`` for each ``alpha`` on the validation cases and write the
    best into ``bundle_dir/models/model.pt`` (atomically; the smaller ``alpha`` on a tie), with
    ``models/interpolation.json``: both weights' SHA-256, every ``alpha`` and its validation slice AUROC.

    The bundle must build :class:`~c2f_med.models.vit.LesionViT` (as ``c2f-med train`` does). Run
    ``c2f-med calibrate`` afterwards: the operating point belongs to the weights.

    Raises:
        InputError: a weights file or the bundle is missing or does not fit, or the section has no
            labelled cases.
    """
    from c2f_med.atomic import atomic_path, write_json
    from c2f_med.calibrate import classifier_measures, labelled_volumes, volume_logits
    from c2f_med.io.manifest import read_datalist
    from c2f_med.models.bundle import load_bundle, sha256_file
    from c2f_med.models.train import bundle_network

    bundle_dir, start, tuned = Path(bundle_dir), Path(start), Path(tuned)
    bundle_network(bundle_dir)  # the bundle builds a LesionViT, or one line saying what it builds
    bundle = load_bundle(bundle_dir)
    states = _state(start, bundle.model), _state(tuned, bundle.model)
    items = read_datalist(datalist, section)
    if not items:
        raise InputError(datalist, f"has no {section!r} cases to choose alpha on")
    volumes = list(labelled_volumes(bundle, items, progress))  # loaded once, classified once per alpha
    lesion = 1 if bundle.lesion_class is None else bundle.lesion_class
    rows = []
    for alpha in sorted({float(a) for a in alphas}):
        weights = interpolate_weights(*states, alpha)
        bundle.model.load_state_dict(weights)
        cases = [volume_logits(bundle, *volume) for volume in volumes]
        score = classifier_measures(cases, bundle.operating_point, lesion)["slice_auroc"]
        rows.append({"alpha": alpha, "val_auroc": score, "weights": weights})
    best = max(rows, key=lambda r: (r["val_auroc"], -r["alpha"]))
    with atomic_path(bundle_dir / "models" / "model.pt") as tmp:
        torch.save(best["weights"], tmp)
    result = {
        "start": {"path": str(start), "sha256": sha256_file(start)},
        "tuned": {"path": str(tuned), "sha256": sha256_file(tuned)},
        "datalist": str(datalist), "section": section,
        "alphas": [{"alpha": r["alpha"], "val_auroc": r["val_auroc"]} for r in rows],
        "selected": best["alpha"],
        "sha256": sha256_file(bundle_dir / "models" / "model.pt"),
    }
    write_json(bundle_dir / "models" / "interpolation.json", result)
    return result
