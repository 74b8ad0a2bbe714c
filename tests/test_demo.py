"""demo.py --quick: every stage of the method, run by its real script, fits the next one (CI's end-to-end test)."""
from __future__ import annotations

import json

from conftest import run_script
from dataloaders.io import read_id_list


def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = run_script("demo.py", "--quick", "--out-dir", out)
    for step in ("1/7 phantom data", "2/7 split files", "3/7 stage 1", "4/7 stage 1: sampling", "5/7 stage 2: MGCC",
                 "6/7 stage 2: supervised baseline", "7/7 prediction"):
        assert step in result.stdout
    assert "MGCC (semi-supervised)" in result.stdout and "supervised baseline" in result.stdout
    assert "C2ST accuracy" in result.stdout and (out / "synthetic" / "grid.png").is_file()
    synthetic = list((out / "synthetic" / "images").iterdir())
    assert len(synthetic) == 8
    config = (out / "mgcc" / "config.yaml").read_text()
    assert str(out / "synthetic") in config  # MGCC really trained on stage 1's images
    for mode in ("mgcc", "supervised"):
        metrics = json.loads((out / f"predictions_{mode}" / "metrics.json").read_text())
        assert metrics["images"] == len(read_id_list(out / "phantom" / "phantom_val1.txt"))
        assert (out / mode / "curves.png").is_file()
    assert (out / "phantom" / "preview.png").is_file()
    rerun = run_script("demo.py", "--quick", "--out-dir", out, check=False)
    assert rerun.returncode != 0 and "--overwrite" in rerun.stderr
