"""``c2f-med bench``: time every explanation method on the same slices, and one whole volume with c2f.

The slices: ``n_slices`` lesion slices (axial), evenly spread over the lesion slices of the
datalist's testing cases, or, without a datalist, of small synthetic cases
(:func:`c2f_med.synth.dataset.synth_case`, written to a temporary folder as NIfTI) loaded exactly
as ``c2f-med explain`` loads a scan. They are put on the model's input grid once and saved, so every
method gets the very same input tensor.

Each method runs in a fresh subprocess (``python -m c2f_med.bench --child``), one after the
other, with the parent's torch thread count: it loads the bundle and the slices, explains one
slice (warm-up), then explains all slices in batches of :data:`SLICE_BATCH`, timed with
``time.perf_counter`` (CUDA synchronised).

Peak RSS (host memory; GPU memory is not counted): no other method ever ran in the measuring
process, so its peak is the method's. Loading (imports, ``torch.load``) has transient peaks of
its own that can exceed the method's, so once the bundle and the slices are loaded the kernel's
peak counter is reset to the current RSS (Linux: ``5`` written to ``/proc/self/clear_refs``),
and ``peak_rss_mb`` is ``VmHWM`` of ``/proc/self/status`` after the timed run: the resident
runtime (Python, torch, the model, the slices; ``baseline_rss_mb``, the RSS at the reset) plus
the most the method added on top. Where that is unavailable, ``ru_maxrss``
(``resource.getrusage``) is used, which also covers loading; ``peak_rss_source`` says which.

``rise`` (RISE with C2F's budget): matching the budget per slice would run c2f inside RISE's timing,
so the bench gives RISE a fixed ``n_masks``, c2f's mean forward passes per slice measured just
before (c2f is timed first), unless ``params`` set RISE's own; ``budget_from`` records it.

``volume``: c2f's process, after its slice timing (and with its own peak-RSS reset), explains the
whole first case (every non-background axial slice) through
:func:`~c2f_med.explain.volume.explain_volume`, after a one-slice warm-up; without c2f among the
methods, a process of its own does.

``OUT/bench.json`` (stable keys, plus extras)::

    {"methods": {m: {"seconds_per_slice", "forward_passes_per_slice", "backward_passes_per_slice",
                     "peak_rss_mb", "baseline_rss_mb", "ratio_to_c2f"}},
     "volume": {"method": "c2f", "slices": int, "seconds": float, "slices_in_volume": int},
     "torch_threads": int, "slices": int, "source": "datalist" | "synthetic", "device": str,
     "machine": {"cpu_count", "platform", "processor", "torch", "python"}}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from c2f_med.atomic import write_json
from c2f_med.case import load_scan
from c2f_med.errors import InputError
from c2f_med.evaluate import check_methods
from c2f_med.explain import create, explain_volume
from c2f_med.io.manifest import read_datalist
from c2f_med.models.bundle import load_bundle
from c2f_med.slices import evenly_spread, normalise_input, slice_context, to_model_grid, volume_slices
from c2f_med.synth.dataset import synth_case
from c2f_med.synth.writers import write_nifti

__all__ = ["SLICE_BATCH", "SYNTH_SEED", "run_bench", "bench_slices"]

#: slices per explain call
SLICE_BATCH = 16
#: dataset seed of the synthetic cases used without a datalist
SYNTH_SEED = 7
#: at most this many synthetic cases are drawn to find enough lesion slices
MAX_SYNTH_CASES = 8
#: the method of the "volume" timing (the one bench.json reports)
VOLUME_METHOD = "c2f"
AXIS = 2


_STATUS = Path("/proc/self/status")


def _status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of ``/proc/self/status`` in MiB."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise OSError(f"no {field} in {_STATUS}")


def _reset_peak_rss() -> tuple[float, str]:
    """Reset the peak-RSS counter to the current RSS where the OS allows it.

    Returns:
        ``(current RSS in MiB, source)``: source "VmHWM" after a reset, else "ru_maxrss".
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mb("VmRSS"), "VmHWM"
    except OSError:
        return _peak_rss_mb("ru_maxrss"), "ru_maxrss"


def _peak_rss_mb(source: str) -> float:
    """Peak resident set size in MiB: ``VmHWM`` (since the last reset) or ``ru_maxrss`` (since start;
    KiB on Linux, bytes on macOS)."""
    if source == "VmHWM":
        return _status_mb("VmHWM")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _synth_scans(folder: Path) -> Iterator[tuple[Path, Path]]:
    """Synthetic cases with 2 lesions each, written as NIfTI into ``folder``, one by one."""
    for index in range(MAX_SYNTH_CASES):
        case = synth_case(SYNTH_SEED, index, n_lesions=2)
        image = write_nifti(folder / f"{case.case_id}.nii.gz", case.image, case.affine)
        label = write_nifti(folder / f"{case.case_id}_mask.nii.gz", case.label, case.affine)
        yield image, label


