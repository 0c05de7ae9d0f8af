"""Twin probe: does the slice classifier see the lesion, or only where the slice lies?

Slice AUROC on whole scans mixes two skills: detecting a lesion, and knowing which slices tend to
hold one (mid-brain slices do, edge slices through the skull base or the vertex rarely). The probe
takes the second away. Each probe volume is a domain-randomised anatomy
(:func:`c2f_med.synth.randomised.make_random_anatomy`) with **one** lesion of a given family, and
its lesion-free *twin*: the same anatomy, scanner, bias field and noise, without the lesion
(:meth:`c2f_med.models.train.OnlineLesionSlices.twins`). The classifier's lesion score
``s = logit_lesion - logit_other`` is compared between

- every slice that cuts the lesion and **the same slice of the twin**: ``paired_auroc``, the
  probability that a lesion slice outscores a lesion-free slice at the same position (0.5: the
  lesion is not seen at all; 1: always seen);
- each lesion's best slice (its highest score) and all those twin slices: ``best_slice_auroc``,
  the paired counterpart of the lesion AUROC of :func:`c2f_med.calibrate.classifier_measures`.

Both are Mann-Whitney AUROCs (:func:`c2f_med.metrics.localisation.pixel_auroc`), per lesion family,
so the training families and the held-out ones are read side by side. The draw is seeded: the same
``seed`` and ``volumes`` give the same volumes for every bundle.

``python -m c2f_med.models.probe --bundle B [--bundle B2 ...] --volumes 16 --seed 11`` prints the
table.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TwinSlices", "probe_table", "probe_twins", "twin_scores", "twin_slices"]


@dataclass
class TwinSlices:
    """The slices of one probe volume that cut its lesion, and the same slices of its twin.

    Attributes:
        lesioned: ``n x (2k + 1) x S x S`` normalised model-grid slices through the lesion, each with its
            ``k`` neighbours on either side.
        twin: ``n x (2k + 1) x S x S`` the same slices of the lesion-free twin.
    """

    lesioned: torch.Tensor
    twin: torch.Tensor


def twin_slices(family: str, volumes: int, seed: int, img_size: int = 96,
                regimes: Sequence[str] | None = None, context: int = 0) -> list[TwinSlices]:
    """``volumes`` seeded probe volumes with one ``family`` lesion each (volumes whose lesion cuts no
    slice are skipped), on anatomies of ``regimes`` (default: the training regimes), each slice with
    ``context`` neighbours on either side. The draw does not depend on ``context``."""
    from c2f_med.models.train import OnlineLesionSlices, TrainConfig, twin_rows
    from c2f_med.synth.randomised import FAMILIES, TRAINING_REGIMES, check_names, make_random_anatomy

    check_names((family,), FAMILIES, "families")
    regimes = tuple(regimes) if regimes else TRAINING_REGIMES
    source = OnlineLesionSlices(TrainConfig(families=(family,), lesions_per_volume=(1, 1), img_size=img_size,
                                            model={"context_slices": context}))
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    out = []
    for _ in range(volumes):
        (x, y, index, _), (tx, _, tindex, _) = source.twins(make_random_anatomy(rng, regimes), rng, step=0)
        rows = twin_rows(index, tindex)
        pos = [int(p) for p in np.flatnonzero(y.numpy() == 1) if rows[p] >= 0]
        if pos:
            out.append(TwinSlices(x[pos], tx[rows[pos].tolist()]))
    return out


def twin_scores(model: torch.nn.Module, volumes: Sequence[TwinSlices], lesion_class: int = 1,
                batch: int = 64) -> dict[str, float]:
    """``paired_auroc`` and ``best_slice_auroc`` (module docstring) of ``model`` (``B x C x S x S`` ->
    ``B x 2`` logits) on the probe volumes, with the counts ``volumes`` and ``slices``. Volumes drawn
    with more context than the model sees give it their middle ``C`` channels."""
    from c2f_med.calibrate import batched_logits
    from c2f_med.metrics.localisation import pixel_auroc
    from c2f_med.slices import slice_context

    k = slice_context(model)

    def score(x: torch.Tensor) -> np.ndarray:
        middle = (x.shape[1] - 1) // 2
        if middle < k:
            raise ValueError(f"probe slices with {middle} context slices for a model that sees {k}")
        logits = batched_logits(model, x[:, middle - k: middle + k + 1], batch)
        return (logits[:, lesion_class] - logits[:, 1 - lesion_class]).numpy().astype(np.float64)

    lesion, twin, best = [], [], []
    for v in volumes:
        s = score(v.lesioned)
        lesion.append(s)
        twin.append(score(v.twin))
        best.append(s.max())
    lesion, twin, best = np.concatenate(lesion), np.concatenate(twin), np.array(best)

    def auroc(positive: np.ndarray) -> float:  # ranks only: shifted to the non-negative scores pixel_auroc takes
        scores = np.concatenate([positive, twin])
        return pixel_auroc(scores - scores.min(),
                           np.concatenate([np.ones(positive.size, bool), np.zeros(twin.size, bool)]))

    return {"volumes": len(volumes), "slices": int(lesion.size), "paired_auroc": auroc(lesion),
            "best_slice_auroc": auroc(best)}


def probe_twins(bundles: Sequence[str], families: Sequence[str], volumes: int, seed: int,
                regimes: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """``{family: {bundle: twin_scores}}``: every bundle on the same probe volumes of each family.

    Raises:
        ValueError: the bundles' input sizes differ (one probe draw per size would not be the same cases).
    """
    from c2f_med.models.bundle import load_bundle
    from c2f_med.slices import slice_context

    loaded = {b: load_bundle(b) for b in bundles}
    sizes = {int(m.model.input_size[0]) for m in loaded.values()}
    if len(sizes) != 1:
        raise ValueError(f"the bundles take different input sizes {sorted(sizes)}: probe them separately")
    size = sizes.pop()
    context = max(slice_context(m.model) for m in loaded.values())
    out = {}
    for family in families:
        draw = twin_slices(family, volumes, seed, size, regimes, context)
        if not draw:
            raise ValueError(f"no {family} lesion of {volumes} probe volumes cut a slice: draw more volumes")
        out[family] = {b: twin_scores(m.model, draw) for b, m in loaded.items()}
    return out


def probe_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table of :func:`probe_twins`' results: one row per (family, bundle)."""
    from c2f_med.synth.randomised import HELD_OUT_FAMILIES

    lines = ["| family | weights | volumes | lesion slices | paired slice AUROC | best-slice AUROC |",
             "|---|---|---:|---:|---:|---:|"]
    for family, by_bundle in results.items():
        name = f"{family} (held out)" if family in HELD_OUT_FAMILIES else family
        for bundle, m in by_bundle.items():
            lines.append(f"| {name} | {bundle} | {m['volumes']} | {m['slices']} | {m['paired_auroc']:.3f} | "
                         f"{m['best_slice_auroc']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m c2f_med.models.probe --bundle B ...``: print :func:`probe_table`."""
    from c2f_med.errors import InputError
    from c2f_med.synth.randomised import FAMILIES

    parser = argparse.ArgumentParser(prog="python -m c2f_med.models.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", action="append", required=True, help="a bundle directory (repeatable)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated lesion families")
    parser.add_argument("--regimes", default="", help="comma-separated tissue regimes (default: the training ones)")
    parser.add_argument("--volumes", type=int, default=16, help="probe volumes per family")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = parser.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    families = [f for f in a.families.split(",") if f]
    regimes = [r for r in a.regimes.split(",") if r] or None
    try:
        print(probe_table(probe_twins(a.bundle, families, a.volumes, a.seed, regimes)), end="")
    except (InputError, ValueError) as err:
        raise SystemExit(str(err)) from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
