"""Data resident on the device (dataloaders/device_data.py): the same images, masks, augmentation
distribution and metrics as the DataLoader path, and a training step that never reads back."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

from conftest import write_dataset
import train
from dataloaders.datasets import SegmentationDataset, resize_image, resize_mask, rot90_flip
from dataloaders.device_data import (DeviceAugmentation, DeviceBatches, DeviceImageSet, data_bytes, keep_on_device,
                                     official_draws, orientation_table)
from dataloaders.io import read_image, read_mask
from dataloaders.samplers import StreamBatchSampler
from dataloaders.splits import load_run_data
from methods import build_method
from networks.mgcc import MGCCNet
from segmenter.evaluation import evaluate
from utils.schedule import consistency_weight, poly_lr_factor
from segmenter.training import make_optimizer, make_train_step
from utils.training import LossLog

CPU = torch.device("cpu")


@pytest.fixture
def items(tmp_path):  # non-square files: the resize to a square is what the orientations must commute with
    return load_run_data(write_dataset(tmp_path / "toy", n=9, size=(40, 56), color=True), 1, labeled_fraction=1.0,
                         need_unlabeled=False).labeled  # 6 labeled items


def official_probabilities() -> np.ndarray:
    """P(orientation) of the official draw: rot90 with p 0.5 (k uniform), then a flip with p 0.5 (code uniform)."""
    _, table = orientation_table()
    p = np.zeros(8)
    for (k, code), orientation in zip(official_draws(), table):
        p_rot = 0.5 * (k == 0) + 0.5 / 4
        p_flip = 0.5 if code is None else 0.5 / 3
        p[orientation] += p_rot * p_flip
    return p


def test_the_16_official_draws_give_8_orientations_each_with_probability_one_eighth_or_more():
    variants, table = orientation_table()
    assert len(variants) == 8 and sorted(set(table)) == list(range(8))
    assert all(table.count(v) == 2 for v in range(8))  # e.g. flipping both axes = rotating by 180 degrees
    p = official_probabilities()
    assert p.sum() == pytest.approx(1)
    # identity: (no rotation or k = 0, no flip) or (k = 2, flip both): 5/8 * 1/2 + 1/8 * 1/6
    assert p[table[0]] == pytest.approx(5 / 16 + 1 / 48)


def test_stored_orientations_are_exactly_the_loader_outputs(items):
    """Each stored orientation is the loader's image and mask for that draw (rotate, flip, then resize)."""
    size = 24
    resident = DeviceImageSet(items, size, 3, "official", "binary", CPU, augment=True)
    loader_set = SegmentationDataset(items, size, 3, "official", augment=True)
    variants, table = orientation_table()
    for index, (_, image_path, mask_path) in enumerate(items[:3]):
        image, mask = read_image(image_path, 3), read_mask(mask_path)
        for draw, (k, code) in enumerate(official_draws()):
            got = resident.batch(torch.tensor([index]), torch.tensor([table[draw]]))
            expected_image = loader_set.normalization and resize_image(rot90_flip(image, k, code), size)
            expected_mask = resize_mask(rot90_flip(mask, k, code), size)
            reference = torch.from_numpy(np.ascontiguousarray(expected_image.transpose(2, 0, 1))).float()
            assert torch.equal(resident.images[index, table[draw]], reference.to(torch.uint8))
            assert torch.equal(got["mask"][0, 0], torch.from_numpy(expected_mask).float())
    # and a batch is normalised exactly as the loader normalises its items
    for seed in range(40):
        item = loader_set[(1, seed)]
        match = [v for v in range(8) if torch.equal(resident.batch(torch.tensor([1]), torch.tensor([v]))["image"][0],
                                                    item["image"])]
        assert match, seed


def test_augmentation_distribution_matches_the_loaders(items):
    """Orientation frequencies of the device draw and of the loader path both follow the official law."""
    size = 16
    resident = DeviceImageSet(items[:1], size, 3, "official", "binary", CPU, augment=True)
    loader_set = SegmentationDataset(items[:1], size, 3, "official", augment=True)
    expected = official_probabilities()
    draws = DeviceAugmentation(seed=7, device=CPU, orientation_of_draw=resident.orientation_of_draw)
    device_counts = torch.bincount(torch.cat([draws.draw(step, 8) for step in range(300)]), minlength=8).numpy()
    loader_counts = np.zeros(8)
    stored = [resident.batch(torch.tensor([0]), torch.tensor([v]))["image"][0] for v in range(8)]
    for seed in range(600):
        image = loader_set[(0, seed)]["image"]
        loader_counts[next(v for v in range(8) if torch.equal(stored[v], image))] += 1
    for counts in (device_counts, loader_counts):
        frequencies = counts / counts.sum()
        assert np.abs(frequencies - expected).max() < 0.05, (frequencies, expected)  # ~4 standard deviations
    # a pure function of (seed, step): a resumed run draws the same
    assert torch.equal(draws.draw(123, 8), DeviceAugmentation(7, CPU, resident.orientation_of_draw).draw(123, 8))
    assert not torch.equal(draws.draw(123, 8), draws.draw(124, 8))