def _datalist_scans(datalist: str | os.PathLike) -> Iterator[tuple[Path, Path]]:
    items = [it for it in read_datalist(datalist, "testing") if "label" in it]
    if not items:
        raise InputError(datalist, 'no "testing" item with a "label" (lesion mask) to take lesion slices from')
    for it in items:
        yield Path(it["image"]), Path(it["label"])


def bench_slices(bundle, scans, n_slices: int) -> tuple[torch.Tensor, Path, int]:
    """``n_slices`` lesion slices on the model's input grid, evenly spread over the lesion slices of
    ``scans`` (``(image, mask)`` pairs, read in order only until enough lesion slices are found).

    Returns:
        ``(x [n x 1 x size x size] normalised model input, the first scan's path, lesion slices seen)``.
    """
    slices, first = [], None
    for image, label in scans:
        data = load_scan(image, label, bundle.preset)
        first = first or Path(image)
        volume, mask = data["image"].as_tensor()[0], data["label"][0]
        lesion = torch.nonzero(torch.movedim(mask, AXIS, 0).flatten(1).any(1)).flatten().tolist()
        if lesion:
            x, _ = to_model_grid(volume_slices(volume, AXIS, lesion, slice_context(bundle.model)).float(),
                                 bundle.model.input_size)
            slices += list(normalise_input(x))
        if len(slices) >= n_slices:
            break
    if not slices:
        raise InputError(None, "no lesion slices found to benchmark on")
    pick = evenly_spread(len(slices), n_slices)
    return torch.stack([slices[i] for i in pick]), first, len(slices)


# ---------------------------------------------------------------------------------------------- child


