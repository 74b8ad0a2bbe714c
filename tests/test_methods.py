"""The comparison methods (methods/): each loss on a case computed by hand, on tiny tensors.

The networks here are toys whose output is a constant logit per decoder (a learnable bias), so the
losses do not depend on the images, the augmentations or the perturbations: each value below is
the reference's formula worked out by hand for that logit.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dataloaders.datasets import normalize
from methods import METHODS, build_method, network_args
from methods.augment import Intensity, StrongAugmentation, cutmix_boxes
from methods.cct import CrossConsistency
from methods.cps import CrossPseudoSupervision
from methods.fixmatch import FixMatch
from methods.losses import hard_label_and_confidence, reference_supervised_loss, two_class_dice_loss
from methods.mean_teacher import MeanTeacher, ema_update
from methods.unimatch import UniMatch
from networks import count_parameters
from networks.mgcc import MGCCNet
from networks.unet import UNet

S = 1e-5  # the references' Dice smoothing
SIZE = 8


class ConstantDecoder(nn.Module):
    def __init__(self, logit: float):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(float(logit)))

    def forward(self, features):
        return features[-1] * 0 + self.bias


class ToyNet(nn.Module):
    """The methods' network interface (features, main_decoder, aux_decoders) with constant outputs."""

    def __init__(self, logit: float, aux_logits=()):
        super().__init__()
        self.main_decoder = ConstantDecoder(logit)
        self.aux_decoders = nn.ModuleList(ConstantDecoder(a) for a in aux_logits)

    def features(self, x):
        return [x[:, :1] * 0]

    def forward(self, x):
        return self.main_decoder(self.features(x))


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def dice2_constant(p: float, target: float) -> float:
    """The 2-class Dice loss of a constant probability p against a constant 0/1 target, P pixels."""
    pixels = 2 * SIZE * SIZE  # the labeled (or unlabeled) half of a batch of 4
    losses = []
    for score, truth in ((1 - p, 1 - target), (p, target)):
        losses.append(1 - (2 * score * truth * pixels + S) / ((score ** 2 + truth ** 2) * pixels + S))
    return sum(losses) / 2


def batch(labeled: int = 2, unlabeled: int = 2, target: float = 1.0):
    images = torch.rand(labeled + unlabeled, 3, SIZE, SIZE) * 0.02
    return images, torch.full((labeled, 1, SIZE, SIZE), target)


