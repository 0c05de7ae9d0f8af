"""A non-editable install (``pip install .``) carries the trained bundle and explains without a clone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nibabel as nib

from .conftest import write_tiny_case

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_finds_its_bundle(tmp_path):
    # a fresh environment that sees this one's dependencies but not its editable c2f_med
    prefix = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(prefix)}))
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # a copy: building writes build/ and *.egg-info/ next to the sources; --ignore-installed: pip must not
    # uninstall this environment's own (editable) c2f_med when it installs into the other prefix
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("c2f_med", "bundles"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--ignore-installed", "--prefix",
                    str(prefix), str(source)], check=True, capture_output=True, timeout=600)
    case = write_tiny_case(tmp_path / "data", "scan", (40, 40, 6), (slice(15, 22), slice(15, 22), slice(2, 4)), 0)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "C2F_MED_BUNDLE")}
    python = prefix / "bin" / "python"
    where = subprocess.run([str(python), "-c", "import c2f_med, c2f_med.models as m; print(c2f_med.__file__);"
                            " print(m.DEFAULT_BUNDLE)"], capture_output=True, text=True, check=True, env=env,
                           cwd=tmp_path).stdout.split()
    assert Path(where[0]).is_relative_to(prefix) and Path(where[1]).is_relative_to(prefix)
    # (the c2f-med script pip writes here names the interpreter that ran pip, so call the module)
    result = subprocess.run([str(python), "-m", "c2f_med.cli", "explain", "--input", case["image"], "--method",
                             "attention", "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert nib.load(tmp_path / "out" / "scan" / "saliency.nii.gz").shape == (40, 40, 6)
    # and this environment's own c2f_med is still installed (pip did not take it away)
    subprocess.run([sys.executable, "-c", "import c2f_med"], check=True, env=env, cwd=tmp_path)
