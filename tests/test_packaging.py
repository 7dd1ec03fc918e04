"""What an install of afdserve puts on a user's sys.path: one import package, `afdserve`, with every module of the
source folders in it, and nothing that shadows another distribution (Hugging Face's `kernels`, which transformers
imports at model load)."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("engine", "kernels", "cluster", "models", "bench")
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.egg-info", "build", "dist", "results",
                                    "tests", "docs", ".pytest_cache")


def source_modules() -> set[str]:
    """Every file the wheel must carry, as afdserve/...: the root's modules and those of each package folder."""
    files = {f"afdserve/{p.name}" for p in REPO.glob("*.py")}
    for folder in SOURCE_FOLDERS:
        for init in (REPO / folder).rglob("__init__.py"):
            for path in init.parent.iterdir():
                if path.suffix in (".py", ".proto", ".pyi"):
                    files.add("afdserve/" + path.relative_to(REPO).as_posix())
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source") / "afdserve"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("afdserve-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel_files(wheel) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_the_wheel_installs_one_import_package(wheel_files):
    top_level = {name.split("/")[0] for name in wheel_files if ".dist-info/" not in name}
    assert top_level == {"afdserve"}


def test_the_wheel_carries_every_source_module_and_no_repository_files(wheel_files):
    packaged = {name for name in wheel_files if name.startswith("afdserve/")}
    missing = source_modules() - packaged
    assert not missing, f"pyproject.toml's package list misses {sorted(missing)}"
    assert "afdserve/README.md" not in packaged and "afdserve/pyproject.toml" not in packaged


def test_the_console_script_points_into_the_package(wheel):
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = zf.read(name).decode()
    assert "afdserve = afdserve.engine.cli:main" in entry_points


def test_hugging_face_kernels_is_not_shadowed_by_the_source_tree():
    """`make test` runs the pytest script, which does not put the repository root on sys.path, and pytest collects
    from tests/ (--confcutdir), so it does not import the root as a package either."""
    on_path = {Path(p or ".").resolve() for p in sys.path}
    assert REPO not in on_path and REPO.parent not in on_path
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin is not None:
        assert not Path(spec.origin).resolve().is_relative_to(REPO / "kernels"), (
            f"`import kernels` resolves to {spec.origin}: run tests with .venv/bin/pytest, not python -m pytest")


def test_transformers_and_afdserve_import_together_outside_the_repository(tmp_path):
    code = ("import transformers.integrations.hub_kernels, afdserve; from afdserve import LLM, SamplingParams; "
            "import afdserve.kernels.attention; print(afdserve.__file__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == REPO / "__init__.py"
