"""BCP (methods/bcp.py): its loss on cases computed by hand, its box and bidirectional mixing on small
tensors, the largest-component step, the teacher's EMA and phase switch; end to end in train.py with
exact resume, under torchrun with predict.py, and as reproduce.py's arms."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import methods.bcp as bcp
from conftest import run_script
from methods import METHODS, build_method, network_args
from methods.bcp import (BCP, bidirectional_mix, copy_paste_box, ema_state_update, largest_component,
                         pretrain_iterations, pretrain_mix)
from methods.losses import region_loss
from test_distributed import torchrun
from test_methods_train import states_equal
from test_train import TINY
import train
from utils.checkpoint import load_checkpoint


class FirstChannel(nn.Module):
    """A network whose logit is its input's first channel (plus a parameter at 0, so it trains)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x[:, :1] + self.bias


def fixed_box(monkeypatch, rows: slice, cols: slice, size: int = 8) -> torch.Tensor:
    inside = torch.zeros(1, 1, size, size, dtype=torch.bool)
    inside[..., rows, cols] = True
    monkeypatch.setattr(bcp, "copy_paste_box", lambda *args, **kwargs: inside)
    return inside


def record_region_losses(monkeypatch) -> list:
    """Replace region_loss by a recorder: call k returns k (1, 2, ...) and keeps (logits, target, region)."""
    calls = []

    def recorder(logits, target, region):
        calls.append((logits.detach(), target, region))
        return torch.tensor(float(len(calls)))
    monkeypatch.setattr(bcp, "region_loss", recorder)
    return calls


def constant_images(*values: float, size: int = 8) -> torch.Tensor:
    return torch.cat([torch.full((1, 3, size, size), v) for v in values])


def test_region_loss_by_hand():
    logits = torch.tensor([0.0, math.log(3), 0.0, math.log(3)]).view(1, 1, 1, 4)  # p = 1/2, 3/4, 1/2, 3/4
    target = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 4)
    region = torch.tensor([True, True, False, True]).view(1, 1, 1, 4)  # pixel 2 left out
    # region p = (1/2, 3/4, 3/4), t = (1, 1, 0): foreground 1 - 2 (5/4) / (11/8 + 2), background 1 - 2 (1/4) / (3/8 + 1)
    dice = ((1 - 2.5 / 3.375) + (1 - 0.5 / 1.375)) / 2
    ce = (math.log(2) + math.log(4 / 3) + math.log(4)) / 3
    assert region_loss(logits, target, region).item() == pytest.approx((dice + ce) / 2, abs=1e-6)
    assert region_loss(logits, target, torch.zeros_like(region)).item() == 0  # an empty region counts nothing


def test_box_is_two_thirds_and_never_reaches_the_last_row_or_column():
    torch.manual_seed(0)
    tops, lefts = set(), set()
    for _ in range(600):
        inside = copy_paste_box(32, 48)
        rows, cols = inside[0, 0].any(1).nonzero()[:, 0], inside[0, 0].any(0).nonzero()[:, 0]
        assert inside.sum() == 21 * 32 and len(rows) == 21 and len(cols) == 32  # int(2/3 32), int(2/3 48): one box
        tops.add(int(rows[0]))
        lefts.add(int(cols[0]))
    assert tops == set(range(11)) and lefts == set(range(16))  # numpy's randint(0, 32 - 21): 32 - 21 excluded
    torch.manual_seed(0)
    first = copy_paste_box(32, 48)
    torch.manual_seed(0)
    assert torch.equal(first, copy_paste_box(32, 48))  # from torch's generator, which checkpoints save


def test_mixing_pastes_in_both_directions_inside_the_box():
    inside = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    inside[..., 1:3, 0:2] = True
    labeled, unlabeled = constant_images(1, 2, size=4), constant_images(3, 4, size=4)  # a, b; u_a, u_b
    into_unlabeled, into_labeled = bidirectional_mix(labeled, unlabeled, inside)
    box = inside.expand(1, 3, 4, 4)
    assert (into_unlabeled[box] == 1).all() and (into_unlabeled[~box] == 3).all()  # a into u_a
    assert (into_labeled[box] == 4).all() and (into_labeled[~box] == 2).all()  # u_b into b
    masks = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    mixed, target = pretrain_mix(labeled, masks, inside)
    assert (mixed[box] == 2).all() and (mixed[~box] == 1).all()  # pre-training: b into a
    assert torch.equal(target[0], inside[0].float())


def test_largest_component_is_eight_connected_per_image():
    labels = torch.zeros(3, 1, 5, 5)
    labels[0, 0, 0, 0] = labels[0, 0, 1, 1] = labels[0, 0, 2, 2] = 1  # a diagonal: one 8-connected component
    labels[0, 0, 0, 4] = labels[0, 0, 1, 4] = 1  # a smaller one
    labels[1, 0, 4, 0:2] = labels[1, 0, 0, 3:5] = 1  # a tie: the first in raster order stays
    kept = largest_component(labels)
    assert kept[0, 0].nonzero().tolist() == [[0, 0], [1, 1], [2, 2]]
    assert kept[1, 0].nonzero().tolist() == [[0, 3], [0, 4]]
    assert kept[2].sum() == 0  # no foreground: nothing


