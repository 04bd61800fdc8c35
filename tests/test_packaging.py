"""Install layout: kernels/ is minimodels.kernels in editable and wheel installs, and
environment.yml lists what pyproject.toml does."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

import minimodels.kernels.scan

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = [r for r in pip if not r.startswith("-e")]
    assert sorted(map(_name, listed)) == sorted(map(_name, wanted))
    assert sorted(listed) == sorted(wanted), "same pins in both files"
    assert any(r.startswith("-e") and ".[test]" in r for r in pip), "pip installs the package"
    python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert python == ["python=3.11"]


def test_editable_install_maps_kernels_folder():
    assert Path(minimodels.kernels.scan.__file__).resolve() == ROOT / "kernels" / "scan.py"


def test_wheel_install_imports_kernels(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("minimodels-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
         str(tmp_path / "site"), str(wheel)],
        check=True, capture_output=True,
    )
    code = "import minimodels.kernels.scan as s; print(s.__file__)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith(str(tmp_path / "site" / "minimodels" / "kernels"))
