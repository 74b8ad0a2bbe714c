"""train.py end to end on a small dataset: outputs, modes, exact resume, and errors."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import ROOT, run_script, write_dataset
import train
from segmenter.evaluation import evaluate
from segmenter.training import build_training

TINY = ["--width", "4", "--image-size", "32", "--batch-size", "4", "--labeled-batch-size", "2",
        "--eval-every", "3", "--eval-batch-size", "4", "--num-workers", "0", "--no-progress"]


def run_train(tmp_path, dataset, *extra, out="run"):
    out_dir = tmp_path / out
    code = train.main(["--data-dir", str(dataset), "--out-dir", str(out_dir), *TINY, *extra])
    return code, out_dir


@pytest.mark.slow
def test_mgcc_run_writes_everything(tmp_path, dataset):
    synth = write_dataset(tmp_path / "synth", n=3, splits=False, seed=9)
    code, out = run_train(tmp_path, dataset, "--iterations", "6", "--unlabeled-dir", str(synth))
    assert code == 0
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "curves.png", "checkpoint_last.pt", "checkpoint_best.pt"):
        assert (out / name).is_file(), name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [3, 6]
    assert all(0 <= r["iou"] <= 1 and r["train_cons"] > 0 for r in lines)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["best"]["iou"] == max(r["iou"] for r in lines) and "optimistic" in summary["note"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["unlabeled_dir"] == [str(synth)] and config["mode"] == "mgcc" and "device" not in config
    best = torch.load(out / "checkpoint_best.pt", weights_only=True)
    assert best["kind"] == "mgcc-segmenter" and best["iteration"] == summary["best_iteration"]


@pytest.mark.slow
def test_supervised_baseline_shares_the_loop(tmp_path, dataset):
    code, out = run_train(tmp_path, dataset, "--mode", "supervised", "--iterations", "3", "--labeled-fraction", "1.0")
    assert code == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train_cons"] == 0 and record["train_sup"] == pytest.approx(record["train_loss"])


@pytest.mark.slow
def test_holdout_selects_on_training_ids_and_reports_val_once(tmp_path, dataset):
    code, out = run_train(tmp_path, dataset, "--iterations", "3", "--holdout", "0.25")
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["selection_set"] == "holdout" and set(summary["val"]) >= {"iou", "dice", "hd95"}
    assert "holdout" in summary["note"]


@pytest.mark.slow
def test_bf16_training_is_evaluated_in_fp32(tmp_path, dataset, monkeypatch):
    """Metrics never depend on the training precision: every evaluation runs without autocast."""
    calls = []

    def spy(model, loader, device, autocast_dtype=None, **kwargs):
        calls.append(autocast_dtype)
        return evaluate(model, loader, device, autocast_dtype, **kwargs)

    monkeypatch.setattr(train, "evaluate", spy)
    code, out = run_train(tmp_path, dataset, "--iterations", "3", "--holdout", "0.25", "--precision", "bf16")
    assert code == 0 and calls == [None, None]  # the holdout evaluation, then the single val one
    assert yaml.safe_load((out / "config.yaml").read_text())["precision"] == "bf16"


@pytest.mark.slow
@pytest.mark.parametrize("data_on_device", ["on", "off"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, dataset, data_on_device):
    args = ["--iterations", "6", "--seed", "5", "--data-on-device", data_on_device]
    assert run_train(tmp_path, dataset, *args, out="straight")[0] == 0
    assert run_train(tmp_path, dataset, *args, "--stop-after", "4", out="resumed")[0] == 0
    paused = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)
    assert paused["iteration"] == 4
    assert train.main(["--out-dir", str(tmp_path / "resumed"), "--resume", "--no-progress"]) == 0
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(state_a["momentum_buffer"], state_b["momentum_buffer"])
    assert [r["iou"] for r in a["history"]] == [r["iou"] for r in b["history"]]
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [3, 6]


@pytest.mark.slow
def test_iterations_default_to_the_official_schedule(tmp_path, dataset):
    code, out = run_train(tmp_path, dataset, "--base-iterations", "8", "--labeled-fraction", "0.25",
                          "--stop-after", "1")
    assert code == 0
    assert torch.load(out / "checkpoint_last.pt", weights_only=True)["config"]["iterations"] is None
    code = train.main(["--out-dir", str(out), "--resume", "--no-progress"])
    assert code == 0 and json.loads((out / "metrics.json").read_text())["iterations"] == 2  # 8 x 0.25


@pytest.mark.slow
def test_eval_every_epoch_evaluates_after_each_pass_over_the_labeled_images(tmp_path, dataset):
    """8 training ids, half labeled: 4 labeled images in batches of 2 are an epoch of 2 iterations."""
    config = tmp_path / "c.yaml"
    config.write_text("eval_every: epoch\n")
    out = tmp_path / "run"
    tiny = [a for k, a in enumerate(TINY) if k not in (TINY.index("--eval-every"), TINY.index("--eval-every") + 1)]
    assert train.main(["--config", str(config), "--data-dir", str(dataset), "--out-dir", str(out), *tiny,
                       "--iterations", "5"]) == 0
    assert [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4, 5]
    assert yaml.safe_load((out / "config.yaml").read_text())["eval_every"] == "epoch"
    code, out = run_train(tmp_path, dataset, "--iterations", "3", "--eval-every", "epoch", "--labeled-fraction", "1",
                          "--mode", "supervised", out="all_labeled")  # 8 labeled: 4 iterations per epoch
    assert code == 0
    assert [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [3]


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--bogus-flag", "1"], "unrecognized arguments: --bogus-flag"),
    (["--eval-every", "0"], "expected a positive whole number or 'epoch', got 0"),
    (["--eval-every", "epochs"], "expected a positive whole number or 'epoch', got 'epochs'"),
    (["--iterations", "2", "--labeled-batch-size", "9", "--batch-size", "12"], "larger than the labeled set"),
    (["--iterations", "2", "--data-dir", "/nonexistent/data"], "data folder not found: /nonexistent/data"),
    (["--iterations", "2", "--unlabeled-dir", "/nonexistent/synth"], "unlabeled folder not found"),
    (["--iterations", "2", "--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
])
def test_bad_arguments_give_one_clear_error(tmp_path, dataset, args, message):
    result = run_script("train.py", "--data-dir", dataset, "--out-dir", tmp_path / "run", *TINY, *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()


@pytest.mark.slow
def test_unknown_config_key_is_an_error(tmp_path, dataset):
    config = tmp_path / "c.yaml"
    config.write_text("width: 4\nlearning_rate: 0.1\n")
    result = run_script("train.py", "--config", config, "--data-dir", dataset, check=False)
    assert result.returncode == 2 and "unknown key(s) learning_rate" in result.stderr


@pytest.mark.slow
def test_existing_run_is_not_overwritten(tmp_path, dataset):
    assert run_train(tmp_path, dataset, "--iterations", "1")[0] == 0
    before = (tmp_path / "run" / "checkpoint_last.pt").read_bytes()
    result = run_script("train.py", "--data-dir", dataset, "--out-dir", tmp_path / "run", *TINY, "--iterations", "1",
                        check=False)
    assert result.returncode == 2 and "--resume" in result.stderr and "--overwrite" in result.stderr
    assert (tmp_path / "run" / "checkpoint_last.pt").read_bytes() == before


def test_busi_config_holds_the_official_defaults():
    config = yaml.safe_load((ROOT / "configs" / "busi.yaml").read_text())
    assert {k: config[k] for k in ("lr", "momentum", "weight_decay", "batch_size", "labeled_batch_size",
                                   "consistency_rampup", "consistency_ramp_every", "image_size",
                                   "width", "base_iterations", "labeled_fraction", "eval_every")} == {
        "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001, "batch_size": 8, "labeled_batch_size": 4,
        "consistency_rampup": 200.0, "consistency_ramp_every": 150, "image_size": 256,
        "width": 64, "base_iterations": 40000, "labeled_fraction": 0.5,
        "eval_every": "epoch"}  # official: after every pass over the labeled images (226 // 4 = 56 on BUSI)
    assert set(config) <= {o.name for o in train.OPTIONS}
    # consistency null: each method's reference weight, MGCC's official 7 for mgcc
    cfg = train.parse_config(train.OPTIONS, "", ["--config", str(ROOT / "configs" / "busi.yaml"), "--width", "2"])
    train.resolve_method(cfg)
    assert config["consistency"] is None and build_training(cfg).consistency == 7.0


@pytest.mark.slow
def test_any_dataset_in_the_layout(tmp_path):
    """Other id names, upper-case extensions, JPEG images, sizes that are not square: split, train, predict."""
    data = write_dataset(tmp_path / "Thyroid", n=9, size=(45, 70), ext=".JPG", prefix=("case",), splits=False)
    run_script("split.py", "--data-dir", data)
    assert (data / "thyroid_train1.txt").is_file()
    code, out = run_train(tmp_path, data, "--iterations", "2", "--eval-every", "2")
    assert code == 0 and json.loads((out / "metrics.json").read_text())["iterations"] == 2
    run_script("predict.py", "--checkpoint", out / "checkpoint_best.pt", "--input-dir", data, "--output-dir",
               tmp_path / "pred", "--masks-dir", data / "masks" / "0", "--num-workers", "0", "--no-overlays")
    assert sorted(p.name for p in (tmp_path / "pred" / "masks").iterdir()) == [f"case ({k}).png" for k in
                                                                                 sorted(range(1, 10), key=str)]


@pytest.mark.slow
def test_a_scaled_run_follows_the_published_lambda_and_lr_curves(tmp_path, dataset, monkeypatch, capsys):
    """--schedule-scale 0.25 of a 40-iteration schedule with a ramp step every 6 iterations: 10 iterations,
    a ramp step every 1.5. At every iteration it of the scaled run, lambda and the learning rate are the
    published schedule's at iteration it / 0.25 (the same t/T); the evaluations are as many."""
    import methods.base
    from utils.schedule import consistency_weight, poly_lr_factor

    weights = {}

    def spy(iteration, weight, rampup, ramp_every):
        weights[iteration] = consistency_weight(iteration, weight, rampup, ramp_every)
        return weights[iteration]

    monkeypatch.setattr(methods.base, "consistency_weight", spy)  # the method's schedule (methods/base.py)
    code, out = run_train(tmp_path, dataset, "--iterations", "40", "--consistency-ramp-every", "6",
                          "--consistency-rampup", "5", "--eval-every", "8", "--schedule-scale", "0.25")
    assert code == 0
    assert sorted(weights) == list(range(10))
    for it in range(10):  # published: 40 iterations, t = it // 6 over 5 ramp steps
        assert weights[it] == consistency_weight(4 * it, 7.0, 5.0, 6)
    assert weights[9] == 7.0 and weights[3] == pytest.approx(7.0 * 2.718281828 ** (-5 * (1 - 2 / 5) ** 2))  # t = 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [2, 4, 6, 8, 10]  # 8 x 0.25: every 2, as the published every 8
    for r in lines:
        assert r["lr"] == pytest.approx(0.01 * poly_lr_factor(4 * r["iteration"], 40), abs=1e-12)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["iterations"] == 10 and summary["schedule_scale"] == 0.25
    assert "schedule x 0.25: ramp step every 1.5 iterations" in capsys.readouterr().out