def _child(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The measurements ``spec["tasks"]`` ("slices" and/or "volume", in that order) of one method in
    this fresh process; see the module docstring. Returns ``{task: result}``."""
    torch.set_num_threads(int(spec["threads"]))
    bundle = load_bundle(spec["bundle"], spec["device"])
    explainer = create(spec["method"], bundle.model, **spec["params"])
    measure = {"slices": _time_slices, "volume": _time_volume}
    return {task: measure[task](explainer, bundle, spec) for task in spec["tasks"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_slices(explainer, bundle, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Warm-up on one slice, then every slice of ``spec["slices"]`` in batches of :data:`SLICE_BATCH`."""
    device, target = next(bundle.model.parameters()).device, bundle.lesion_class
    x = torch.load(spec["slices"], weights_only=True).to(device)  # n x 1 x size x size
    baseline, source = _reset_peak_rss()
    explainer.explain(x[:1], target)
    _sync(device)
    forward = backward = 0
    start = time.perf_counter()
    for batch in x.split(SLICE_BATCH):
        expl = explainer.explain(batch, target)
        forward += expl.forward_passes
        backward += expl.backward_passes
    _sync(device)
    seconds = time.perf_counter() - start
    n = x.shape[0]
    return {"seconds_per_slice": seconds / n, "forward_passes_per_slice": forward / n,
            "backward_passes_per_slice": backward / n, "peak_rss_mb": _peak_rss_mb(source), "baseline_rss_mb": baseline,
            "peak_rss_source": source}


def _time_volume(explainer, bundle, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Warm-up on the middle slice, then the whole scan ``spec["image"]`` with :func:`explain_volume`."""
    device, target = next(bundle.model.parameters()).device, bundle.lesion_class
    scan = load_scan(spec["image"], None, bundle.preset)["image"]  # 1 x X x Y x Z
    baseline, source = _reset_peak_rss()
    middle = volume_slices(scan.as_tensor()[0], AXIS, [scan.shape[1 + AXIS] // 2], slice_context(bundle.model))
    explainer.explain(normalise_input(to_model_grid(middle.float(), bundle.model.input_size)[0]).to(device), target)
    _sync(device)
    start = time.perf_counter()
    result = explain_volume(scan, explainer, axis=AXIS, target=target, slice_batch=SLICE_BATCH, progress=False)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"method": explainer.name, "slices": sum(p.explained for p in result.predictions), "seconds": seconds,
            "slices_in_volume": len(result.predictions), "peak_rss_mb": _peak_rss_mb(source),
            "baseline_rss_mb": baseline, "peak_rss_source": source}


def _budget(method: str, params: Mapping[str, Mapping[str, Any]], results: Mapping[str, Any]
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``method``'s parameters for the bench and what its budget came from (module docstring: ``rise``)."""
    own = dict(params.get(method, {}))
    if method != "rise" or own or VOLUME_METHOD not in results:
        return own, {}
    n = max(1, round(results[VOLUME_METHOD]["forward_passes_per_slice"]))
    return {"n_masks": n}, {"budget_from": f"{VOLUME_METHOD}: {n} forward passes per slice"}


def _run_child(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Run :func:`_child` in a fresh interpreter; its result comes back through a JSON file."""
    result = folder / f"result_{spec['method']}.json"
    spec = {**spec, "result": str(result)}
    proc = subprocess.run([sys.executable, "-m", "c2f_med.bench", "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"bench of {spec['method']} ({', '.join(spec['tasks'])}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------- parent


def _table(report: Mapping[str, Any]) -> str:
    head = f"{'method':<16} {'s/slice':>10} {'fwd/slice':>10} {'bwd/slice':>10} {'peak RSS MB':>12} {'x c2f':>8}"
    lines = [head, "-" * len(head)]
    for m, r in report["methods"].items():
        ratio = "n/a" if math.isnan(r["ratio_to_c2f"]) else f"{r['ratio_to_c2f']:.2f}"
        lines.append(f"{m:<16} {r['seconds_per_slice']:>10.4f} {r['forward_passes_per_slice']:>10.1f} "
                     f"{r['backward_passes_per_slice']:>10.1f} {r['peak_rss_mb']:>12.0f} {ratio:>8}")
    v = report["volume"]
    lines.append(f"volume ({v['method']}): {v['slices']} slices in {v['seconds']:.1f} s; "
                 f"{report['slices']} benchmark slices ({report['source']}), torch threads {report['torch_threads']}")
    return "\n".join(lines)


def run_bench(
    bundle_dir: str | os.PathLike,
    methods: Sequence[str],
    n_slices: int,
    out: str | os.PathLike,
    *,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    datalist: str | os.PathLike | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Time ``methods`` on the same ``n_slices`` lesion slices and c2f on one whole volume; print a
    table and write ``out/bench.json`` (module docstring).

    Args:
        bundle_dir: the MONAI bundle folder.
        methods: explainer names.
        n_slices: lesion slices to time every method on (fewer if the cases hold fewer).
        out: output folder.
        params: ``{method: {parameter: value}}`` overrides (c2f's also apply to the volume timing).
        datalist: take the slices from its "testing" cases; ``None``: synthesise cases.
        device: torch device.

    Returns:
        The ``bench.json`` dict.
    """
    methods, params = list(dict.fromkeys(methods)), {m: dict(p) for m, p in (params or {}).items()}
    if not methods:
        raise InputError(None, "no methods given (--methods c2f,vitcx,...)")
    if n_slices < 1:
        raise InputError(None, f"--slices must be >= 1, got {n_slices}")
    bundle = load_bundle(bundle_dir, device)
    check_methods(bundle, list(dict.fromkeys([*methods, VOLUME_METHOD])), params)
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory(prefix="c2f_bench_") as tmp:
        tmp = Path(tmp)
        scans = _datalist_scans(datalist) if datalist is not None else _synth_scans(tmp)
        x, demo, _ = bench_slices(bundle, scans, n_slices)
        torch.save(x.cpu(), tmp / "slices.pt")
        common = {"bundle": str(Path(bundle_dir).resolve()), "device": device, "threads": threads,
                  "slices": str(tmp / "slices.pt")}
        results, volume = {}, None
        for m in dict.fromkeys([VOLUME_METHOD, *methods]):  # c2f first: RISE's budget is its forward passes
            tasks = [*(["slices"] if m in methods else []), *(["volume"] if m == VOLUME_METHOD else [])]
            print(f"bench: {m} ({' and '.join(tasks)}) ...", flush=True)
            method_params, budget = _budget(m, params, results)
            measured = _run_child({**common, "tasks": tasks, "method": m, "params": method_params,
                                   "image": str(demo)}, tmp)
            if "slices" in measured:
                results[m] = {**measured["slices"], **budget}
            volume = measured.get("volume", volume)
        results = {m: results[m] for m in methods}

    ref = results.get(VOLUME_METHOD, {}).get("seconds_per_slice", math.nan)
    for r in results.values():
        r["ratio_to_c2f"] = r["seconds_per_slice"] / ref if ref and not math.isnan(ref) else math.nan
    report = {
        "methods": results,
        "volume": {"method": VOLUME_METHOD, "slices": int(volume["slices"]), "seconds": float(volume["seconds"]),
                   "slices_in_volume": int(volume["slices_in_volume"]), "peak_rss_mb": volume["peak_rss_mb"],
                   "baseline_rss_mb": volume["baseline_rss_mb"]},
        "torch_threads": threads,
        "slices": int(x.shape[0]),
        "source": "datalist" if datalist is not None else "synthetic",
        "datalist": None if datalist is None else str(datalist),
        "device": device,
        "batch": SLICE_BATCH,
        "peak_rss": "host RSS peak of a fresh process per method, from after loading (baseline_rss_mb) to the end "
                    "of the timed run; see c2f_med.bench",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "bundle": {"path": str(bundle.root), "sha256": bundle.sha256},
    }
    print(_table(report))
    write_json(Path(out) / "bench.json", report)
    return report


def _main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="c2f_med.bench measurement process (internal)")
    p.add_argument("--child", required=True, help="JSON spec")
    spec = json.loads(p.parse_args(argv).child)
    write_json(spec["result"], _child(spec))


if __name__ == "__main__":
    _main()
