"""Install layout: kernels/ is minimodels.kernels in editable and wheel installs, and
environment.yml lists what pyproject.toml does."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import yaml

import minimodels.kernels.scan

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["test"] + extras["bench"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = [r for r in pip if not r.startswith("-e")]
    assert sorted(map(_name, listed)) == sorted(map(_name, wanted))
    assert sorted(listed) == sorted(wanted), "same pins in both files"
    assert any(r.startswith("-e") and ".[test,bench]" in r for r in pip), "pip installs the package"
    python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert python == ["python=3.11"]


def test_editable_install_maps_kernels_folder():
    assert Path(minimodels.kernels.scan.__file__).resolve() == ROOT / "kernels" / "scan.py"


def _python_files(folder: Path, prefix: str) -> set[str]:
    """``prefix/relative/path.py`` for every .py under ``folder`` (caches aside)."""
    return {f"{prefix}/{p.relative_to(folder).as_posix()}" for p in folder.rglob("*.py")
            if "__pycache__" not in p.parts}


def test_wheel_holds_every_module_and_runs_the_bench_cli(tmp_path):
    """Build the wheel from a clean copy of the sources (no stale build/ folder), offline; every
    .py of src/minimodels and kernels/ is in it under its import path and nothing else is; an
    install of it (unzipped onto PYTHONPATH) imports the kernels from itself and runs
    ``python -m minimodels.bench --help``."""
    src = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "results")
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("src", "kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(tmp_path / "dist"), str(src)],
        check=True, capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("minimodels-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    wanted = (_python_files(ROOT / "src" / "minimodels", "minimodels")
              | _python_files(ROOT / "kernels", "minimodels/kernels"))
    shipped = {n for n in names if n.endswith(".py")}
    assert wanted - shipped == set(), "missing from the wheel"
    assert shipped - wanted == set(), "in the wheel but not in the sources"

    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import minimodels.bench as b, minimodels.kernels.scan as s, minimodels.benchmarks "
            "as m; print(b.__file__); print(s.__file__); print(m.__file__)")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    for line in out.stdout.split():
        assert line.startswith(str(site / "minimodels")), line
    cli = subprocess.run([sys.executable, "-m", "minimodels.bench", "--help"], env=env,
                         cwd=tmp_path, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "usage: python -m minimodels.bench" in cli.stdout and "selective_scan" in cli.stdout