def bce(p: float, target: float) -> float:
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_two_class_dice_by_hand():
    probs = torch.tensor([1.0, 0.5]).view(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    # foreground: 2*1 / (1.25 + 1); background (scores 0, 0.5; truth 0, 1): 2*0.5 / (0.25 + 1)
    expected = (1 - (2 + S) / (2.25 + S) + 1 - (1 + S) / (1.25 + S)) / 2
    assert two_class_dice_loss(probs, target).item() == pytest.approx(expected, rel=1e-6)
    # ignoring the wrong pixel leaves a perfect prediction; ignoring all leaves smooth / smooth
    ignore = torch.tensor([False, True]).view(1, 1, 1, 2)
    assert two_class_dice_loss(probs, target, ignore).item() == pytest.approx(0.0, abs=1e-6)
    assert two_class_dice_loss(probs, target, torch.ones_like(ignore)).item() == pytest.approx(0.0, abs=1e-6)


def test_reference_supervised_loss_at_zero_logits():
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([1.0, 1, 0, 0]).view(1, 1, 2, 2)
    # BCE ln 2; each class: intersect 2 * 0.5, squared sums 4 * 0.25 + 2
    expected = 0.5 * (math.log(2) + 1 - (2 + S) / (3 + S))
    assert reference_supervised_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_hard_label_is_argmax_and_confidence_the_max_probability():
    label, confidence = hard_label_and_confidence(torch.tensor([0.0, 2.0, -2.0]))
    assert label.tolist() == [0.0, 1.0, 0.0]  # a tie goes to class 0, as argmax
    sigma2 = 1 / (1 + math.exp(-2))
    assert confidence.tolist() == pytest.approx([0.5, sigma2, sigma2])


def test_ema_update_is_the_true_average_then_the_decay():
    teacher, student = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    nn.init.zeros_(teacher.weight), nn.init.ones_(student.weight)
    ema_update(teacher, student, 0.99, step=0)  # alpha = min(1 - 1/1, 0.99) = 0: a copy
    assert teacher.weight.item() == 1.0
    nn.init.zeros_(teacher.weight)
    ema_update(teacher, student, 0.99, step=9)  # alpha = 0.9
    assert teacher.weight.item() == pytest.approx(0.1)
    nn.init.zeros_(teacher.weight)
    ema_update(teacher, student, 0.99, step=10 ** 4)  # alpha = 0.99
    assert teacher.weight.item() == pytest.approx(0.01)


def test_mean_teacher_loss_and_schedule_by_hand():
    method = MeanTeacher(ToyNet(logit(0.5)), Intensity(3, "official"))
    method.teacher.main_decoder.bias.data.fill_(logit(0.75))
    images, masks = batch()
    parts = method(images, masks, torch.tensor(0.1))
    loss_x = 0.5 * (math.log(2) + dice2_constant(0.5, 1.0))
    assert parts["loss_x"].item() == pytest.approx(loss_x, rel=1e-5)
    assert parts["loss_u"].item() == pytest.approx(0.0625, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(loss_x + 0.1 * 0.0625, rel=1e-5)
    parts["loss"].backward()
    assert method.teacher.main_decoder.bias.grad is None  # the teacher learns by EMA only
    assert method.consistency_weight(999) == 0.0  # SSL4MIS: no consistency in the first 1000 iterations
    assert method.consistency_weight(1000) == pytest.approx(0.1 * math.exp(-5 * (1 - 6 / 200) ** 2))


def test_mean_teacher_noise_is_clipped_in_image_intensity_units():
    intensity = Intensity(3, "official")
    method = MeanTeacher(ToyNet(0.0), intensity)
    images = intensity.from_unit(torch.full((4, 3, 32, 32), 0.5))
    noise = intensity.to_unit(method.noised(images)) - 0.5
    assert noise.abs().max().item() == pytest.approx(0.2, abs=1e-5)  # reaches the clip, never beyond
    assert 0.08 < noise.std().item() < 0.1  # N(0, 0.1^2) clipped at 2 sigma


def test_cct_loss_by_hand():
    method = CrossConsistency(ToyNet(logit(0.5), (logit(0.75), logit(0.25), logit(0.5))))
    images, masks = batch()
    parts = method(images, masks, torch.tensor(0.1))
    loss_x = np.mean([0.5 * (bce(p, 1) + dice2_constant(p, 1)) for p in (0.5, 0.75, 0.25, 0.5)])
    assert parts["loss_x"].item() == pytest.approx(loss_x, rel=1e-5)
    assert parts["loss_u"].item() == pytest.approx((0.0625 + 0.0625 + 0) / 3, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(loss_x + 0.1 * 0.0625 * 2 / 3, rel=1e-5)


def test_cps_loss_by_hand():
    method = CrossPseudoSupervision(ToyNet(logit(0.75)), ToyNet(logit(0.25)))
    images, masks = batch()
    parts = method(images, masks, torch.tensor(0.1))
    loss_x1, loss_x2 = (0.5 * (bce(p, 1) + dice2_constant(p, 1)) for p in (0.75, 0.25))
    # network 1 (p 0.75) learns the label 0 of network 2 (p 0.25), and the reverse: both -ln 0.25
    assert parts["loss_cps1"].item() == pytest.approx(math.log(4), rel=1e-5)
    assert parts["loss_cps2"].item() == pytest.approx(math.log(4), rel=1e-5)
    assert parts["loss"].item() == pytest.approx(loss_x1 + loss_x2 + 0.1 * 2 * math.log(4), rel=1e-5)
    assert parts["loss_x"].item() == pytest.approx(loss_x1 + loss_x2, rel=1e-5)
    parts["loss"].backward()
    assert method.second.main_decoder.bias.grad is not None


@pytest.mark.parametrize("p, kept", [(0.96, True), (0.9, False)])
def test_fixmatch_loss_by_hand(p, kept):
    method = FixMatch(ToyNet(logit(p)), Intensity(3, "official"))
    images, masks = batch()
    parts = method(images, masks, torch.tensor(1.0))
    loss_x = 0.5 * (bce(p, 1) + dice2_constant(p, 1))
    # pseudo-label 1 everywhere; confidence p: kept above 0.95, else every pixel ignored (loss 0)
    loss_u_s = dice2_constant(p, 1) if kept else 0.0
    assert parts["loss_u_s"].item() == pytest.approx(loss_u_s, rel=1e-5, abs=1e-6)
    assert parts["mask_ratio"].item() == float(kept)
    assert parts["loss"].item() == pytest.approx((loss_x + loss_u_s) / 2, rel=1e-5)


def test_unimatch_loss_by_hand():
    p = 0.96
    method = UniMatch(ToyNet(logit(p)), Intensity(3, "official"))
    images, masks = batch()
    parts = method(images, masks, torch.tensor(1.0))
    loss_x = 0.5 * (bce(p, 1) + dice2_constant(p, 1))
    d = dice2_constant(p, 1)
    for name in ("loss_u_s1", "loss_u_s2", "loss_u_w_fp"):
        assert parts[name].item() == pytest.approx(d, rel=1e-5)
    assert parts["loss_u"].item() == pytest.approx(0.25 * d + 0.25 * d + 0.5 * d, rel=1e-5)
    assert parts["loss"].item() == pytest.approx((loss_x + 0.25 * d + 0.25 * d + 0.5 * d) / 2, rel=1e-5)


def test_mix_targets_come_from_eval_mode_and_restore_training():
    net = UNet(width=2)
    method = FixMatch(net, Intensity(3, "official"))
    method.train()
    weak = torch.randn(3, 3, 16, 16) * 0.02
    label, confidence = method.mix_targets(weak)
    assert net.training
    net.eval()
    with torch.no_grad():
        expected, _ = hard_label_and_confidence(net(weak))
    assert torch.equal(label, expected.roll(1, dims=0))  # each image's partner: the next one of the batch


def test_cutmix_boxes_are_rectangles_of_the_reference_sizes():
    torch.manual_seed(0)
    assert not cutmix_boxes(16, 32, torch.device("cpu"), p=0.0).any()
    size = 64
    boxes = cutmix_boxes(4000, size, torch.device("cpu"), p=1.0)[:, 0]
    areas = boxes.flatten(1).sum(1).float() / size ** 2
    for box in boxes[:50]:  # the True pixels form one axis-aligned rectangle
        rows, cols = box.any(1).nonzero()[:, 0], box.any(0).nonzero()[:, 0]
        assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert box.sum() == len(rows) * len(cols)
    assert areas.min() > 0.01 and areas.max() <= 0.4  # area ~ U(0.02, 0.4), floored to whole pixels
    assert 0.18 < areas.mean().item() < 0.21  # the mean of U(0.02, 0.4) is 0.21, less the flooring
    half = cutmix_boxes(4000, 16, torch.device("cpu"), p=0.5)
    assert 0.45 < half.flatten(1).any(1).float().mean().item() < 0.55


def test_intensity_maps_uint8_inputs_to_unit_and_back():
    image = np.array([[0, 128, 255]], np.uint8)[..., None].repeat(3, axis=2)  # 1 x 3 pixels, 3 channels
    for mode in ("official", "unit"):
        x = torch.from_numpy(normalize(image, mode))[None]
        intensity = Intensity(3, mode)
        unit = intensity.to_unit(x)
        assert unit[0, :, 0].flatten().tolist() == pytest.approx([0, 128 / 255, 1] * 3, abs=1e-6)
        assert torch.allclose(intensity.from_unit(unit), x, atol=1e-7)


def test_strong_augmentation_jitters_brightness_and_contrast_within_the_reference_ranges():
    torch.manual_seed(0)
    intensity = Intensity(3, "official")
    strong = StrongAugmentation(intensity, jitter_p=1.0)
    images = intensity.from_unit(torch.full((64, 3, 16, 16), 0.5))
    unit = intensity.to_unit(strong(images))
    # a flat image stays flat (contrast blends with its mean, blur averages), brightness x U(0.5, 1.5)
    assert torch.allclose(unit, unit.mean((1, 2, 3), keepdim=True).expand_as(unit), atol=1e-5)
    levels = unit[:, 0, 0, 0]
    assert levels.min() >= 0.25 - 1e-5 and levels.max() <= 0.75 + 1e-5
    assert levels.std() > 0.05  # drawn per image


def test_unet_is_mgcc_without_the_convmixer_stages():
    mgcc, unet = MGCCNet(width=4), UNet(width=4)
    mixers = sum(p.numel() for p in mgcc.mixers.parameters())
    aux = sum(p.numel() for p in mgcc.aux_decoders.parameters())
    assert count_parameters(unet) == count_parameters(mgcc) - mixers - aux
    assert set(unet.state_dict()) <= set(mgcc.state_dict())  # the same blocks under the same names
    x = torch.randn(2, 3, 32, 32)
    assert unet(x).shape == (2, 1, 32, 32)
    assert [f.shape[1] for f in unet.features(x)] == [4, 8, 16, 32, 64]
    mgcc.eval()
    assert torch.equal(mgcc.main_decoder(mgcc.features(x)), mgcc(x))  # features(): the main decoder's input


@pytest.mark.parametrize("network", ["unet", "mgcc"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_steps_on_both_networks(name, network):
    if name == "mgcc" and network == "unet":
        with pytest.raises(ValueError, match="--network mgcc"):
            build_method(name, network, network_args(network, name, 3, 2, 1, 3))
        return
    torch.manual_seed(0)
    method = build_method(name, network, network_args(network, name, 3, 2, 1, 3))
    # bcp's passes take half the labeled and half the unlabeled images: BatchNorm at the 1 x 1 bottleneck needs two
    images, masks = batch(*(4, 4) if name == "bcp" else (2, 2 if method.uses_unlabeled else 0))
    images = images.repeat(1, 1, 2, 2)  # 16 px: four poolings
    masks = masks.repeat(1, 1, 2, 2)
    parts = method(images, masks, torch.tensor(method.consistency_weight(10 ** 5)))
    assert list(parts)[:3] == ["loss", "loss_x", "loss_u"] and torch.isfinite(parts["loss"])
    parts["loss"].backward()
    trained = [p for p in method.parameters() if p.requires_grad]
    unused = [p for p in trained if p.grad is None]
    assert bool(unused) == method.leaves_parameters_unused()
    method.after_step(0)
