"""Loss, schedule and metric values against cases computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.losses import bce_dice_loss, consistency_loss, soft_dice_loss, supervised_loss
from utils.schedule import consistency_weight, poly_lr_factor
from utils.metrics import MetricAverager, per_image_metrics


def test_bce_dice_loss_at_zero_logits():
    logits = torch.zeros(2, 1, 2, 2)  # sigmoid = 0.5 everywhere
    target = torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 0]]).view(2, 1, 2, 2)
    # BCE = ln 2 for every pixel; Dice per sample: (2*0.5*2 + s)/(0.5*4 + 2 + s) = (2+s)/(4+s), (0+s)/(2+s)
    s = 1e-5
    dice_loss = 1 - ((2 + s) / (4 + s) + s / (2 + s)) / 2
    assert soft_dice_loss(logits, target).item() == pytest.approx(dice_loss, rel=1e-6)
    assert bce_dice_loss(logits, target).item() == pytest.approx(0.5 * math.log(2) + dice_loss, rel=1e-6)


def test_supervised_loss_is_the_mean_over_decoders():
    target = torch.ones(1, 1, 2, 2)
    outputs = [torch.full((1, 1, 2, 2), v) for v in (0.0, 1.0, -1.0, 3.0)]
    expected = sum(bce_dice_loss(o, target).item() for o in outputs) / 4
    assert supervised_loss(outputs, target).item() == pytest.approx(expected, rel=1e-6)


def test_consistency_loss_mse_of_probabilities_with_gradients_to_both():
    main = torch.zeros(1, 1, 1, 2, requires_grad=True)  # probs 0.5
    aux = [torch.full((1, 1, 1, 2), math.log(3.0), requires_grad=True),  # probs 0.75 -> MSE 0.0625
           torch.full((1, 1, 1, 2), -math.log(3.0), requires_grad=True)]  # probs 0.25 -> MSE 0.0625
    loss = consistency_loss(main, aux)
    assert loss.item() == pytest.approx(0.0625, rel=1e-6)
    loss.backward()
    assert main.grad is not None and aux[0].grad.abs().sum() > 0  # no detach on either side


def test_consistency_weight_schedule():
    assert consistency_weight(0) == pytest.approx(7 * math.exp(-5))
    assert consistency_weight(149) == consistency_weight(0)  # t = iteration // 150
    assert consistency_weight(150 * 100) == pytest.approx(7 * math.exp(-5 * 0.25))
    assert consistency_weight(150 * 200) == pytest.approx(7.0)
    assert consistency_weight(10 ** 6) == pytest.approx(7.0)


def test_poly_learning_rate():
    assert poly_lr_factor(0, 100) == 1.0
    assert poly_lr_factor(50, 100) == pytest.approx(0.5 ** 0.9)
    assert poly_lr_factor(100, 100) == 0.0


def _metrics(pred, target):
    values = per_image_metrics(torch.tensor(pred, dtype=torch.bool)[None], torch.tensor(target, dtype=torch.bool)[None])
    return {k: float(v[0]) for k, v in values.items()}


def test_overlap_metrics_hand_case():
    pred = np.zeros((4, 4), bool)
    target = np.zeros((4, 4), bool)
    pred[0, 0:3] = True    # TP at (0,0),(0,1); FP at (0,2)
    target[0, 0:2] = True
    target[1, 0] = True    # FN at (1,0)
    m = _metrics(pred, target)  # TP 2, FP 1, FN 1, TN 12
    assert m["iou"] == pytest.approx(2 / 4)
    assert m["dice"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(14 / 16)


def test_empty_prediction_on_empty_mask_is_perfect():
    m = _metrics(np.zeros((5, 5), bool), np.zeros((5, 5), bool))
    assert m["iou"] == m["dice"] == m["f1"] == m["accuracy"] == m["nsd"] == 1.0 and m["hd95"] == m["asd"] == 0.0


def test_empty_prediction_on_a_lesion_scores_zero():
    target = np.zeros((3, 4), bool)
    target[1, 1] = True
    m = _metrics(np.zeros((3, 4), bool), target)
    assert m["iou"] == m["dice"] == m["f1"] == m["sensitivity"] == 0.0
    assert m["hd95"] == m["asd"] == pytest.approx(5.0) and m["nsd"] == 0.0  # 5: the diagonal of a 3 x 4 image


def test_averager_is_a_mean_over_images_not_pixels():
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2] = 1  # image 0: 8 lesion pixels, predicted perfectly
    target[1, 0, 0, 0] = 1  # image 1: 1 lesion pixel, missed
    logits = torch.where(target > 0, 5.0, -5.0)
    logits[1, 0, 0, 0] = -5.0
    averager = MetricAverager()
    averager.update(logits[:1], target[:1])
    averager.update(logits[1:], target[1:])
    assert averager.count == 2
    assert averager.summary()["iou"] == pytest.approx(0.5)  # (1 + 0) / 2, not 8 / 9