def test_resize_does_not_commute_exactly_with_rot90_and_flips_in_opencv(items):
    """Why 8 orientations are stored instead of rotating the resized image: with OpenCV the two orders
    differ by rounding (images) and by nearest-neighbour's floor convention (mask borders)."""
    size, image_diff, mask_diff = 24, 0, 0
    for _, image_path, mask_path in items:
        image, mask = read_image(image_path, 3), read_mask(mask_path)
        for k, code in official_draws():
            first = resize_image(rot90_flip(image, k, code), size).astype(int)
            after = rot90_flip(resize_image(image, size), k, code)
            image_diff = max(image_diff, np.abs(first - after.reshape(first.shape)).max())
            mask_diff += (resize_mask(rot90_flip(mask, k, code), size) != rot90_flip(resize_mask(mask, size), k, code)).sum()
    assert image_diff <= 1 and 0 < mask_diff < 0.05 * len(items) * 16 * size * size


@pytest.mark.slow  # runs training steps for seconds to minutes: out of the fast tier
def test_device_evaluation_gives_the_loader_paths_metrics(items):
    torch.manual_seed(0)
    model = MGCCNet(in_channels=3, width=4).eval()
    resident = DeviceImageSet(items, 32, 3, "official", "binary", CPU, augment=False)
    loader = DataLoader(SegmentationDataset(items, 32, 3, "official"), batch_size=4)
    for batch, reference in zip(resident.batches(4), loader):
        assert torch.equal(batch["image"], reference["image"]) and torch.equal(batch["mask"], reference["mask"])
    on_device = evaluate(model, resident.batches(4), CPU)
    through_loader = evaluate(model, loader, CPU)
    assert on_device.keys() == through_loader.keys() and "hd95" in on_device
    for name, value in through_loader.items():
        assert on_device[name] == pytest.approx(value, abs=1e-12), name
    without_surface = evaluate(model, resident.batches(3), CPU, surface=False)
    assert set(without_surface) == set(on_device) - {"hd95", "asd", "nsd"}
    assert all(without_surface[k] == pytest.approx(on_device[k], abs=1e-12) for k in without_surface)


def test_data_on_device_is_chosen_by_size():
    # 2 labeled + 3 unlabeled training images in 8 orientations, 4 evaluated once, 3 channels, 10 x 10
    assert data_bytes(2, 3, 4, 10, 3) == 100 * (8 * 2 * 4 + 8 * 3 * 3 + 4 * 4)
    assert keep_on_device("auto", 2 ** 30, budget_gib=1) and not keep_on_device("auto", 2 ** 30 + 1, budget_gib=1)
    assert keep_on_device("on", 10 ** 15) and not keep_on_device("off", 1)


class ReadBack(TorchFunctionMode):
    """Fails on every way a tensor's value reaches the host (each of them waits for a GPU)."""
    FORBIDDEN = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.FORBIDDEN:
            raise AssertionError(f"the training step read a tensor back: {name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["mgcc", "supervised"])
def test_the_step_with_resident_data_never_reads_back(items, tmp_path, mode):
    torch.manual_seed(0)
    labeled = DeviceImageSet(items[:4], 32, 3, "official", "binary", CPU, augment=True)
    unlabeled = DeviceImageSet(items[4:], 32, 3, "official", "binary", CPU, augment=True)
    semi = mode == "mgcc"
    batches = DeviceBatches((labeled, StreamBatchSampler(4, 2, 0, 0, True)),
                            (unlabeled, StreamBatchSampler(2, 2, 0, 1, False)) if semi else None, seed=0)
    method = build_method(mode, "mgcc", {"in_channels": 3, "width": 4})
    model = method.student
    cfg = train.parse_config(train.OPTIONS, "", ["--lr", "0.01"])
    optimizer = make_optimizer(method, cfg, CPU)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: poly_lr_factor(it, 10))
    step = make_train_step(method, optimizer, None, CPU)
    consistency, losses = torch.zeros(()), LossLog(CPU, 0)
    before = [p.detach().clone() for p in model.parameters()]
    with ReadBack():
        for it in range(3):
            images, masks = batches(it)
            consistency.fill_(consistency_weight(it))
            loss, sup, cons = step(images, masks, consistency)
            scheduler.step()
            losses.add(it, loss=loss, sup=sup, cons=cons)
    assert images.shape == (4 if semi else 2, 3, 32, 32) and masks.shape == (2, 1, 32, 32)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it did train
    with pytest.raises(AssertionError, match="read a tensor back"), ReadBack():
        float(loss)  # the check itself catches a read-back


@pytest.mark.slow  # runs training steps for seconds to minutes: out of the fast tier
def test_the_whole_step_compiles_once_while_lr_and_consistency_change(monkeypatch):
    """--compile-scope step: the learning rate and the consistency weight are tensors filled in place,
    so changing them never recompiles the step (inductor's code generation is left out here: the
    "eager" backend keeps the graph capture and its guards, in seconds instead of minutes)."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    method = build_method("mgcc", "mgcc", {"in_channels": 3, "width": 4})
    cfg = train.parse_config(train.OPTIONS, "", ["--compile", "--compile-scope", "step"])
    optimizer = make_optimizer(method, cfg, CPU)
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: poly_lr_factor(it, 10))
    step = torch.compile(make_train_step(method, optimizer, None, CPU), backend="eager")
    images, masks, consistency = torch.randn(4, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float(), torch.zeros(())
    lrs = []
    for it in range(4):
        # the optimizer's first step creates its momentum buffers: one recompile of its update, then none
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", it >= 2)
        consistency.fill_(consistency_weight(it * 1000))
        step(images, masks, consistency)
        scheduler.step()
        lrs.append(float(optimizer.param_groups[0]["lr"]))
    assert lrs == pytest.approx([0.01 * poly_lr_factor(it + 1, 10) for it in range(4)])
