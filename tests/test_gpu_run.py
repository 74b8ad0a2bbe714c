"""benchmarks/gpu_run.sh, the wrapper run as it is on a bare GPU image: it installs the carried wheels with
pip --no-index --no-deps --target (never a torch, triton or nvidia-* wheel, never a package the image
has), then runs gpu_check.py with its budget, the table under the output folder."""
from __future__ import annotations

import json
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"


def wrapper(*args, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def make_wheel(folder: Path, name: str, version: str = "1.0") -> Path:
    """A minimal pure-Python wheel of a package ``name`` (its module says its version)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}/__init__.py", f"__version__ = {version!r}\n")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("refused", ["torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl",
                                     "nvidia_cudnn_cu12-9.1.0.70-py3-none-manylinux2014_x86_64.whl",
                                     "triton-3.5.0-cp312-cp312-manylinux_2_27_x86_64.whl"])
def test_a_wheel_that_would_replace_the_images_torch_is_refused(tmp_path, refused):
    wheels = tmp_path / "wheels"
    make_wheel(wheels / "run", "mgcc_fake_dependency")
    (wheels / "cv" / refused).parent.mkdir(parents=True, exist_ok=True)
    (wheels / "cv" / refused).write_bytes(b"")
    result = wrapper("--wheels", wheels, "--site", tmp_path / "site", "--dry-run")
    assert result.returncode == 2 and "error:" in result.stderr and refused in result.stderr, result.stderr
    assert "pip install" not in result.stdout and not (tmp_path / "site").exists()


@pytest.mark.slow
def test_dry_run_shows_the_install_and_the_check_and_changes_nothing(tmp_path):
    wheels = tmp_path / "wheels"
    fake = make_wheel(wheels / "run", "mgcc_fake_dependency")
    present = make_wheel(wheels / "run", "pyyaml", "6.0.3")  # installed here: the image's own is kept
    out = tmp_path / "out"
    result = wrapper("--wheels", wheels, "--site", tmp_path / "site", "--out", out, "--dry-run",
                     "--device", "cpu", "--size", "tiny")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    install = next(line for line in lines if "pip install" in line)
    assert install.startswith("$ python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
                              f"--upgrade --target {tmp_path / 'site'} ")
    assert f"  {fake}" in lines and f"  {present}" not in lines
    assert any(line.startswith("have pyyaml ") for line in lines)
    check = next(line for line in lines if "gpu_check.py" in line)
    assert "timeout --signal=TERM --kill-after=10 270 python3 benchmarks/gpu_check.py --budget-s 240" in check
    assert f"--out-dir {out} --logs-dir runs/gpu_run_logs --device cpu --size tiny" in check and f"PYTHONPATH={tmp_path / 'site'}" in check
    assert not (tmp_path / "site").exists() and not out.exists()


@pytest.mark.slow
def test_install_only_puts_the_missing_wheels_on_the_path_and_a_second_call_skips_them(tmp_path):
    wheels = tmp_path / "wheels"
    make_wheel(wheels / "run", "mgcc_fake_dependency", "2.5")
    site = tmp_path / "site"
    first = wrapper("--wheels", wheels, "--site", site, "--install-only")
    assert first.returncode == 0, first.stderr
    assert (site / "mgcc_fake_dependency" / "__init__.py").read_text() == "__version__ = '2.5'\n"
    again = wrapper("--wheels", wheels, "--site", site, "--install-only")  # the same machine, a later call
    assert again.returncode == 0 and "have mgcc_fake_dependency 2.5" in again.stdout, again.stdout
    assert "pip install" not in again.stdout


@pytest.mark.slow
def test_the_wrapper_runs_gpu_check_and_writes_its_tables_under_out(tmp_path):
    """The whole command on the CPU, no wheels to install: the preflight, then gpu_check's table under $OUT."""
    out = tmp_path / "out"
    result = wrapper("--wheels", tmp_path / "none", "--site", tmp_path / "site", "--budget-s", "900",
                     "--device", "cpu", "--size", "tiny", "--parts", "1", "--variants", "fp32 eager",
                     env={"OUT": str(out)}, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gpu_check exit 0" in result.stdout
    preflight = (out / "preflight.txt").read_text()
    assert preflight.startswith("torch ") and "\ncv2 " in preflight and "\nkornia " in preflight
    report = json.loads((out / "gpu_check.json").read_text())
    loop = [r for r in report["rows"] if r["benchmark"] == "loop" and r["variant"] == "fp32 eager"]
    assert loop and loop[0]["status"] == "measured", loop
    assert (out / "gpu_check.md").read_text().startswith("### GPU check: CPU")
    # four files, as the device tool brings back (at most 8): the logs packed
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "logs.tar.gz", "preflight.txt"]
    with tarfile.open(out / "logs.tar.gz") as logs:
        assert any(name.endswith("loop_mgcc.log") for name in logs.getnames())