def test_busi_config_scaled_keeps_the_official_curves():
    """busi.yaml x 0.05 on a BUSI split (226 labeled images): 1,000 iterations, a ramp step every 7.5,
    evaluation every 3 (the official 56 x 0.05); lambda(t/T) the official one, 3.99 at the end."""
    from utils.schedule import consistency_weight

    cfg = train.parse_config(train.OPTIONS, "", ["--config", str(ROOT / "configs" / "busi.yaml"),
                                                 "--schedule-scale", "0.05"])
    schedule = train.run_schedule(cfg, SimpleNamespace(labeled=range(226)))  # run_data's labeled ids (issue 20)
    assert (schedule.iterations, schedule.ramp_every, schedule.eval_every) == (1000, 7.5, 3)
    for it in range(1000):
        assert consistency_weight(it, 7.0, 200.0, schedule.ramp_every) == consistency_weight(20 * it, 7.0, 200.0, 150)
    assert train.final_consistency_weight(7.0, 200.0, schedule.ramp_every, 1000) == pytest.approx(3.99, abs=0.005)


def test_a_scaled_mean_teacher_starts_its_unlabeled_loss_at_the_scaled_iteration():
    """Mean-teacher's unlabeled loss starts at iteration 1,000 of the published 20,000 (SSL4MIS): x 0.01,
    at iteration 10 of 200 (it stayed at 1,000, past the end of the run: a supervised run with a teacher)."""
    from fractions import Fraction
    from segmenter.training import build_training

    cfg = train.parse_config(train.OPTIONS, "", ["--config", str(ROOT / "configs" / "busi.yaml"), "--method",
                                                 "mean-teacher", "--network", "unet", "--width", "4"])
    schedule = train.run_schedule(cfg, SimpleNamespace(labeled=range(226)))
    assert build_training(cfg, schedule.ramp_every).consistency_start == 1000
    scaled = train.parse_config(train.OPTIONS, "", ["--config", str(ROOT / "configs" / "busi.yaml"), "--method",
                                                    "mean-teacher", "--network", "unet", "--width", "4",
                                                    "--schedule-scale", "0.01"])
    schedule = train.run_schedule(scaled, SimpleNamespace(labeled=range(226)))
    method = build_training(scaled, schedule.ramp_every, schedule.scale)
    assert schedule.iterations == 200 and schedule.scale == Fraction(1, 100) and method.consistency_start == 10
    assert method.consistency_weight(9) == 0.0 and method.consistency_weight(10) > 0.0
    # at matching t/T, the published weight
    assert method.consistency_weight(100) == build_training(cfg, 150).consistency_weight(10000)
