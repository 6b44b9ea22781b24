"""The distribution's packages are ``aqlm_lora`` and its subpackages only: not the demo's output
folder ``aqlm_lora_demo`` (which ``aqlm-lora demo`` creates in the working directory, here the
repository root), whatever it holds. Checked with setuptools' own ``egg_info`` on a copy of the
packaging files, so setup.py and pyproject.toml are read together as a build reads them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_output_folder_is_not_packaged(tmp_path):
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "aqlm_lora", tmp_path / "aqlm_lora", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    demo = tmp_path / "aqlm_lora_demo"
    (demo / "adapter").mkdir(parents=True)
    (demo / "results.json").write_text("{}\n")
    (demo / "__init__.py").write_text("")  # even a regular package by that name stays out
    (demo / "adapter" / "stray.py").write_text("")
    egg_base = tmp_path / "egg"
    egg_base.mkdir()
    env = dict(os.environ, AQLM_LORA_USE_CUDA="0")
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(egg_base)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (info,) = egg_base.glob("*.egg-info")
    assert (info / "top_level.txt").read_text().split() == ["aqlm_lora"]
    sources = (info / "SOURCES.txt").read_text().split()
    assert "aqlm_lora/lora/fused_base.py" in sources
    assert not [s for s in sources if s.startswith("aqlm_lora_demo")], sources
