"""``c2f-med audit``: explain and score every case of a datalist, resumably, in one or many processes.

Per case (:func:`audit_case`):

1. :func:`c2f_med.case.explain_case` explains every slice once and writes ``OUT/cases/<case>/``
   atomically: saliency, overlay, predictions, scores and ``provenance.json`` (explainer parameters,
   per-slice records such as C2F's K and POS / NEG / BND counts, input hashes, versions, timings);
2. with a lesion mask, the same call (:func:`c2f_med.case.explain_and_score`) scores the slices exactly
   as ``c2f-med evaluate`` does, from the same maps: lesion slices by the model's decision (TP / FN:
   localisation, {background, lesion} IoU counts, deletion / insertion AUC on the model's input grid),
   false alarms (FP: where the saliency mass falls), cost per slice. A case costs one explanation of
   the scan plus ``2 x 11`` forward passes per lesion slice;
3. one JSON line is appended to the process's ledger ``OUT/ledger/rank<r>.jsonl`` and fsync'd:
   ``status`` done or failed, the error, seed, timings, input hashes, the per-slice and classifier
   rows.

A failing case (corrupt scan, missing file, mask off the scan's grid, ...) is recorded with its
error (the :class:`~c2f_med.errors.InputError` line when there is one, else ``Type: message``)
and the cohort goes on.

Resuming: a case is *done* when a ledger line says so AND its folder exists. A rerun into the same
``OUT`` skips the done cases and retries the others: failed ones, and the one a killed run was
writing (its hidden ``.<case>.*.tmp`` folder is removed; a folder without a ledger line is redone).
``OUT/audit.json`` pins the bundle's sha256, the method, its parameters and the datalist section;
a rerun with other ones is refused. The datalist itself may grow between runs: the merged outputs
cover its current cases. Two audits must not write into one ``OUT`` at the same time.

Processes: under ``torchrun --nproc_per_node K`` (env ``WORLD_SIZE`` / ``RANK``) the process group
is initialised through ``ignite.distributed`` (gloo on CPU; NCCL on CUDA, one GPU per ``LOCAL_RANK``),
and ranks exchange plans and counts with its collectives. Rank 0 checks the output
folder and lists the cases still to do; rank ``r`` takes cases ``r, r + K, r + 2K, ...`` of that
list (disjoint shares); when every rank is through, rank 0 merges the ledgers. Across machines,
``OUT`` must be a folder every machine sees (a shared file system).

Outputs (written by rank 0, each atomically)::

    OUT/cases/<case>/         explain_case's folder (see c2f_med.case)
    OUT/ledger/rank<r>.jsonl  one line per finished or failed case, append-only
    OUT/audit.json            what this audit is of: bundle sha256, method, parameters, section
    OUT/per_case.csv          one row per case: case, error (empty on success), method, means over
                              the case's lesion slices, the case's classifier scores, cost, the
                              explainer's records (means over explained slices), rank, seed
    OUT/per_slice.csv         one row per lesion slice, the columns of c2f-med evaluate
    OUT/false_alarms.csv      one row per lesion-free slice the model calls positive
    OUT/summary.json / .md    c2f_med.summary (the keys documented there) + section, case counts and the
                              faithfulness settings
    OUT/provenance.json       bundle sha256 and config, datalist hash, method and parameters,
                              versions, seeds, per-case input hashes, ranks and timings
    OUT/report.html           c2f_med.report: one self-contained HTML file
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import socket
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
import torch.distributed as dist
from monai.utils import set_determinism
from tqdm.auto import tqdm

from c2f_med.atomic import check_output, write_csv, write_json
from c2f_med.case import FAITHFULNESS, explain_case, item_options
from c2f_med.errors import InputError, find_input_error
from c2f_med.evaluate import CASE_CLASSIFIER_KEYS, CASE_KEYS
from c2f_med.explain import create
from c2f_med.handlers.score import all_gather
from c2f_med.io.manifest import read_datalist
from c2f_med.models.bundle import Bundle, load_bundle
from c2f_med.pacs.source import DicomWebOptions, RemoteInputs, remote_inputs
from c2f_med.provenance import input_hash, provenance
from c2f_med.report import write_report
from c2f_med.summary import FALSE_ALARM_HEAD, PER_SLICE_HEAD, aggregate, classifier_scores, summarise, write_summary

__all__ = ["SEED", "case_seed", "check_output", "Ledger", "read_ledger", "done_cases", "audit_case", "run_audit"]

logger = logging.getLogger(__name__)

CASES, LEDGER, IDENTITY = "cases", "ledger", "audit.json"
#: the audit's base seed; a case runs with :func:`case_seed` of its id, whichever rank takes it
SEED = 0
#: how long ranks wait for each other at the end (one may finish its share long before another)
GROUP_TIMEOUT = datetime.timedelta(hours=24)
#: per-case columns of per_case.csv before the explainer's record means
CASE_HEAD = ("case", "error", "method", *CASE_KEYS, *CASE_CLASSIFIER_KEYS, "explained_slices",
             "explain_forward_passes", "explain_backward_passes", "case_seconds", "rank", "seed")


def case_seed(case: str, base: int = SEED) -> int:
    """The seed of ``case``: CRC-32 of ``"<base>:<case>"`` (in ``[0, 2**32)``), so it does not depend on
    the order of the cases or on the rank that takes it."""
    return zlib.crc32(f"{base}:{case}".encode())


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class Ledger:
    """One rank's append-only JSON-lines file of finished and failed cases.

    Each :meth:`append` writes one line and fsyncs it before returning, so a line on disk means
    its case is finished. A line cut short by a kill is left on its own line (a newline is added
    before the next record) and ignored by :func:`read_ledger`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, record: Mapping[str, Any]) -> None:
        line = (json.dumps(record, default=_json_default) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as fh:
            if fh.seek(0, os.SEEK_END):
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = b"\n" + line
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def read_ledger(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record of every rank's ledger under ``out`` (ranks in name order, lines in order)."""
    records = []
    for path in sorted((Path(out) / LEDGER).glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if isinstance(record, dict) and "case" in record and "status" in record:
                    records.append(record)
    return records


def done_cases(out: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{case: record}`` of the cases that are done: a "done" ledger line and the case folder.

    Of several lines of one case the latest wins (``finished`` time).
    """
    out = Path(out)
    done: dict[str, dict[str, Any]] = {}
    for r in read_ledger(out):
        if r["status"] == "done" and (out / CASES / r["case"]).is_dir():
            if r["case"] not in done or r["finished"] >= done[r["case"]]["finished"]:
                done[r["case"]] = r
    return done


def _final_records(out: Path, cases: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One record per case of ``cases``: the done one, else the latest failure, else "not run"."""
    done = done_cases(out)
    failed: dict[str, dict[str, Any]] = {}
    for r in read_ledger(out):
        if r["status"] == "failed" and (r["case"] not in failed or r["finished"] >= failed[r["case"]]["finished"]):
            failed[r["case"]] = r
    return {c: done.get(c) or failed.get(c) or {"case": c, "status": "failed", "error": "not run"} for c in cases}


def _input_hashes(item: Mapping[str, Any]) -> dict[str, Any]:
    """``{"image": {"path", "sha256"}, "mask": ... or None}`` as in a case's provenance; sha256 None
    for a file that cannot be read."""
    out: dict[str, Any] = {}
    for key, name in (("image", "image"), ("label", "mask")):
        out[name] = None
        if key in item:
            try:
                out[name] = {"path": str(item[key]), "sha256": input_hash(item[key])}
            except OSError:
                out[name] = {"path": str(item[key]), "sha256": None}
    return out


def _record_means(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``{"record_<field>": mean}`` of the explainer's numeric per-slice record fields over the explained
    slices (C2F: K, pos1, neg1, bnd1, ..., forward_passes)."""
    keys = dict.fromkeys(k for r in records for k, v in r.items()  # wall time: in seconds_per_slice
                         if k not in ("index", "seconds") and isinstance(v, (int, float)) and not isinstance(v, bool))
    return {f"record_{k}": float(np.mean([r[k] for r in records if isinstance(r.get(k), (int, float))]))
            for k in keys}


def audit_case(bundle: Bundle, item: Mapping[str, Any], cases_dir: str | os.PathLike, method: str,
               params: Mapping[str, Any] | None = None, remote: RemoteInputs | None = None) -> dict[str, Any]:
    """Explain, score and record one datalist item (``{"image", "label" (optional), "case_id"}``).

    Never raises for a bad case: the returned ledger record has ``status`` "failed" and the
    ``error`` on one line. ``remote`` resolves an item whose image is a DICOMweb series URL to its
    cached copy (a failed retrieval fails the case) and stores the results back after it. A done record
    holds ``rows`` (per-slice score rows, :mod:`c2f_med.summary`; empty without a mask), ``fp_rows`` (false
    alarms), ``classifier`` rows, ``explain`` (``explain_case``'s counts), ``records`` (:func:`_record_means`),
    ``inputs`` (paths and sha256), ``seed`` and ``seconds``.
    """
    case = item["case_id"]
    seed = case_seed(case)
    record: dict[str, Any] = {"case": case, "method": method, "seed": seed,
                              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    start = time.perf_counter()
    try:
        set_determinism(seed)
        if remote is not None:  # DICOMweb: the cached series (and the server's mask)
            item = remote.resolve(item)
        result = explain_case(bundle, item["image"], cases_dir, mask=item.get("label"), method=method, params=params,
                              case_id=case, faithfulness=True, progress=False, **item_options(item))
        scored = result.scored if "label" in item else None
        record.update(
            status="done", error="",
            explain={"explained_slices": result.explained_slices, "explain_forward_passes": result.forward_passes,
                     "explain_backward_passes": result.backward_passes, "explain_seconds": result.seconds},
            records=_record_means(result.records),
            rows=scored.rows if scored else [], fp_rows=scored.fp_rows if scored else [],
            classifier=scored.classifier if scored else [],
            inputs=json.loads((result.folder / "provenance.json").read_text())["inputs"])
        if remote is not None:  # DICOMweb: retrieve seconds next to explain seconds, results stored back
            record["explain"].update(remote.finish(item, result.folder, method, bundle))
    except Exception as exc:  # noqa: BLE001 - a failing case is recorded, the cohort goes on
        err = find_input_error(exc)
        message = str(err) if err else f"{type(exc).__name__}: {exc}"
        record.update(status="failed", error=" ".join(message.split()),  # one line, for the CSV and the log
                      inputs=_input_hashes(item))
        logger.warning("case %s failed: %s", case, record["error"])
    record["seconds"] = time.perf_counter() - start
    record["finished"] = time.time()
    return record


# ---------------------------------------------------------------------------------------------- processes


@contextlib.contextmanager
def _process_group(device: str) -> Iterator[tuple[int, int, str]]:
    """``(rank, world_size, device)``; under torchrun, with the process group initialised through
    ``ignite.distributed`` (and finalised on exit when this opened it). On CUDA each rank takes the GPU
    of its ``LOCAL_RANK``."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield 0, 1, device
        return
    cuda = torch.device(device).type == "cuda"
    opened = not dist.is_initialized()
    if opened:
        idist.initialize("nccl" if cuda else "gloo", timeout=GROUP_TIMEOUT)
    if cuda:
        device = f"cuda:{idist.get_local_rank()}"
        torch.cuda.set_device(device)
    try:
        yield idist.get_rank(), idist.get_world_size(), device
    finally:
        if opened:
            idist.finalize()


def _from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    return all_gather(obj)[0]


def _visible(path: Path, wait: float = 60.0) -> bool:
    """Whether ``path`` exists, polling up to ``wait`` seconds (a network file system may show
    another machine's new file late)."""
    deadline = time.monotonic() + wait
    while not path.is_file():
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


@dataclass
class _Plan:
    """Rank 0's view before the work: the section's items, those still to do, the parameters."""

    items: list[dict[str, Any]]
    pending: list[dict[str, Any]]
    params: dict[str, Any]
    skipped: int


def _identity(bundle: Bundle, method: str, params: Mapping[str, Any], section: str) -> dict[str, Any]:
    """What ``OUT/audit.json`` pins, as it reads back from JSON."""
    identity = {"bundle_sha256": bundle.sha256, "method": method, "params": dict(params), "section": section}
    return json.loads(json.dumps(identity, default=_json_default))


def _remove_stale(out: Path) -> None:
    """Remove what a killed run left half-written: hidden temporary case folders and files."""
    for tmp in (out / CASES).glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    for tmp in out.glob(".*.tmp*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def _plan(bundle_dir: str | os.PathLike, datalist: str | os.PathLike, out: Path, method: str,
          params: Mapping[str, Any] | None, section: str, device: str,
          item_defaults: Mapping[str, Any] | None = None) -> tuple[_Plan, Bundle]:
    """Checks in order of cost (datalist, output folder, bundle, method, identity of ``out``), then
    the cases still to do. Raises :class:`InputError` before any case runs."""
    items = read_datalist(datalist, section, check_files=False)  # a missing file fails its case only
    items = [{**(item_defaults or {}), **item} for item in items]
    if not items:
        raise InputError(datalist, f'the "{section}" list is empty')
    check_output(out, [datalist, *(item[k] for item in items for k in ("image", "label") if k in item)])
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(bundle_dir, device)
    try:
        used = create(method, bundle.model, **(params or {})).param_dict()
    except (ValueError, TypeError) as err:
        raise InputError(None, f"--method/--param: {err}") from err
    identity, pinned = _identity(bundle, method, used, section), out / IDENTITY
    if pinned.exists():
        previous = json.loads(pinned.read_text())
        if previous != identity:
            changed = ", ".join(k for k in identity if previous.get(k) != identity[k])
            raise InputError(out, f"holds an audit with another {changed}; choose another --out to start afresh")
    else:
        write_json(pinned, identity)
    _remove_stale(out)
    done = done_cases(out)
    pending = [item for item in items if item["case_id"] not in done]
    return _Plan(items, pending, used, len(items) - len(pending)), bundle


# ---------------------------------------------------------------------------------------------- merge


def _case_row(record: Mapping[str, Any], method: str, threshold: float) -> dict[str, Any]:
    """The per_case.csv row of a final ledger record."""
    row = {"case": record["case"], "error": record.get("error", ""), "method": method,
           "case_seconds": record.get("seconds"), "rank": record.get("rank"), "seed": record.get("seed")}
    if record["status"] == "done":
        means, clf = aggregate(record["rows"]), classifier_scores(record["classifier"], threshold)
        row.update({k: means[k] for k in CASE_KEYS}, **record["explain"], **record["records"],
                   case_slices=clf["slices"], case_lesion_slices=clf["lesion_slices"],
                   case_slice_auroc=clf["slice_auroc"], case_slice_accuracy=clf["slice_accuracy"])
    return row


def _merge(out: Path, plan: _Plan, bundle: Bundle, datalist: str | os.PathLike, method: str, section: str,
           ranks: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Rank 0, after every rank: per_case.csv, per_slice.csv, summary, provenance and report."""
    cases = [item["case_id"] for item in plan.items]
    final = _final_records(out, cases)
    records = [final[c] for c in cases]
    done = [r for r in records if r["status"] == "done"]
    rows = [row for r in done for row in r["rows"]]
    fp_rows = [row for r in done for row in r.get("fp_rows", [])]
    classifier = [row for r in done for row in r["classifier"]]

    summary = summarise(rows, classifier, bundle, datalist, len(done), methods=[method], fp_rows=fp_rows)
    summary["section"] = section
    summary["audit"] = {"cases": len(cases), "done": len(done), "failed": len(cases) - len(done)}
    summary["faithfulness"] = {**FAITHFULNESS, "grid": "model input", "target": "lesion class"}

    case_rows = [_case_row(r, method, bundle.operating_point.threshold) for r in records]
    extra = list(dict.fromkeys(k for row in case_rows for k in row if k not in CASE_HEAD))
    write_csv(out / "per_case.csv", case_rows, [*CASE_HEAD, *extra])
    slice_extra = list(dict.fromkeys(k for row in rows for k in row if k not in PER_SLICE_HEAD))
    write_csv(out / "per_slice.csv", rows, [*PER_SLICE_HEAD, *slice_extra])
    fp_extra = list(dict.fromkeys(k for row in fp_rows for k in row if k not in FALSE_ALARM_HEAD))
    write_csv(out / "false_alarms.csv", fp_rows, [*FALSE_ALARM_HEAD, *fp_extra])
    write_summary(out, summary)
    write_json(out / "provenance.json", provenance(
        bundle, inputs={"datalist": datalist}, method=method, params=plan.params,
        extra={"section": section, "audit_seed": SEED, "faithfulness": summary["faithfulness"],
               "world_size": len(ranks), "ranks": ranks, "seconds": seconds,
               "cases_skipped_as_done": plan.skipped, "counts": summary["audit"],
               "cases": {r["case"]: {k: r.get(k) for k in ("status", "error", "seed", "rank", "host", "seconds",
                                                          "inputs", "explain", "records")} for r in records}}))
    overlays = {r["case"]: out / CASES / r["case"] / "overlay.png" for r in done
                if (out / CASES / r["case"] / "overlay.png").is_file()}
    write_report(out / "report.html", summary, case_rows,
                 probabilities=[c["probability"] for c in classifier], labels=[c["lesion"] for c in classifier],
                 overlays=overlays, title=f"c2f-med audit: {method} on {Path(datalist).name} ({section})")
    return summary


# ---------------------------------------------------------------------------------------------- entry point


def run_audit(
    bundle_dir: str | os.PathLike,
    datalist: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "c2f",
    params: Mapping[str, Any] | None = None,
    section: str = "testing",
    device: str = "cpu",
    progress: bool = True,
    dicomweb: DicomWebOptions | None = None,
    item_defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Audit every case of ``datalist[section]`` into ``out`` (module docstring); resumable.

    Under torchrun every rank calls this with the same arguments; each takes its share of the cases
    and rank 0 merges.

    Args:
        bundle_dir: the MONAI bundle folder.
        datalist: datalist JSON; items need "image", "label" (lesion mask) adds the scores.
        out: output folder (created; must be writable: checked before any work).
        method, params: explainer name and parameter overrides.
        section: datalist section.
        device: torch device ("cuda" under torchrun: each rank takes ``cuda:<LOCAL_RANK>``).
        progress: show a progress bar over rank 0's cases.
        dicomweb: cache, annotations and storing for items that are DICOMweb series URLs (:mod:`c2f_med.pacs`).
        item_defaults: ``"stack"`` / ``"segment"`` / ``"roi"`` for the items that do not set their own.

    Returns:
        On rank 0 the ``summary.json`` dict; ``None`` on the other ranks.

    Raises:
        InputError: the output folder cannot be written or lies inside an input, bad datalist or
            section, bad bundle, unknown method or parameter, or ``out`` holds an audit of another
            bundle / method / parameters / section. Raised on every rank, before any case runs.
    """
    out = Path(out)
    start = time.perf_counter()
    with _process_group(device) as (rank, world, device):
        # rank 0 checks and plans; the others get the plan, or the reason there is none
        plan: _Plan | tuple[str, str | None, str] | None = None
        bundle = None
        if rank == 0:
            try:
                plan, bundle = _plan(bundle_dir, datalist, out, method, params, section, device, item_defaults)
            except InputError as err:
                plan = ("input", err.path, err.problem)
            except Exception as err:
                _from_rank0(("crash", None, f"{type(err).__name__}: {err}"))
                raise
        plan = _from_rank0(plan)
        if isinstance(plan, tuple):
            kind, path, problem = plan
            raise InputError(path, problem) if kind == "input" else RuntimeError(f"rank 0 failed: {problem}")
        blind = [r for r, seen in enumerate(all_gather(_visible(out / IDENTITY))) if not seen]
        if blind:
            raise InputError(out, f"not visible from rank(s) {blind}: across machines --out must be a shared folder")
        if bundle is None:
            bundle = load_bundle(bundle_dir, device)

        share = plan.pending[rank::world]
        ledger = Ledger(out / LEDGER / f"rank{rank:03d}.jsonl")
        host, loop_start, failed = socket.gethostname(), time.perf_counter(), 0
        desc = f"audit {method}" + (f" (rank 0 of {world})" if world > 1 else "")
        # DICOMweb items: the next series is retrieved in the background while this one is explained
        with remote_inputs(share, dicomweb, rank if world > 1 else None) as remote:
            for item in tqdm(share, desc=desc, unit="case", disable=not progress or rank != 0):
                record = audit_case(bundle, item, out / CASES, method, params, remote=remote)
                record.update(rank=rank, host=host)
                ledger.append(record)
                failed += record["status"] == "failed"
        ranks = all_gather({"rank": rank, "host": host, "device": str(device), "cases": len(share), "failed": failed,
                            "seconds": time.perf_counter() - loop_start, "torch_threads": torch.get_num_threads()})
        if rank != 0:
            return None
        summary = _merge(out, plan, bundle, datalist, method, section, ranks, time.perf_counter() - start)
    counts = summary["audit"]
    logger.info("audit: %d of %d cases done, %d failed (see %s)", counts["done"], counts["cases"], counts["failed"],
                out / "per_case.csv")
    return summary
