"""What the wheel installs and what a source tree imports: every package of the core is
listed in pyproject.toml, and the Ray layer (folder actors/) imports as `raydraft_ray`
both ways, never as a top-level `actors`."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_every_package_is_listed():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "raydraft").rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == found | {"raydraft_ray"}
    assert setuptools["package-dir"] == {"raydraft_ray": "actors"}


def test_a_source_tree_imports_the_ray_layer_from_actors(tmp_path):
    """As in a `ray job submit` working directory: the tree's own files are imported."""
    for name in ("raydraft", "actors"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "raydraft_ray.py", tmp_path)
    code = (
        "import raydraft_ray.engine as e, raydraft.cli as c; print(e.__file__); print(c.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    engine, cli = done.stdout.split()
    assert Path(engine) == tmp_path / "actors" / "engine.py"
    assert Path(cli) == tmp_path / "raydraft" / "cli.py"
    assert (
        "No module named 'actors'"
        in subprocess.run(
            [sys.executable, "-c", "import actors"],
            cwd=ROOT / "tests",
            capture_output=True,
            text=True,
        ).stderr
    )
