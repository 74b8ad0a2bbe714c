"""reproduce.py beyond the demo preset (tests/test_demo.py runs that end to end): the honest protocol,
torchrun stages, and the errors a user meets first."""
from __future__ import annotations

import csv
import json

import pytest

from conftest import run_script, write_dataset

TINY = "--iterations 2 --eval-every 2 --width 4 --image-size 32 --num-workers 0 --schedule-scale 1"


@pytest.mark.slow
def test_holdout_protocol_under_torchrun(tmp_path):
    """--holdout: selection on the training list's tail, val evaluated once; --nproc-per-node 2: the
    training stage runs under torchrun with two processes, and results.md says which protocol. The
    split files are named after another folder (BUSI_2020/busi_train1.txt): their prefix is found."""
    data = write_dataset(tmp_path / "BUSI_2020", n=15, size=(40, 48))
    for part in ("train", "val"):
        (data / f"busi_2020_{part}1.txt").rename(data / f"busi_{part}1.txt")
    out = tmp_path / "out"
    result = run_script("reproduce.py", "--data-dir", data, "--out-dir", out, "--preset", "demo", "--no-generator",
                        "--arms", "supervised", "--labeled-fraction", "0.5", "--holdout", "0.2",
                        "--nproc-per-node", "2", "--train-args", TINY, "--device", "cpu", "--no-progress",
                        "--no-estimate")
    assert "$ python -m torch.distributed.run --standalone --nproc_per_node=2 train.py" in result.stdout
    assert "--split-name busi" in result.stdout and "using busi_train<i>.txt" in result.stderr
    assert "supervised on cpu x 2" in result.stdout
    run = json.loads((out / "split1" / "supervised" / "metrics.json").read_text())
    assert run["selection_set"] == "holdout"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["arm"], r["split"], r["selection_set"]) for r in rows] == [("supervised", "1", "holdout")]
    report = (out / "results.md").read_text()
    assert "last 0.2 of each training list (holdout)" in report and "no generator" in report
    assert "--holdout 0.2" in report  # the command that made it


@pytest.mark.slow
def test_holdout_ids_are_kept_from_the_generator_too(tmp_path):
    """With --holdout, stage 1 trains without the holdout ids, so its samples pass train.py's
    provenance check and mgcc-synthetic selects on ids no image of its training came from."""
    data = write_dataset(tmp_path / "toy", n=15, size=(40, 48))
    out = tmp_path / "out"
    run_script("reproduce.py", "--data-dir", data, "--out-dir", out, "--preset", "demo", "--arms", "mgcc-synthetic",
               "--labeled-fraction", "0.5", "--holdout", "0.2", "--ldm-config", "configs/ldm_tiny.yaml",
               "--ldm-args", "--vae-steps 2 --diffusion-steps 2 --image-size 32", "--num-samples", "8",
               "--sample-args", "--steps 5 --no-c2st", "--train-args", TINY, "--device", "cpu", "--no-progress",
               "--no-estimate")
    train_ids = [line for line in (data / "toy_train1.txt").read_text().splitlines() if line]
    generator = json.loads((out / "split1" / "ldm" / "ldm.json").read_text())
    assert generator["train_ids"] == train_ids[:8]  # 10 training ids, the last 2 held out
    run = json.loads((out / "split1" / "mgcc-synthetic" / "metrics.json").read_text())
    assert run["selection_set"] == "holdout"


@pytest.mark.slow
def test_missing_split_files_and_impossible_arms_are_one_clear_error(tmp_path):
    data = write_dataset(tmp_path / "toy", n=6, splits=False)
    result = run_script("reproduce.py", "--data-dir", data, "--no-estimate", check=False)
    assert result.returncode == 2 and "no split files toy_train<i>.txt" in result.stderr
    assert "python split.py --data-dir" in result.stderr and "Traceback" not in result.stderr
    result = run_script("reproduce.py", "--data-dir", data, "--splits", "3", check=False)
    assert result.returncode == 2 and "toy_train3.txt not found" in result.stderr
    result = run_script("reproduce.py", "--data-dir", data, "--no-generator", "--arms", "mgcc-synthetic", check=False)
    assert result.returncode == 2 and "mgcc-synthetic needs the generator" in result.stderr


