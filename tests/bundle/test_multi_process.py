"""``multi_gpu_inference.json`` under torchrun: two CPU processes (gloo) share the cases, rank 0 merges."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_the_cases(tiny_bundle, cases, tmp_path):
    configs = tiny_bundle / "configs"
    out = tmp_path / "out"
    files = [str(configs / name) for name in ("inference.json", "evaluate.json", "multi_gpu_inference.json")]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--tee",
        "3",
        "--master_port",
        str(_free_port()),
        "-m",
        "monai.bundle",
        "run",
        "--bundle_root",
        str(tiny_bundle),
        "--config_file",
        repr(files),
        "--meta_file",
        str(configs / "metadata.json"),
        "--datalist",
        str(cases / "datalist.json"),
        "--output_dir",
        str(out),
        "--method",
        "rollout",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    logs = result.stdout + result.stderr
    # DistributedSampler: rank 0 explains case a, rank 1 case b, each once
    explained = re.findall(r"\[default(\d)\]:.* - (\w+): \d+ slices explained", logs)
    assert sorted(explained) == [("0", "a"), ("1", "b")]
    assert {p.name for p in out.iterdir()} == {"a", "b", "summary.json", "summary.md", "per_case.csv", "per_slice.csv",
                                               "false_alarms.csv"}
    summary = json.load(open(out / "summary.json"))
    assert (summary["cases"], summary["lesion_slices"]) == (2, 3)  # both ranks' cases merged
