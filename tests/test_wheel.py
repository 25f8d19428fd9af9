"""A wheel built from the repo ships the Hydra configs, and its ``r1mega-train`` starts in a fresh venv outside
the source tree (``--cfg job``: the composed default job, no training). Users install into containers this way.

The venv is made without pip and without the project; the dependencies come from this interpreter's
site-packages through a ``.pth`` file (no network, no editable install on the path), and the wheel is
installed into it with ``pip --python``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_wheel_ships_configs_and_runs_outside_the_tree(tmp_path):
    # build from a copy: setuptools writes build/ and *.egg-info next to pyproject.toml
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "r1mega", src / "r1mega", ignore=ignore)
    shutil.copytree(REPO / "kernels" / "r1mega_kernels", src / "kernels" / "r1mega_kernels", ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("r1mega-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for conf in ("r1mega/conf/config.yaml", "r1mega/conf/model/tiny_moe.yaml", "r1mega/conf/rollout/sglang.yaml"):
        assert conf in names, f"{conf} missing from the wheel"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    py = venv / "bin" / "python"
    site = Path(
        _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, hydra, ... of this venv
    _run([*pip, "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)], tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "R1MEGA_CONF", "VIRTUAL_ENV")}
    where = _run(
        [str(py), "-c", "import r1mega, r1mega.train as t; print(r1mega.__file__); print(t.CONF_DIR)"], work, env
    )
    pkg, conf_dir = where.stdout.split()
    assert pkg.startswith(str(site)) and conf_dir.startswith(str(site)), where.stdout  # the wheel, not the repo
    job = _run([str(venv / "bin" / "r1mega-train"), "--cfg", "job", "algo=dapo", "rollout=sglang"], work, env)
    assert "eps_high: 0.28" in job.stdout and "dynamic_sampling: mask" in job.stdout  # conf/algo/dapo.yaml
    assert "backend: sglang" in job.stdout and "mem_fraction: 0.5" in job.stdout  # conf/rollout/sglang.yaml