@pytest.mark.slow
def test_seeds_mask_values_and_stale_content(tmp_path):
    """--seeds 1 2: every arm per seed, one results row per run, the differences paired by (split, seed).
    0/1 masks with --mask-values nonzero: the training and the predict stages all read them so (predict
    once refused them). Then the config file edited in place, and one image rewritten: both are the
    stale-stage error naming the stage and what changed, though the commands are unchanged."""
    import cv2
    import shutil

    data = write_dataset(tmp_path / "toy", n=15, size=(40, 48))
    for mask in (data / "masks" / "0").iterdir():
        cv2.imwrite(str(mask), (cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE) > 0).astype("uint8"))
    config = tmp_path / "demo.yaml"
    shutil.copy("configs/demo.yaml", config)
    out = tmp_path / "out"
    command = ["reproduce.py", "--data-dir", data, "--out-dir", out, "--config", config, "--no-generator",
               "--labeled-fraction", "0.5", "--seeds", "1", "2", "--mask-values", "nonzero",
               "--train-args", TINY, "--device", "cpu", "--no-progress", "--no-estimate"]
    result = run_script(*command)
    assert "--mask-values nonzero" in result.stdout.split("=== split1/seed1/supervised/predict")[1]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["arm"], r["seed"]) for r in rows) == [("mgcc-real", "1"), ("mgcc-real", "2"),
                                                            ("supervised", "1"), ("supervised", "2")]
    assert (out / "split1" / "seed2" / "mgcc-real_val" / "metrics.json").is_file()
    report = (out / "results.md").read_text()
    assert "| mgcc-real | IoU | 2 |" in report and "- Seeds: 1, 2" in report
    assert "- Project version: " in report and "- Project version: unknown" not in report  # a git checkout

    config.write_text(config.read_text().replace("lr: 0.01", "lr: 0.5"))
    result = run_script(*command, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "split1/seed1/supervised (" in result.stderr and "config lr 0.01 -> 0.5" in result.stderr
    assert "$ python" not in result.stdout
    config.write_text(config.read_text().replace("lr: 0.5", "lr: 0.01"))
    run_script(*command)  # as it was: every stage done, nothing ran
    image = data / "images" / "benign (1).png"
    cv2.imwrite(str(image), 255 - cv2.imread(str(image), cv2.IMREAD_GRAYSCALE))
    result = run_script(*command, check=False)
    assert result.returncode == 2 and "file images/benign (1).png changed" in result.stderr
    assert "split1/seed2/mgcc-real/predict (" in result.stderr


def test_the_estimate_adds_start_up_warm_steps_and_evaluations(tmp_path, monkeypatch):
    """The plan's model of a training stage, with the benchmark's figures fixed: start-up (the benchmark's
    wall time less its 3 + 1 + 10 timed steps) + iterations x step + the evaluations' forward passes."""
    import reproduce
    from protocol import estimate
    from protocol.ledger import Ledger

    data = write_dataset(tmp_path / "toy", n=15, size=(40, 48))  # 10 training ids, 5 val
    args = reproduce.parse_args(["--data-dir", str(data), "--out-dir", str(tmp_path / "out"), "--preset", "demo",
                                 "--no-generator", "--arms", "supervised", "--labeled-fraction", "0.5",
                                 "--schedule-scale", "0.01", "--train-args", "--eval-every 500 --image-size 32"])
    args.nproc_per_node = 1
    stages = reproduce.plan(args, "toy", [1], "cpu")
    calls = []

    def benchmark(script, flags):
        calls.append(script)
        # 0.05 s a step, 1e9 FLOPs a step; 14 steps of 0.05 s in a wall time of 3.7 s: 3 s of start-up
        return [{"it_per_s": 20.0, "tflop_per_step": 1e-3}], 3.7

    monkeypatch.setattr(estimate, "benchmark", benchmark)
    monkeypatch.setattr(estimate, "forward_flops_per_image", lambda cfg: 2e8)  # a fifth of a step's FLOPs
    estimate.estimate(stages, {s.name: "todo" for s in stages}, Ledger(tmp_path / "l.json"), "cpu", 1)
    train, predict = stages
    # 40,000 x 0.5 x 0.01 = 200 iterations, an evaluation every 5 (500 x 0.01): 40 over the 5 val images,
    # and the final one; an image's forward pass is 0.05 s x 0.2 = 0.01 s
    assert train.estimate == pytest.approx(3.0 + 200 * 0.05 + (40 * 5 + 5) * 0.01)
    assert predict.estimate == pytest.approx(3.0 + 5 * 0.01)
    assert calls == ["bench_train.py"]  # one benchmark for both


def test_passed_flags_take_a_value_with_a_space_or_an_equals_sign_and_are_checked_before_any_stage(tmp_path):
    """--ldm-args "--no-class-conditioning" as typed (argparse alone took the value for an option of
    reproduce.py), the same as --ldm-args=...; a flag its script does not know is one error naming both."""
    import reproduce
    from utils.config import ConfigError

    data = write_dataset(tmp_path / "toy", n=12)
    common = ["--data-dir", str(data), "--out-dir", str(tmp_path / "out"), "--preset", "demo"]
    spaced = reproduce.parse_args(common + ["--ldm-args", "--no-class-conditioning", "--train-args", "--no-tensorboard",
                                            "--sample-args", "--steps 3"])
    equals = reproduce.parse_args(common + ["--ldm-args=--no-class-conditioning", "--train-args=--no-tensorboard",
                                            "--sample-args=--steps 3"])
    for args in (spaced, equals):
        assert (args.ldm_args, args.train_args, args.sample_args) == (
            ["--no-class-conditioning"], ["--no-tensorboard"], ["--steps", "3"])
    assert spaced.argv[-6:] == ["--ldm-args", "--no-class-conditioning", "--train-args", "--no-tensorboard",
                                "--sample-args", "--steps 3"]  # a cluster job's command repeats them as given
    with pytest.raises(ConfigError, match=r"--sample-args '--steps x': not valid for sample_ldm.py: argument --steps: "
                                          r"invalid int value: 'x'"):
        reproduce.parse_args(common + ["--sample-args", "--steps x"])
    with pytest.raises(ConfigError, match=r"--train-args '--bogus': not valid for train.py: unrecognized arguments"):
        reproduce.parse_args(common + ["--train-args", "--bogus"])
    with pytest.raises(ConfigError, match=r"--ldm-args '--class-csv': not valid for train_ldm.py: .*expected one"):
        reproduce.parse_args(common + ["--ldm-args", "--class-csv"])


@pytest.mark.slow
def test_results_on_all_val_ids_and_the_clean_subset(tmp_path):
    """Issue 30: a val image that is a mirrored copy of a training image: reproduce.py notes the split's count,
    predict scores the clean subset without it, and results.csv / results.md give both columns with counts."""
    import cv2

    from dataloaders.phantom import make_phantom_dataset

    data = tmp_path / "ph"
    ids = make_phantom_dataset(data, num_images=12, size=(64, 64), preview_count=0)
    (data / "ph_train1.txt").write_text("".join(f"{i}\n" for i in ids[:8]))
    (data / "ph_val1.txt").write_text("".join(f"{i}\n" for i in ids[8:]))
    for sub in ("images", "masks/0"):  # val id 9 becomes a mirrored copy of training id 2
        picture = cv2.imread(str(data / sub / f"{ids[2]}.png"), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(data / sub / f"{ids[9]}.png"), picture[:, ::-1].copy())
    out = tmp_path / "out"
    result = run_script("reproduce.py", "--data-dir", data, "--out-dir", out, "--preset", "demo", "--no-generator",
                        "--arms", "supervised", "--labeled-fraction", "0.5", "--train-args", TINY, "--device", "cpu",
                        "--no-progress", "--no-estimate")
    assert ("note: near-duplicates across the splits: split 1: 1 of 4 val ids have an exact or near-duplicate in "
            "ph_train1.txt") in result.stderr
    assert "near-duplicates across the split: split 1: 1 of 4 val ids" in result.stderr  # train.py's own note
    val = json.loads((out / "split1" / "supervised_val" / "metrics.json").read_text())
    assert val["clean_subset"]["dropped_ids"] == {ids[9]: [ids[2]]}
    with open(out / "split1" / "supervised_val" / "metrics.csv") as f:
        per_image = {r["id"]: r for r in csv.DictReader(f)}
    with open(out / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert (row["val_images"], row["clean_images"]) == ("4", "3")
    for metric in ("iou", "accuracy"):  # (a 2-iteration network: IoU may be 0 everywhere, pixel accuracy is not)
        clean = sum(float(per_image[i][metric]) for i in ids[8:] if i != ids[9]) / 3
        assert float(row[f"clean_{metric}"]) == pytest.approx(clean) and float(row[metric]) == pytest.approx(val[metric])
    assert float(row["clean_accuracy"]) != pytest.approx(float(row["accuracy"]))
    clean_iou = float(row["clean_iou"])
    report = (out / "results.md").read_text()
    assert "## All val ids and the clean subset" in report and "split 1: 3 of 4 (1 dropped)" in report
    assert "(score >= 0.96," in report
    assert f"| 1 | {row['seed']} | supervised | 4 | {val['iou']:.4f} | 3 | {clean_iou:.4f} |" in report
