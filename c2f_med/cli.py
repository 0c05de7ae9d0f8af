"""The ``c2f-med`` command: synth, train, explain, evaluate, bench, audit.

Bad input exits with status 2 and one line ``c2f-med: error: <file>: <problem>`` on stderr, never
a traceback; nothing is written inside the inputs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from c2f_med.errors import find_input_error

__all__ = ["main", "build_parser"]


def _synth(a: argparse.Namespace) -> None:
    from c2f_med.synth.dataset import write_dataset

    path = write_dataset(a.out, cases=a.cases, seed=a.seed, fmt=a.format)
    print(f"wrote {a.cases} cases and {path}")


def _train(a: argparse.Namespace) -> None:
    from c2f_med.models.train import run_training

    run_training(a.datalist, a.bundle, epochs=a.epochs, seed=a.seed, online_lesions=a.online_lesions,
                 epoch_steps=a.epoch_steps)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="c2f-med", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("synth", help="write semi-synthetic lesion scans on MNI152 anatomy")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--cases", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", choices=("nifti", "dicom", "both"), default="nifti")
    s.set_defaults(func=_synth)

    t = sub.add_parser("train", help="train the slice classifier into a bundle")
    t.add_argument("--datalist", required=True, type=Path,
                   help="its 'validation' cases are validated on; its 'training' cases trained on "
                        "unless --online-lesions")
    t.add_argument("--bundle", required=True, type=Path)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--epoch-steps", type=int, default=250, help="optimiser steps per epoch")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--online-lesions", action="store_true",
                   help="train on synthetic anatomies with lesions drawn afresh for every volume")
    t.set_defaults(func=_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except Exception as exc:  # bad input (possibly wrapped by MONAI) -> one line, no traceback
        err = find_input_error(exc)
        if err is None:
            raise
        print(f"c2f-med: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