def test_self_training_takes_ground_truth_in_the_labeled_parts_and_pseudo_labels_in_the_others(monkeypatch):
    inside = fixed_box(monkeypatch, slice(0, 5), slice(1, 6))
    calls = record_region_losses(monkeypatch)
    method = BCP(FirstChannel(), pretrain_iterations=0)  # teacher = student: pseudo-label = (image > 0)
    images = constant_images(1, -1, 2, -2)  # a, b, u_a, u_b: pseudo u_a 1, u_b 0
    masks = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])  # ground truth a 0, b 1: unlike the pseudo-labels
    method.before_step(0)
    parts = method(images, masks, torch.tensor(0.5))
    (out_u, gt_a, region_1), (out_l, gt_b, region_2), (out_u3, pseudo_a, region_3), (out_l4, pseudo_b, region_4) = calls
    assert (out_u[inside] == 1).all() and (out_u[~inside] == 2).all()  # the student on a pasted into u_a
    assert (out_l[inside] == -2).all() and (out_l[~inside] == -1).all()  # and on u_b pasted into b
    assert torch.equal(out_u3, out_u) and torch.equal(out_l4, out_l)
    assert (gt_a == 0).all() and torch.equal(region_1, inside)  # ground truth of a inside the box
    assert (gt_b == 1).all() and torch.equal(region_2, ~inside)  # ground truth of b outside
    assert (pseudo_a == 1).all() and torch.equal(region_3, ~inside)  # the teacher's labels of u_a outside
    assert (pseudo_b == 0).all() and torch.equal(region_4, inside)  # and of u_b inside
    assert (parts["loss_x"].item(), parts["loss_u"].item(), parts["loss"].item()) == (3, 7, 3 + 0.5 * 7)


def test_pretraining_mixes_the_labeled_halves_only(monkeypatch):
    inside = fixed_box(monkeypatch, slice(2, 7), slice(0, 5))
    calls = record_region_losses(monkeypatch)
    method = BCP(FirstChannel(), pretrain_iterations=5)
    method.teacher = None  # pre-training never asks the teacher
    masks = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    method.before_step(4)
    parts = method(constant_images(1, -1, 2, -2), masks, torch.tensor(0.0))
    (out_1, target_1, region_1), (out_2, target_2, region_2) = calls
    assert torch.equal(out_1, out_2) and (out_1[inside] == -1).all() and (out_1[~inside] == 1).all()  # b into a
    assert (target_1 == 0).all() and torch.equal(region_1, ~inside)  # a's mask outside
    assert (target_2 == 1).all() and torch.equal(region_2, inside)  # b's mask inside
    assert (parts["loss"].item(), parts["loss_x"].item(), parts["loss_u"].item()) == (3, 3, 0)


def test_bcp_loss_without_recorder_is_the_sum_of_its_regions(monkeypatch):
    inside = fixed_box(monkeypatch, slice(0, 5), slice(0, 5))
    method = BCP(FirstChannel(), pretrain_iterations=0)
    images = constant_images(1, -1, 2, -2)
    masks = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    parts = method(images, masks, torch.tensor(0.5))
    out_u, out_l = torch.where(inside, 1.0, 2.0).float(), torch.where(inside, -2.0, -1.0).float()
    loss_x = region_loss(out_u, masks[:1], inside) + region_loss(out_l, masks[1:], ~inside)
    loss_u = region_loss(out_u, torch.ones(1, 1, 8, 8), ~inside) + region_loss(out_l, torch.zeros(1, 1, 8, 8), inside)
    assert parts["loss_x"].item() == pytest.approx(loss_x.item()) and parts["loss_u"].item() == pytest.approx(loss_u.item())
    assert parts["loss"].item() == pytest.approx(loss_x.item() + 0.5 * loss_u.item())


def test_ema_averages_parameters_and_batchnorm_statistics():
    teacher, student = nn.BatchNorm2d(2), nn.BatchNorm2d(2)
    with torch.no_grad():
        teacher.weight.fill_(1.0), student.weight.fill_(0.0)
        teacher.running_mean.fill_(2.0), student.running_mean.fill_(4.0)
        student.num_batches_tracked.fill_(7)
    ema_state_update(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, torch.full((2,), 0.9))
    assert torch.allclose(teacher.running_mean, torch.full((2,), 2.2))  # 0.9 * 2 + 0.1 * 4
    assert teacher.num_batches_tracked.item() == 0  # integer buffers are not averaged


