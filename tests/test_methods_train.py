"""The comparison methods in train.py's one loop, end to end on tiny data: training, exact resume with
teacher and second network, SIGTERM, torchrun, predict.py, reproduce.py arms, and the errors."""
from __future__ import annotations

import csv
import json
import signal

import pytest
import torch

from conftest import run_script
from test_distributed import torchrun
from test_interruptions import start_training, wait_for
from test_train import TINY
import train
from utils.checkpoint import load_checkpoint

# every method once, the networks alternating; mean-teacher's consistency from the start so the teacher matters
CASES = [("supervised", "unet"), ("mgcc", "mgcc"), ("mean-teacher", "unet"), ("cct", "mgcc"), ("cct", "unet"),
         ("cps", "unet"), ("fixmatch", "mgcc"), ("unimatch", "unet"), ("bcp", "mgcc")]


def method_flags(method, network):
    return ["--method", method, "--network", network, "--consistency-start", "0", "--seed", "4"]


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("method, network", CASES)
def test_each_method_trains_and_resumes_to_the_same_weights(tmp_path, dataset, method, network):
    args = ["--data-dir", str(dataset), *TINY, "--iterations", "4", "--eval-every", "2", *method_flags(method, network)]
    assert train.main([*args, "--out-dir", str(tmp_path / "straight")]) == 0
    assert train.main([*args, "--out-dir", str(tmp_path / "paused"), "--stop-after", "2"]) == 0
    assert load_checkpoint(tmp_path / "paused" / "checkpoint_last.pt")["iteration"] == 2
    assert train.main(["--out-dir", str(tmp_path / "paused"), "--resume", "--no-progress"]) == 0
    a = load_checkpoint(tmp_path / "straight" / "checkpoint_last.pt")
    b = load_checkpoint(tmp_path / "paused" / "checkpoint_last.pt")
    assert states_equal(a["model"], b["model"])
    extra = {"mean-teacher": "teacher.", "bcp": "teacher.", "cps": "second."}.get(method)  # the networks kept besides the student
    if extra is None:
        assert a["method_state"] is None and b["method_state"] is None
    else:
        assert states_equal(a["method_state"], b["method_state"]) and all(k.startswith(extra) for k in a["method_state"])
    assert a["network"] == network
    summary = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert summary["method"] == method and summary["network"] == network and summary["reference"]
    log = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    if method == "supervised":
        assert all(r["train_cons"] == 0 for r in log)
    elif method not in ("fixmatch", "unimatch"):  # theirs is 0 while no pixel is confident (Dice of nothing)
        assert all(r["train_cons"] > 0 for r in log)


@pytest.mark.slow
def test_mean_teacher_teacher_follows_the_student_by_ema(tmp_path, dataset):
    args = ["--data-dir", str(dataset), *TINY, "--iterations", "3", "--eval-every", "3",
            *method_flags("mean-teacher", "unet"), "--ema-decay", "0.5", "--out-dir", str(tmp_path / "run")]
    assert train.main(args) == 0
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    teacher = {k[len("teacher."):]: v for k, v in checkpoint["method_state"].items()}
    weights = [k for k in checkpoint["model"] if k.endswith("weight") and "stages.0.0" in k]
    # after three updates the teacher is near the student but not equal to it
    for k in weights:
        assert not torch.equal(teacher[k], checkpoint["model"][k])
        assert (teacher[k] - checkpoint["model"][k]).abs().max() < 0.05


@pytest.mark.slow  # runs training steps for seconds to minutes: out of the fast tier
def test_sigterm_checkpoints_the_teacher_and_resumes(tmp_path, dataset):
    out = tmp_path / "run"
    process = start_training(dataset, out, "--iterations", "100000", "--eval-every", "100000", "--checkpoint-every",
                             "1", *method_flags("mean-teacher", "unet"))
    wait_for(out / "checkpoint_last.pt", process)  # in the training loop
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "stopped by SIGTERM" in stderr, stderr[-3000:]
    checkpoint = load_checkpoint(out / "checkpoint_last.pt", "mgcc-segmenter")
    assert 0 < checkpoint["iteration"] < 100000 and any(k.startswith("teacher.") for k in checkpoint["method_state"])


