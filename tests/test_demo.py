"""demo.py --quick: reproduce.py's demo preset on two splits of a tiny phantom dataset, end to end
(CI's end-to-end test), then a rerun that changes nothing and a changed option that is refused."""
from __future__ import annotations

import csv
import json

import pytest

from conftest import run_script
from dataloaders.io import read_id_list

ARMS = ("supervised", "mgcc-real", "mgcc-synthetic")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    result = run_script("demo.py", "--quick", "--out-dir", out, timeout=1800)
    return out, result


@pytest.mark.slow
def test_quick_demo_runs_every_arm_on_two_splits(demo):
    out, result = demo
    for stage in ("phantom", "split", "split1/ldm", "split1/samples", "split2/ldm", "split2/samples",
                  *(f"split{i}/{arm}" for i in (1, 2) for arm in ARMS),
                  *(f"split{i}/{arm}/predict" for i in (1, 2) for arm in ARMS)):
        assert f"=== {stage}\n$ python " in result.stdout, stage
    assert "estimate" in result.stdout and "total measured" in result.stdout
    assert "timing the step for the estimate" not in result.stdout  # no benchmark before the stages (issue 34)

    with open(out / "times.csv") as f:
        assert all(float(row["train_seconds"]) > 0 for row in csv.DictReader(f))
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["arm"], r["split"]) for r in rows) == sorted((a, str(i)) for a in ARMS for i in (1, 2))
    for row in rows:
        val = json.loads((out / f"split{row['split']}" / f"{row['arm']}_val" / "metrics.json").read_text())
        assert float(row["iou"]) == pytest.approx(val["iou"]) and float(row["hd95"]) == pytest.approx(val["hd95"])
        assert val["images"] == len(read_id_list(out / "phantom" / f"phantom_val{row['split']}.txt"))
        run = json.loads((out / f"split{row['split']}" / row["arm"] / "metrics.json").read_text())
        assert int(row["selected_iteration"]) == run["best_iteration"]
    # each arm is what it claims: the baseline sees no unlabeled image, MGCC-synthetic only the samples
    for i in (1, 2):
        configs = {arm: (out / f"split{i}" / arm / "config.yaml").read_text() for arm in ARMS}
        assert "mode: supervised" in configs["supervised"]
        assert "unlabeled_from_train: true" in configs["mgcc-real"] and "unlabeled_dir: []" in configs["mgcc-real"]
        assert str(out / f"split{i}" / "samples") in configs["mgcc-synthetic"]
        assert "unlabeled_from_train: false" in configs["mgcc-synthetic"]
        assert len(list((out / f"split{i}" / "samples" / "images").iterdir())) == 8

    report = (out / "results.md").read_text()
    assert "## Mean ± standard deviation over runs (splits 1, 2)" in report
    assert "## Difference to `supervised`" in report and "| mgcc-synthetic |" in report
    assert "## Generator (stage 1) per split" in report
    assert "the official protocol: optimistic" in report
    assert (out / "results.png").stat().st_size > 0 and (out / "phantom" / "preview.png").is_file()


@pytest.mark.slow
def test_rerun_skips_everything_and_changes_nothing(demo):
    out, _ = demo
    # every stage's outputs; the results files are written again, with the same content
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix in (".pt", ".png", ".json")
              and p.name != "stages.json" and not p.name.startswith(("results.", "results_"))}
    results = (out / "results.csv").read_text()
    rerun = run_script("demo.py", "--quick", "--out-dir", out)
    assert "$ python" not in rerun.stdout  # no stage ran again
    assert rerun.stdout.count("done, skipped") == 2 + 2 * (2 + 2 * len(ARMS))
    assert (out / "results.csv").read_text() == results
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.slow
def test_changed_option_is_a_stale_stage_error(demo):
    out, _ = demo
    data = out / "phantom"
    result = run_script("reproduce.py", "--data-dir", data, "--out-dir", out, "--preset", "demo", "--splits", "1",
                        "--labeled-fraction", "0.5", "--ldm-config", "configs/ldm_tiny.yaml", "--num-samples", "8",
                        "--ldm-args", "--vae-steps 4 --diffusion-steps 4 --image-size 32", "--sample-args",
                        "--steps 10", "--schedule-scale", "1", "--train-args",
                        "--iterations 6 --eval-every 2 --width 4 --image-size 32",
                        "--device", "cpu", "--no-progress", check=False)
    assert result.returncode == 2
    assert "split1/supervised" in result.stderr and "--iterations 4 -> 6" in result.stderr
    assert "split1/ldm" not in result.stderr  # stage 1 did not change
    assert "$ python" not in result.stdout  # nothing ran
