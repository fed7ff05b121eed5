"""What a daemon install holds: the wheel built from pyproject.toml, and what the daemon imports.

The generator, the evaluation report (matplotlib) and the demo's sample studies live in
dicomai-tools (tools/), so a production install of the daemon carries none of them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def daemon_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of what the daemon's build reads, so that no build/ folder left in the
    # checkout (from an older layout) can add files to the wheel.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "dicomai", src / "dicomai", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(src)],
        check=True,
        timeout=300,
    )
    (wheel,) = out.glob("dicomai-*.whl")
    return wheel


def test_daemon_wheel_has_no_tools_or_samples(daemon_wheel: Path) -> None:
    names = zipfile.ZipFile(daemon_wheel).namelist()
    packages = {n.split("/")[0] for n in names if not n.startswith("dicomai-")}
    assert packages == {"dicomai"}
    assert any(n.startswith("dicomai/ingest/") for n in names)
    assert any(n.startswith("dicomai/migrations/versions/") for n in names)
    assert not [n for n in names if n.endswith(".dcm")]
    assert not [n for n in names if "synthetic" in n or "evaluate" in n or "samples" in n]


def test_daemon_requirements_exclude_matplotlib(daemon_wheel: Path) -> None:
    with zipfile.ZipFile(daemon_wheel) as wheel:
        (meta_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(wheel.read(meta_name).decode())
    requires = [r.split(";")[0].strip().lower() for r in meta.get_all("Requires-Dist") or []]
    runtime = [r for r in (meta.get_all("Requires-Dist") or []) if "extra ==" not in r]
    assert any(r.startswith("pynetdicom") for r in requires)
    assert not [r for r in runtime if r.lower().startswith("matplotlib")]


def test_daemon_imports_neither_tools_nor_matplotlib() -> None:
    code = (
        "import sys\n"
        "import dicomai.runtime.daemon, dicomai.ops.cli, dicomai.inference.worker\n"
        "import dicomai.delivery.sender, dicomai.results\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('matplotlib', 'dicomai_tools')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300
    ).stdout
    assert out.strip() == "[]"
