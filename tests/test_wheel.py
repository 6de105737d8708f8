"""The wheel installs: built from a clean copy of the sources, installed into an empty target (not the editable
install), it holds every module of qlfast/ and kernels/ (as qlfast.kernels, never a top-level `kernels`), and the
trainer imports and prints its config from there."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "qlfast", "kernels", "csrc")


def _run(*cmd, cwd, env=None, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel path, target dir the wheel was installed into)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.so")
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=ignore)
        elif p.exists():
            shutil.copy2(p, src / name)
    # no build isolation: the venv's setuptools (nothing is downloaded); no CUDA extension on a CPU machine
    env = {**os.environ, "QLFAST_BUILD_CUDA": "0"}
    proc = _run(sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w", str(tmp / "w"),
                str(src), cwd=tmp, env=env)
    # -v shows the build backend's own output, where setuptools prints its deprecation warnings
    warned = [x for x in (proc.stdout + proc.stderr).splitlines() if "deprecat" in x.lower()]
    assert not warned, "setuptools deprecation warnings:\n" + "\n".join(warned)
    (wheel,) = (tmp / "w").glob("qlfast-*.whl")
    target = tmp / "site"
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--target", str(target),
         str(wheel), cwd=tmp)
    return wheel, target


def test_wheel_holds_every_module(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {p.relative_to(ROOT).as_posix() for p in (ROOT / "qlfast").rglob("*.py") if "__pycache__" not in p.parts}
    want |= {"qlfast/kernels/" + p.relative_to(ROOT / "kernels").as_posix() for p in (ROOT / "kernels").rglob("*.py")
             if "__pycache__" not in p.parts}
    assert "qlfast/trainer/build.py" in want and "qlfast/kernels/__init__.py" in want
    assert not (want - names), f"modules missing from the wheel: {sorted(want - names)}"
    assert not any(n.startswith("kernels/") for n in names), "a top-level `kernels` package would shadow HF's"


def test_trainer_imports_from_the_installed_wheel(installed, tmp_path):
    _, target = installed
    # the target first on the path, run from a folder outside the repository: the editable install's finder comes
    # after the path entries, and the check below makes sure the modules came from the target
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import qlfast, qlfast.train, qlfast.trainer.build, qlfast.kernels; "
            "print(qlfast.__file__); print(qlfast.trainer.build.__file__); print(qlfast.kernels.__file__)")
    files = _run(sys.executable, "-c", code, cwd=tmp_path, env=env).stdout.split()
    assert len(files) == 3 and all(f.startswith(str(target)) for f in files), files
    out = _run(sys.executable, "-m", "qlfast.train", "--print-config", cwd=tmp_path, env=env).stdout
    assert "\n--rl.phases=120:48:50,200:48:50\n" in out and "# [reward]" in out
