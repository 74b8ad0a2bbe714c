"""Small datasets made by the tests themselves (never the real BUSI data)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded at run time


def write_dataset(root: Path, n: int = 12, size: tuple[int, int] = (64, 80), ext: str = ".png",
                  prefix: tuple[str, ...] = ("benign", "malignant"), seed: int = 0,
                  splits: bool = True, color: bool = False) -> Path:
    """A dataset in the MGCC layout: dark elliptical lesions on speckled bright tissue.

    ``size`` is (height, width). With ``splits`` it also writes ``<name>_train1.txt`` (first 2/3 of
    the ids) and ``<name>_val1.txt`` (the rest), name being the folder's name lower-cased.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks" / "0").mkdir(parents=True, exist_ok=True)
    h, w = size
    ids = []
    for k in range(n):
        case_id = f"{prefix[k % len(prefix)]} ({k + 1})"
        mask = np.zeros((h, w), np.uint8)
        center = (int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4)))
        axes = (int(rng.integers(w // 10, w // 4)), int(rng.integers(h // 10, h // 4)))
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        tissue = 150 + 40 * rng.standard_normal((h, w))
        image = np.where(mask > 0, 50 + 20 * rng.standard_normal((h, w)), tissue).clip(0, 255).astype(np.uint8)
        if color:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        cv2.imwrite(str(root / "images" / f"{case_id}{ext}"), image)
        cv2.imwrite(str(root / "masks" / "0" / f"{case_id}{ext if ext.lower() != '.jpg' else '.png'}"), mask)
        ids.append(case_id)
    if splits:
        name = root.resolve().name.lower()
        cut = (2 * n) // 3
        (root / f"{name}_train1.txt").write_text("\n".join(ids[:cut]) + "\n")
        (root / f"{name}_val1.txt").write_text("\n".join(ids[cut:]) + "\n")
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "toy")


def run_script(script: str, *args: str, cwd: Path = ROOT, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would; returns the completed process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}")
    return result


# train_ldm.py's autoencoder stage at the smallest size the tests train it (with --vae-steps N)
LDM_TINY_VAE = ("--config", ROOT / "configs" / "ldm_tiny.yaml", "--image-size", "32", "--device", "cpu",
                "--no-progress", "--num-workers", "0", "--preview-images", "0", "--stage", "vae")


def fake_sbatch(bin_dir: Path) -> None:
    """An sbatch stand-in in ``bin_dir``: numbers the jobs from 101 in $FAKE/count, keeps each job's script as
    $FAKE/job<N>.sh and answers as sbatch does."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\nn=$(($(cat \"$FAKE/count\" 2>/dev/null || echo 100) + 1)); echo $n > \"$FAKE/count\"\n"
        "cp \"$1\" \"$FAKE/job$n.sh\"; echo \"Submitted batch job $n\"\n")