@pytest.mark.slow
def test_every_method_under_torchrun_and_its_checkpoint_in_predict(tmp_path, dataset):
    """Two gloo processes: each comparison method trains (cps, with its second network, also resumes
    under torchrun), and its DDP checkpoint predicts in a single process."""
    for method, network in (("mean-teacher", "unet"), ("cct", "mgcc"), ("cps", "unet"), ("fixmatch", "unet"),
                            ("unimatch", "mgcc")):
        out = tmp_path / method
        resumed = method == "cps"
        result = torchrun("train.py", "--data-dir", dataset, "--out-dir", out, *TINY, "--iterations", "2",
                          *(["--stop-after", "1"] if resumed else []), *method_flags(method, network))
        assert "x 2 |" in result.stdout, method
        if resumed:
            torchrun("train.py", "--out-dir", out, "--resume", "--no-progress")
        checkpoint = torch.load(out / "checkpoint_last.pt", weights_only=True)
        assert checkpoint["iteration"] == 2 and len(checkpoint["rng"]) == 2
        if method in ("cps", "unimatch"):
            result = run_script("predict.py", "--checkpoint", out / "checkpoint_best.pt", "--input-dir", dataset,
                                "--output-dir", tmp_path / f"{method}_pred", "--num-workers", "0", "--no-overlays")
            assert f"{method} on {network}" in result.stdout + result.stderr
            assert len(list((tmp_path / f"{method}_pred" / "masks").iterdir())) == 12


@pytest.mark.slow
def test_bad_method_choices_are_one_clear_error(tmp_path, dataset):
    base = ["--data-dir", dataset, "--out-dir", tmp_path / "run", *TINY, "--iterations", "1"]
    result = run_script("train.py", *base, "--method", "mgcc", "--network", "unet", check=False)
    assert result.returncode == 2 and "use --network mgcc" in result.stderr and "Traceback" not in result.stderr
    result = run_script("train.py", *base, "--method", "cct", "--mode", "supervised", check=False)
    assert result.returncode == 2 and "disagree" in result.stderr
    result = run_script("train.py", *base, "--method", "cps", "--batch-size", "2", check=False)
    assert result.returncode == 2 and "labeled_batch_size must be in [1, batch_size - 1] for cps" in result.stderr


@pytest.mark.slow
def test_reproduce_two_methods_on_two_networks(tmp_path, dataset):
    out = tmp_path / "out"
    run_script("reproduce.py", "--data-dir", dataset, "--out-dir", out, "--preset", "demo", "--no-generator",
               "--methods", "supervised", "cct", "--networks", "mgcc", "unet", "--labeled-fraction", "0.5",
               "--train-args", "--iterations 2 --eval-every 2 --width 4 --image-size 32 --num-workers 0",
               "--device", "cpu", "--no-progress", "--no-estimate")
    with open(out / "results.csv") as f:
        arms = [r["arm"] for r in csv.DictReader(f)]
    assert arms == ["supervised", "cct-real", "supervised-unet", "cct-unet-real"]
    config = json.loads((out / "split1" / "cct-unet-real" / "metrics.json").read_text())
    assert (config["method"], config["network"]) == ("cct", "unet")
    report = (out / "results.md").read_text()
    assert "## Difference to `supervised`," in report and "## Difference to `supervised-unet`," in report
    differences = report.split("## Difference to `supervised-unet`,")[1].split("##")[0]
    assert "| cct-unet-real |" in differences and "| supervised |" in differences


@pytest.mark.slow
def test_bench_train_times_a_method_step():
    result = run_script("benchmarks/bench_train.py", "--device", "cpu", "--method", "mean-teacher", "--network", "unet",
                        "--width", "4", "--image-size", "32", "--steps", "1", "--warmup", "1", "--variants",
                        "fp32 eager", "--json")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert (row["method"], row["network"]) == ("mean-teacher", "unet") and row["it_per_s"] > 0
    assert row["tflop_per_step"] > 0
