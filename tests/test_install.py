"""atoken leaves its checkout: the wheel builds, installs into a fresh venv and runs elsewhere.

The wheel is built from a copy of the files it is made of (so the checkout gets no ``build/``),
installed with ``--no-deps --no-index`` into a new venv whose ``.pth`` file reuses this
interpreter's installed dependencies (no download), then used from an unrelated folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = (
    "atoken-tiny.safetensors",
    "atoken-tiny-d.safetensors",
    "atoken-tiny-gs.safetensors",
    "atoken-tiny-gen.safetensors",
)


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    res = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "atoken", src / "atoken", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "assets").mkdir()
    for name in (*CHECKPOINTS, "atoken-tiny.md", "atoken-tiny-gs.md", "LICENSES.md"):
        shutil.copy2(ROOT / "assets" / name, src / "assets" / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp)], tmp)
    (wheel,) = tmp.glob("atoken-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    python = venv / "bin" / "python"
    site = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp
        ).strip()
    )
    (site / "reuse_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], tmp)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return {"wheel": wheel, "venv": venv, "python": python, "site": site, "cwd": elsewhere}


def test_the_wheel_holds_the_library_and_its_checkpoints_not_the_app(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "atoken/core/model.py" in names and "atoken/cli.py" in names
    for name in CHECKPOINTS:
        assert f"atoken/_bundled/{name}" in names
    assert not any(n.startswith(("app/", "tests/", "configs/", "assets/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "atoken = atoken.cli:main" in zipfile.ZipFile(installed["wheel"]).read(entry).decode()


def test_load_pretrained_works_from_another_folder(installed):
    code = (
        "import atoken, atoken.pretrained.hub as hub\n"
        "m = atoken.load_pretrained('atoken-tiny')\n"
        "print(atoken.__file__)\n"
        "print(hub.ASSETS)\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
    )
    out = run([str(installed["python"]), "-c", code], installed["cwd"]).split("\n")
    module, assets, params = out[0], out[1], int(out[2])
    assert Path(module).is_relative_to(installed["site"]), module  # the installed copy
    assert Path(assets) == installed["site"] / "atoken" / "_bundled"
    assert params > 1_000_000


def test_console_script_reconstructs_from_another_folder(installed):
    cwd = installed["cwd"]
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    img = np.stack(
        [
            np.add.outer(ramp, ramp) / 2,
            np.add.outer(ramp, ramp[::-1]) / 2,
            rng.uniform(100, 140, (64, 64)),
        ],
        axis=-1,
    )
    Image.fromarray(img.astype(np.uint8)).save(cwd / "photo.png")
    out = run(
        [str(installed["venv"] / "bin" / "atoken"), "reconstruct", "photo.png", "rec.png"], cwd
    )
    rec = np.asarray(Image.open(cwd / "rec.png"))
    assert rec.shape == (64, 64, 3)
    assert "psnr" in out.lower()