def test_phase_switch_copies_the_student_then_averages_with_the_fixed_decay():
    method = BCP(nn.Linear(1, 1, bias=False), pretrain_iterations=2)
    assert [method.consistency_weight(s) for s in range(4)] == [0.0, 0.0, 0.5, 0.5]
    student, teacher = method.student.weight, method.teacher.weight
    with torch.no_grad():
        student.fill_(1.0), teacher.fill_(0.0)
    method.before_step(1)
    method.after_step(1)  # pre-training: the teacher rests
    assert method.pretraining and teacher.item() == 0.0
    method.before_step(2)  # the first self-training step: the teacher starts as the student
    assert not method.pretraining and teacher.item() == 1.0 and not teacher.requires_grad
    with torch.no_grad():
        student.fill_(3.0)
    method.after_step(2)
    assert teacher.item() == pytest.approx(0.99 * 1 + 0.01 * 3)  # 0.99 from the first update on


def test_pretrain_share_and_build_method():
    assert pretrain_iterations(0.25, 20000) == 5000 and pretrain_iterations(0.25, 6) == 2
    method = build_method("bcp", "unet", network_args("unet", "bcp", 3, 2, 1, 3), iterations=200, pretrain_share=0.1,
                          consistency=0.3, ema_decay=0.9)
    assert isinstance(method, METHODS["bcp"]) and (method.pretrain_iterations, method.consistency) == (20, 0.3)
    assert method.ema_decay == 0.9 and method.kept_networks() is not None
    with pytest.raises(ValueError, match="even labeled batch"):
        method(torch.zeros(6, 3, 16, 16), torch.zeros(3, 1, 16, 16), torch.tensor(0.0))


def test_reproduce_has_the_bcp_arms():
    from protocol.arms import Arm, make_arms, parse_arm
    arms = [arm.name for arm in make_arms(METHODS, ["mgcc", "unet"], ["real", "synthetic"])]
    assert {"bcp-real", "bcp-synthetic", "bcp-unet-real", "bcp-unet-synthetic"} <= set(arms)
    assert parse_arm("bcp-unet-real") == Arm("bcp", "unet", "real")


@pytest.mark.slow
def test_bcp_trains_across_its_phase_switch_and_resumes_exactly(tmp_path, dataset):
    args = ["--data-dir", str(dataset), *TINY, "--iterations", "4", "--eval-every", "2", "--method", "bcp",
            "--network", "unet", "--pretrain-share", "0.5", "--seed", "4"]
    assert train.main([*args, "--out-dir", str(tmp_path / "straight")]) == 0
    for stop in ("2", "3"):  # at the phase switch, and inside self-training
        paused = tmp_path / f"paused{stop}"
        assert train.main([*args, "--out-dir", str(paused), "--stop-after", stop]) == 0
        assert train.main(["--out-dir", str(paused), "--resume", "--no-progress"]) == 0
        a = load_checkpoint(tmp_path / "straight" / "checkpoint_last.pt")
        b = load_checkpoint(paused / "checkpoint_last.pt")
        assert states_equal(a["model"], b["model"]) and states_equal(a["method_state"], b["method_state"])
    assert all(k.startswith("teacher.") for k in a["method_state"])
    teacher = {k[len("teacher."):]: v for k, v in a["method_state"].items()}
    assert not states_equal(teacher, a["model"])  # an average, not the student
    log = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["train_cons"] == 0 and log[1]["train_cons"] > 0  # pre-training, then the pseudo-labels
    summary = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert (summary["method"], summary["reference"]) == ("bcp", "BCP code/ACDC_BCP_train.py")


@pytest.mark.slow
def test_bcp_batch_must_pair_halves(tmp_path, dataset):
    result = run_script("train.py", "--data-dir", dataset, "--out-dir", tmp_path / "run", *TINY, "--iterations", "1",
                        "--method", "bcp", "--batch-size", "6", check=False)
    assert result.returncode == 2 and "twice labeled_batch_size" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_bcp_under_torchrun_and_its_checkpoint_in_predict(tmp_path, dataset):
    out = tmp_path / "run"
    flags = [*TINY, "--batch-size", "8", "--labeled-batch-size", "4", "--iterations", "2", "--method", "bcp",
             "--network", "unet", "--pretrain-share", "0.5"]
    result = torchrun("train.py", "--data-dir", dataset, "--out-dir", out, *flags, "--stop-after", "1")
    assert "x 2 |" in result.stdout and "pre-training for the first 1 iterations" in result.stdout
    torchrun("train.py", "--out-dir", out, "--resume", "--no-progress")
    checkpoint = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert checkpoint["iteration"] == 2 and len(checkpoint["rng"]) == 2
    result = run_script("predict.py", "--checkpoint", out / "checkpoint_best.pt", "--input-dir", dataset,
                        "--output-dir", tmp_path / "pred", "--num-workers", "0", "--no-overlays")
    assert "bcp on unet" in result.stdout + result.stderr
    assert len(list((tmp_path / "pred" / "masks").iterdir())) == 12
