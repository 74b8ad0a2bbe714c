"""Synthetic labeled pairs (issue 31): the mask-conditioned generator (train_ldm.py --conditioning mask),
the pairs sample_ldm.py makes from masks, and train.py's --synthetic-pairs.

Tiny sizes on the CPU (configs/ldm_tiny.yaml, 64x64 images, a few steps); the data are the tests' own
(conftest.write_dataset).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from conftest import ROOT, write_dataset

import sample_ldm
import train_ldm
from dataloaders.io import check_pairs, find_cases, read_mask
from generation.mask_layouts import UNCHANGED, lesion_count, new_layout, pair_layouts
from dataloaders.splits import load_run_data
from generation.data import LabeledSelection, load_training_set, mask_fractions
from generation.losses import LatentDiffusionLoss
from generation.sampling import guidance_inputs
from networks.ldm import MASK_CHANNELS, build_unet, mask_channels, noise_scheduler, unet_config
from utils.config import parse_config
from generation.config import OPTIONS

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2

TINY = str(ROOT / "configs" / "ldm_tiny.yaml")


def tiny_config(*extra: str) -> SimpleNamespace:
    return parse_config(OPTIONS, "", ["--config", TINY, *extra])


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", TINY, "--data-dir", str(data), "--out-dir", str(out), "--device", "cpu",
            "--no-progress", "--no-tensorboard", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("pairs") / "toy", n=12, size=(64, 80))


@pytest.fixture(scope="module")
def conditioned_run(data: Path) -> Path:
    """A mask- and class-conditioned generator, 4 + 4 steps, on the first half of the training list."""
    run = data.parent / "conditioned"
    assert train_ldm.main(tiny_args(data, run, "--conditioning", "mask", "--vae-steps", "4",
                                    "--diffusion-steps", "4")) == 0
    return run


@pytest.fixture(scope="module")
def pairs(conditioned_run: Path, data: Path) -> Path:
    out = data.parent / "pairs"
    assert sample_ldm.main(["--checkpoint", str(conditioned_run), "--num-images", "7", "--batch-size", "3",
                            "--steps", "3", "--guidance-scale", "2", "--out-dir", str(out), "--device", "cpu",
                            "--no-progress", "--no-c2st"]) == 0
    return out


# ----------------------------------------------------------------------------------------------
# the conditioned denoiser
# ----------------------------------------------------------------------------------------------

def test_conditioned_denoiser_takes_the_mask_channels_and_predicts_the_latent():
    plain, masked = tiny_config(), tiny_config("--conditioning", "mask")
    assert plain.conditioning == "none"  # the default: existing configs and runs are unconditional by mask
    assert unet_config(plain, 2)["in_channels"] == plain.vae_latent_channels == 4
    assert unet_config(masked, 2)["in_channels"] == 4 + MASK_CHANNELS
    assert unet_config(masked, 2)["out_channels"] == 4
    unet = build_unet(masked, 2)
    latents = torch.randn(3, 4, 16, 16)
    condition = mask_channels(torch.rand(3, 1, 16, 16), torch.tensor([True, False, True]))
    out = unet(torch.cat([latents, condition], 1), torch.tensor([1, 500, 999]),
               class_labels=torch.tensor([0, 1, 2])).sample  # class conditioning composes: 2 classes + "no class"
    assert out.shape == latents.shape


def test_mask_channels_and_their_dropout():
    fractions = torch.tensor([[[[0.25, 1.0]]], [[[0.5, 0.0]]]])  # (2, 1, 1, 2)
    out = mask_channels(fractions, torch.tensor([True, False]))
    assert out.shape == (2, 2, 1, 2)
    assert out[0, 0].tolist() == [[0.25, 1.0]] and out[0, 1].tolist() == [[1.0, 1.0]]  # the mask, "known"
    assert out[1].abs().sum() == 0  # dropped: no mask and "unknown", told apart from an empty mask (0, 1)
    empty = mask_channels(torch.zeros(1, 1, 1, 2), torch.tensor([True]))
    assert empty[0, 1].tolist() == [[1.0, 1.0]]
    # guidance: the conditional inputs, then the unconditional ones (no class, no mask)
    labels, condition = guidance_inputs(torch.tensor([1, 0]), 2, fractions, guided=True)
    assert labels.tolist() == [1, 0, 2, 2]
    assert torch.equal(condition[:2], mask_channels(fractions, torch.tensor([True, True])))
    assert condition[2:].abs().sum() == 0


def test_mask_at_the_latent_size_is_each_cells_lesion_fraction():
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:4] = True  # the top-left 4x4 cell: 8 of 16 pixels; the top-right cell: none
    mask[4:8, 4:8] = True  # the bottom-right cell: all
    assert mask_fractions(mask, 8, 2).tolist() == [[0.5, 0.0], [0.0, 1.0]]
    # a mask of another size is first brought to the image size (nearest), as the image is
    assert mask_fractions(np.kron(mask, np.ones((2, 2), bool)), 8, 2).tolist() == [[0.5, 0.0], [0.0, 1.0]]


class Recorder(torch.nn.Module):
    """A denoiser that records its input and predicts zeros."""

    def forward(self, x, t, class_labels=None):
        self.seen, self.labels = x, class_labels
        return SimpleNamespace(sample=torch.zeros(x.shape[0], 4, *x.shape[2:]))


@pytest.mark.parametrize("dropout, known", [(0.0, 1.0), (0.999999, 0.0)])
def test_training_loss_feeds_the_masks_and_drops_them(dropout: float, known: float):
    cfg = tiny_config("--conditioning", "mask", "--mask-dropout", str(dropout))
    n, h = 3, 16
    masks = torch.rand(n, 2, 1, h, h)
    loss = LatentDiffusionLoss(noise_scheduler(cfg), torch.randn(n, 2, 4, h, h), torch.ones(n, 2, 4, h, h),
                               None, 1.0, cfg, 0, masks_of=masks)
    denoiser = Recorder()
    loss(denoiser, [(2, True), (0, False)], torch.Generator().manual_seed(0))
    assert denoiser.seen.shape == (2, 4 + MASK_CHANNELS, h, h)
    extra = denoiser.seen[:, 4:]
    assert torch.equal(extra[:, 1], torch.full((2, h, h), known))
    if known:  # each item's own mask, mirrored where its image is
        assert torch.equal(extra[0, 0], masks[2, 1, 0]) and torch.equal(extra[1, 0], masks[0, 0, 0])
    else:
        assert extra[:, 0].abs().sum() == 0


def test_unconditional_loss_draws_the_numbers_it_drew_before():
    """A model without masks: the same noisy input as the loss without the masks_of argument gives."""
    cfg = tiny_config()
    means, stds = torch.randn(3, 2, 4, 16, 16), torch.ones(3, 2, 4, 16, 16)
    seen = []
    for kwargs in ({}, {"masks_of": None}):
        denoiser = Recorder()
        LatentDiffusionLoss(noise_scheduler(cfg), means, stds, None, 1.0, cfg, 0, **kwargs)(
            denoiser, [(0, False), (1, True)], torch.Generator().manual_seed(5))
        seen.append(denoiser.seen)
    assert seen[0].shape[1] == 4 and torch.equal(*seen)


def test_generator_learns_from_the_pairs_train_py_labels(data: Path):
    """The labeled images of train.py (load_run_data) are the mask-conditioned generator's pairs, by fraction
    or by list; the autoencoder keeps every training image."""
    for selection, run_kwargs in ((LabeledSelection(0.5), {"labeled_fraction": 0.5}),
                                  (LabeledSelection(0.3), {"labeled_fraction": 0.3})):
        generator = load_training_set(data, 1, labeled=selection)
        segmenter = load_run_data(data, 1, need_unlabeled=False, **run_kwargs)
        assert generator.mask_ids == [i for i, _, _ in segmenter.labeled]
        assert len(generator.ids) == 8 and [generator.ids[k] for k in generator.mask_index] == generator.mask_ids
        assert [p.name for p in generator.mask_paths] == [f"{i}.png" for i in generator.mask_ids]
    listed = data.parent / "labeled.txt"
    listed.write_text("malignant (4)\nbenign (1)\n")
    generator = load_training_set(data, 1, labeled=LabeledSelection(labeled_list=listed))
    assert generator.mask_ids == ["malignant (4)", "benign (1)"]
    assert load_training_set(data, 1).mask_ids == []  # unconditional: no masks read


# ----------------------------------------------------------------------------------------------
# train_ldm.py --conditioning mask: a run, its record, resume
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_conditioned_run_records_its_pairs_and_resumes_exactly(data: Path, tmp_path: Path, capsys):
    from safetensors.torch import load_file

    short = ("--conditioning", "mask", "--labeled-fraction", "0.5", "--vae-steps", "2", "--checkpoint-every", "2",
             "--sample-every", "2", "--log-every", "1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_ldm.main(tiny_args(data, straight, *short, "--diffusion-steps", "4")) == 0
    info = json.loads((straight / "ldm.json").read_text())
    assert info["conditioning"] == "mask" and info["mask_values"] == "binary"
    assert info["mask_ids"] == ["benign (1)", "malignant (2)", "benign (3)", "malignant (4)"]
    assert len(info["train_ids"]) == 8  # the autoencoder's; the leak checks read these
    config = json.loads((straight / "unet_ema" / "config.json").read_text())
    assert config["in_channels"] == 4 + MASK_CHANNELS
    assert (straight / "previews" / "diffusion_step0000004.png").is_file()
    assert train_ldm.main(tiny_args(data, resumed, *short, "--diffusion-steps", "2")) == 0
    assert train_ldm.main(tiny_args(data, resumed, *short, "--diffusion-steps", "4", "--resume")) == 0
    for folder in ("unet", "unet_ema"):
        a = load_file(straight / folder / "diffusion_pytorch_model.safetensors")
        b = load_file(resumed / folder / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), folder
    capsys.readouterr()
    # another labeled set is another run
    with pytest.raises(Exception, match="labeled_fraction"):
        train_ldm.main(tiny_args(data, resumed, *short[:2], "--labeled-fraction", "0.25", "--vae-steps", "2",
                                 "--diffusion-steps", "6", "--resume"))


# ----------------------------------------------------------------------------------------------
# sample_ldm.py: pairs from masks
# ----------------------------------------------------------------------------------------------

def two_lesions() -> np.ndarray:
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 10:22] = 1
    mask[40:52, 36:50] = 1
    return mask


@pytest.mark.parametrize("kind", ["affine", "elastic", "both"])
def test_new_layouts_move_the_mask_and_keep_its_lesions(kind: str):
    mask = two_lesions()
    moved = [new_layout(mask, kind, np.random.default_rng(seed)) for seed in range(6)]
    assert all(applied == kind and lesion_count(m) == 2 for m, applied in moved)
    assert all(set(np.unique(m)) <= {0, 1} and m.shape == mask.shape for m, _ in moved)
    assert sum(not np.array_equal(m, mask) for m, _ in moved) == 6  # every draw is a new layout
    again, _ = new_layout(mask, kind, np.random.default_rng(3))
    assert np.array_equal(again, moved[3][0])  # a pair's layout is a function of its seed


def test_a_layout_that_cannot_keep_its_lesion_count_stays_as_it_is():
    mask = np.zeros((64, 64), np.uint8)
    mask[::2, ::2] = 1  # 1024 one-pixel lesions: every move merges or loses some of them
    for kind in ("affine", "elastic", "both"):
        result, applied = new_layout(mask, kind, np.random.default_rng(0))
        assert applied == UNCHANGED and np.array_equal(result, mask)


def test_pairs_take_each_mask_as_it_is_first_then_new_layouts():
    sources = [two_lesions(), np.roll(two_lesions(), 5, axis=0)]
    layouts = pair_layouts(sources, 5, "affine", lambda n: np.random.default_rng(n))
    assert [(source, applied) for _, source, applied in layouts] == [(0, "none"), (1, "none"), (0, "affine"),
                                                                      (1, "affine"), (0, "affine")]
    assert layouts[0][0] is sources[0] and not np.array_equal(layouts[2][0], sources[0])
    same = pair_layouts(sources, 5, "none", lambda n: np.random.default_rng(n))
    assert all(np.array_equal(m, sources[n % 2]) for n, (m, _, _) in enumerate(same))


@pytest.mark.slow
def test_pairs_are_a_dataset_whose_manifest_ties_each_pair_to_generator_and_mask(pairs: Path, conditioned_run: Path,
                                                                                 data: Path):
    import csv

    cases = find_cases(pairs)  # the dataset layout: images/ and masks/0/, one mask per image
    assert sorted(cases) == [f"synth_{n:04d}" for n in range(7)]
    check_pairs([(i, *paths) for i, paths in cases.items()], mask_values="binary")
    assert not list(pairs.glob("*_train*.txt")) and not list(pairs.glob("*_val*.txt"))  # split-free
    with (pairs / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    info = json.loads((conditioned_run / "ldm.json").read_text())
    assert all(r["checkpoint"] == str(conditioned_run.resolve()) for r in rows)
    assert [r["mask_source"] for r in rows] == [info["mask_ids"][n % 4] for n in range(7)]
    assert [r["mask_augmentation"] for r in rows] == ["none"] * 4 + ["both"] * 3
    assert [r["class"] for r in rows] == [info["class_names"][info["mask_labels"][n % 4]] for n in range(7)]
    for n, row in enumerate(rows):
        assert row["mask"] == f"masks/0/synth_{n:04d}.png" and row["guidance"] == "2.0"
        written = read_mask(pairs / row["mask"])
        source = cv2.resize(read_mask(data / "masks" / "0" / f"{row['mask_source']}.png").astype(np.uint8),
                            (64, 64), interpolation=cv2.INTER_NEAREST).astype(bool)
        if n < 4:
            assert np.array_equal(written, source)  # the labeled masks as they are
        else:
            assert lesion_count(written) == lesion_count(source) and not np.array_equal(written, source)
    report = json.loads((pairs / "report.json").read_text())
    assert report["pairs"] and report["settings"]["mask_augmentation"] == "both"


# ----------------------------------------------------------------------------------------------
# mask fidelity: the conditioned generator puts lesions where its masks say
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_mask_conditioned_generator_puts_lesions_where_its_masks_say(tmp_path: Path):
    """The mask fidelity of reproduce.py's report, measured the same way on phantom data (dataloaders/phantom.py,
    60 images at 48x48, split.py's split 1: 42 training ids, 21 labeled). Two denoisers on one autoencoder, all
    at 32x32: one mask-conditioned on the 21 labeled pairs, one unconditional. A segmenter trained by train.py on
    the same 21 real labeled images segments, with predict.py --masks-dir, the conditioned generator's 42 pairs
    (the 21 masks as they are, then 21 new layouts) against their masks, and the unconditional generator's 42
    samples against the same masks; its own val IoU on real images stands beside them.
    Calibration (this test's settings, seeds 0-3, 2-core CPU, 2026-12-03): pairs 0.42-0.54 (new layouts
    0.36-0.52), unconditional 0.10-0.12, segmenter on real val 0.65-0.69; about 2.5 minutes."""
    import csv
    import shutil

    import predict
    import split
    import train
    from dataloaders.phantom import make_phantom_dataset

    data = tmp_path / "phantom"
    make_phantom_dataset(data, num_images=60, size=(48, 48), preview_count=0)
    assert split.main(["--data-dir", str(data)]) == 0
    common = ["--config", TINY, "--data-dir", str(data), "--image-size", "32", "--device", "cpu", "--no-progress",
              "--no-tensorboard", "--preview-images", "0", "--no-class-conditioning", "--vae-steps", "300"]
    unconditional, conditioned = tmp_path / "unconditional", tmp_path / "conditioned"
    assert train_ldm.main([*common, "--out-dir", str(unconditional), "--stage", "vae"]) == 0
    shutil.copytree(unconditional, conditioned)  # the same autoencoder under both denoisers
    denoiser = ["--stage", "diffusion", "--overwrite", "--diffusion-steps", "1000", "--unet-channels", "16", "32",
                "--batch-size", "16", "--sample-every", "0", "--checkpoint-every", "1000", "--log-every", "1000"]
    assert train_ldm.main([*common, "--out-dir", str(unconditional), *denoiser]) == 0
    assert train_ldm.main([*common, "--out-dir", str(conditioned), *denoiser, "--conditioning", "mask",
                           "--labeled-fraction", "0.5"]) == 0
    sampling = ["--num-images", "42", "--steps", "25", "--device", "cpu", "--no-progress", "--no-c2st",
                "--no-check-memorisation"]
    pairs, samples = tmp_path / "pairs", tmp_path / "samples"
    assert sample_ldm.main(["--checkpoint", str(conditioned), "--out-dir", str(pairs), "--guidance-scale", "2",
                            *sampling]) == 0
    assert sample_ldm.main(["--checkpoint", str(unconditional), "--out-dir", str(samples), *sampling]) == 0

    segmenter = tmp_path / "segmenter"  # as the protocol's supervised arm: the real labeled images alone
    assert train.main(["--config", str(ROOT / "configs" / "demo.yaml"), "--data-dir", str(data), "--out-dir",
                       str(segmenter), "--image-size", "32", "--labeled-fraction", "0.5", "--method", "supervised",
                       "--schedule-scale", "1", "--iterations", "300", "--eval-every", "50", "--num-workers", "0",
                       "--no-progress", "--no-tensorboard"]) == 0
    for images in (pairs, samples):  # protocol/plan.py FIDELITY: both scored against the pairs' masks
        assert predict.main(["--checkpoint", str(segmenter / "checkpoint_best.pt"), "--input-dir", str(images),
                             "--masks-dir", str(pairs / "masks" / "0"), "--no-overlays", "--device", "cpu",
                             "--no-progress", "--output-dir", str(tmp_path / f"{images.name}_fidelity")]) == 0

    pairs_iou, samples_iou = (json.loads((tmp_path / f"{name}_fidelity" / "metrics.json").read_text())["iou"]
                              for name in ("pairs", "samples"))
    with (pairs / "manifest.csv").open(newline="") as f:
        moved = {Path(row["file"]).stem for row in csv.DictReader(f) if row["mask_augmentation"] != "none"}
    with (tmp_path / "pairs_fidelity" / "metrics.csv").open(newline="") as f:
        new_layouts = [float(row["iou"]) for row in csv.DictReader(f) if row["id"] in moved]
    real = json.loads((segmenter / "metrics.json").read_text())["val"]["iou"]
    figures = (f"pairs {pairs_iou:.3f} (new layouts {np.mean(new_layouts):.3f}), unconditional {samples_iou:.3f}, "
               f"real val {real:.3f}")
    print(figures)  # shown by pytest -rP
    assert len(new_layouts) == 21 and real > 0.55, figures  # the segmenter finds real lesions
    assert pairs_iou > 0.35 and np.mean(new_layouts) > 0.28, figures  # the pairs follow their masks
    assert samples_iou < 0.2 and pairs_iou - samples_iou > 0.2, figures  # samples do not


# ----------------------------------------------------------------------------------------------
# train.py --synthetic-pairs: the pairs as extra labeled data
# ----------------------------------------------------------------------------------------------

TRAIN = ["--width", "4", "--image-size", "32", "--batch-size", "4", "--labeled-batch-size", "2",
         "--eval-every", "3", "--eval-batch-size", "4", "--num-workers", "0", "--no-progress", "--no-tensorboard"]


def full_mask_pairs(folder: Path, n: int = 3) -> Path:
    """Pairs whose masks are all foreground (the real toy masks never are): a batch's synthetic part shows."""
    write_dataset(folder, n=n, splits=False, seed=11)
    for mask in (folder / "masks" / "0").iterdir():
        cv2.imwrite(str(mask), np.full((64, 80), 255, np.uint8))
    return folder


@pytest.mark.parametrize("on_device", ["on", "off"])
def test_labeled_batch_is_real_images_then_the_share_of_pairs(data: Path, tmp_path: Path, on_device: str):
    from dataloaders.training_batches import TrainingBatches, labeled_parts

    assert labeled_parts(4, 0.5) == (2, 2) and labeled_parts(4, 0.25) == (3, 1) and labeled_parts(4, None) == (4, 0)
    synth = full_mask_pairs(tmp_path / "synth")
    run_data = load_run_data(data, 1, 0.5, synthetic_pairs=synth)
    assert [i for i, _, _ in run_data.synthetic] == ["synth/benign (1)", "synth/benign (3)", "synth/malignant (2)"]
    cfg = SimpleNamespace(image_size=32, in_channels=3, normalization="official", mask_values="binary",
                          num_workers=0, seed=0, labeled_batch_size=4, eval_batch_size=4, data_on_device=on_device,
                          progress=False, synthetic_pairs_share=0.25)
    ctx = SimpleNamespace(rank=0, world_size=1, is_main=True)
    batches = TrainingBatches(cfg, run_data, torch.device("cpu"), ctx, 0, unlabeled_batch_size=2)
    for step in range(4):
        images, masks = batches.batch(step)
        assert images.shape == (6, 3, 32, 32) and masks.shape == (4, 1, 32, 32)
        assert [bool(m.all()) for m in masks] == [False, False, False, True]  # 3 real, then 1 synthetic


@pytest.mark.slow
@pytest.mark.parametrize("method", ["supervised", "mgcc"])
def test_pairs_round_trip_through_train_py(pairs: Path, data: Path, tmp_path: Path, method: str):
    import train

    out = tmp_path / method
    assert train.main(["--data-dir", str(data), "--out-dir", str(out), *TRAIN, "--method", method, "--iterations",
                       "3", "--synthetic-pairs", str(pairs), "--synthetic-pairs-share", "0.5"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["synthetic_pairs"] == str(pairs.resolve()) and summary["synthetic_pairs_count"] == 7
    assert summary["synthetic_pairs_share"] == 0.5 and 0 <= summary["val"]["iou"] <= 1


@pytest.mark.slow
def test_pairs_of_a_generator_that_saw_evaluated_ids_are_refused(pairs: Path, data: Path, tmp_path: Path, capsys):
    import shutil
    import train
    from utils.cli import run_cli

    def refused(split: str, folder: Path, *expected: str) -> None:
        with pytest.raises(SystemExit) as exit_:
            run_cli(lambda: train.main(["--data-dir", str(data), "--split", split, "--out-dir", str(tmp_path / "r"),
                                        *TRAIN, "--mode", "supervised", "--iterations", "2",
                                        "--synthetic-pairs", str(folder)]))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and all(e in err for e in expected), err

    # split 2 evaluates ids the generator (split 1's training list) learned from
    train1 = (data / "toy_train1.txt").read_text().splitlines()
    val1 = (data / "toy_val1.txt").read_text().splitlines()
    (data / "toy_train2.txt").write_text("\n".join(val1 + train1[4:]) + "\n")
    val2 = "\n".join(train1[:4])
    (data / "toy_val2.txt").write_text(val2 + "\n")
    refused("2", pairs, "synthetic pairs folder", "generated by", "val ids")
    # a pair that copies an evaluated image, whatever its manifest says
    copy = tmp_path / "copied"
    shutil.copytree(pairs, copy)
    image = cv2.imread(str(data / "images" / f"{val1[0]}.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(copy / "images" / "synth_0000.png"), cv2.resize(image, (64, 64)))
    refused("1", copy, "synthetic pairs folder", "cop")
    # a share that leaves no synthetic image in a labeled batch of 2
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: train.main(["--data-dir", str(data), "--out-dir", str(tmp_path / "s"), *TRAIN, "--mode",
                                    "supervised", "--iterations", "2", "--synthetic-pairs", str(pairs),
                                    "--synthetic-pairs-share", "0.1"]))
    assert exit_.value.code == 2 and "synthetic_pairs_share 0.1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# reproduce.py: arms with the pairs
# ----------------------------------------------------------------------------------------------

def test_pairs_arms_are_named_planned_and_fed_by_a_mask_conditioned_generator(tmp_path: Path):
    import reproduce
    from protocol.arms import Arm, parse_arm
    from protocol.estimate import GENERATOR_OF
    from protocol.plan import stage_kind

    assert parse_arm("supervised-pairs") == Arm("supervised", pairs=True)
    assert parse_arm("mgcc-real-pairs") == Arm("mgcc", "mgcc", "real", True)
    assert parse_arm("cct-unet-synthetic-pairs").name == "cct-unet-synthetic-pairs"
    with pytest.raises(Exception, match="-pairs"):
        parse_arm("supervised-real-pairs")
    data = write_dataset(tmp_path / "toy", n=15, size=(40, 48))
    args = reproduce.parse_args(["--data-dir", str(data), "--out-dir", str(tmp_path / "out"), "--preset", "demo",
                                 "--arms", "mgcc-real-pairs", "supervised", "mgcc-real", "supervised-pairs",
                                 "mgcc-synthetic", "--labeled-fraction", "0.5", "--holdout", "0.2",
                                 "--mask-values", "nonzero"])
    args.nproc_per_node = 1
    assert args.arms == ["supervised", "supervised-pairs", "mgcc-real", "mgcc-real-pairs", "mgcc-synthetic"]
    stages = {s.name: s for s in reproduce.plan(args, "toy", [1], "cpu")}
    ldm, pairs = stages["split1/ldm-pairs"], stages["split1/pairs"]
    out = tmp_path.resolve() / "out" / "split1"
    assert "--conditioning mask --labeled-fraction 0.5" in " ".join(ldm.command)
    assert "--holdout 0.2" in " ".join(ldm.command)  # as the arms: the generator never sees the holdout ids
    assert "--mask-values nonzero" in " ".join(ldm.command)  # it reads the masks as the arms do
    assert "--conditioning" not in stages["split1/ldm"].command  # the unlabeled images' generator is as it was
    assert pairs.command[:3] == ["sample_ldm.py", "--checkpoint", str(out / "ldm-pairs")]
    assert pairs.depends == ["split1/ldm-pairs"]
    for arm in ("supervised-pairs", "mgcc-real-pairs"):
        command = " ".join(stages[f"split1/{arm}"].command)
        assert f"--synthetic-pairs {out / 'pairs'}" in command and "split1/pairs" in stages[f"split1/{arm}"].depends
    for arm in ("supervised", "mgcc-real", "mgcc-synthetic"):
        assert "--synthetic-pairs" not in stages[f"split1/{arm}"].command
    for images in ("pairs", "samples"):  # the mask fidelity: the supervised arm's segmenter on both, same masks
        fidelity = stages[f"split1/{images}/predict"]
        command = " ".join(fidelity.command)
        assert f"--checkpoint {out / 'supervised' / 'checkpoint_best.pt'}" in command
        assert f"--input-dir {out / images} --masks-dir {out / 'pairs' / 'masks' / '0'}" in command
        assert set(fidelity.depends) == {"split1/supervised", "split1/pairs", f"split1/{images}"}
    assert {stage_kind(n) for n in stages} >= {"ldm-pairs", "pairs"} and {"ldm-pairs", "pairs"} <= set(GENERATOR_OF)
    # the estimate of a fidelity stage: start-up + the pairs' forward passes at the supervised arm's rates
    from protocol.estimate import predict_seconds

    class Rates:
        def train(self, cfg):
            assert cfg.mode == "supervised" and cfg.synthetic_pairs is None
            return {"startup": 3.0, "image": 0.01}

    listed = list(stages.values())
    assert predict_seconds(stages["split1/pairs/predict"], listed, Rates()) == pytest.approx(3.0 + args.num_samples * 0.01)
    with pytest.raises(Exception, match="needs the generator"):
        reproduce.parse_args(["--data-dir", str(data), "--out-dir", str(tmp_path / "o2"), "--preset", "demo",
                              "--arms", "supervised-pairs", "--no-generator"])


@pytest.mark.slow
def test_reproduce_runs_the_pairs_arms_end_to_end(tmp_path: Path):
    import csv
    from conftest import run_script

    data = write_dataset(tmp_path / "toy", n=15, size=(40, 48))
    out = tmp_path / "out"
    run_script("reproduce.py", "--data-dir", data, "--out-dir", out, "--preset", "demo", "--arms", "supervised",
               "supervised-pairs", "mgcc-real-pairs", "--labeled-fraction", "0.5", "--holdout", "0.2",
               "--ldm-config", "configs/ldm_tiny.yaml", "--num-samples", "6",
               "--ldm-args", "--vae-steps 2 --diffusion-steps 2 --image-size 32",
               "--sample-args", "--steps 3 --no-c2st",
               "--train-args", "--iterations 2 --eval-every 2 --width 4 --image-size 32 --num-workers 0 "
               "--schedule-scale 1", "--device", "cpu", "--no-progress", "--no-estimate")
    generator = json.loads((out / "split1" / "ldm-pairs" / "ldm.json").read_text())
    train_ids = [line for line in (data / "toy_train1.txt").read_text().splitlines() if line]
    assert generator["mask_ids"] == train_ids[:4]  # the arms' labeled images: half of the 8 outside the holdout
    assert len(list((out / "split1" / "pairs" / "masks" / "0").iterdir())) == 6
    run = json.loads((out / "split1" / "mgcc-real-pairs" / "metrics.json").read_text())
    assert run["synthetic_pairs_count"] == 6 and run["selection_set"] == "holdout"
    with (out / "results.csv").open(newline="") as f:
        assert [r["arm"] for r in csv.DictReader(f)] == ["supervised", "supervised-pairs", "mgcc-real-pairs"]
    # the mask fidelity: the supervised segmenter on the pairs and on the unconditional samples, same masks
    pairs_iou = json.loads((out / "split1" / "pairs_fidelity" / "metrics.json").read_text())
    samples_iou = json.loads((out / "split1" / "samples_fidelity" / "metrics.json").read_text())
    assert pairs_iou["images"] == samples_iou["images"] == 6
    assert str(out / "split1" / "supervised" / "checkpoint_best.pt") in pairs_iou["checkpoint"]
    text = (out / "results.md").read_text()
    assert "mask fidelity: IoU on the pairs" in text and f"{pairs_iou['iou']:.4f}" in text
    assert f"{samples_iou['iou']:.4f}" in text


# ----------------------------------------------------------------------------------------------
# torchrun, and ldm.json's record
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_learn_and_sample_the_pairs_one_process_does(data: Path, tmp_path: Path, monkeypatch):
    import csv
    from conftest import run_script
    from test_distributed import torchrun

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ("--config", TINY, "--data-dir", str(data), "--image-size", "32", "--vae-steps", "2", "--diffusion-steps",
            "2", "--log-every", "1", "--sample-every", "0", "--preview-images", "2", "--conditioning", "mask",
            "--device", "cpu", "--no-progress", "--no-tensorboard")
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_script("train_ldm.py", "--out-dir", single, *args)
    torchrun("train_ldm.py", "--out-dir", ddp, *args)
    rows = []
    for run in (single, ddp):
        with (run / "losses_diffusion.csv").open(newline="") as f:
            rows.append([float(r["loss"]) for r in csv.DictReader(f)])
    assert len(rows[0]) == 2 and rows[0] == pytest.approx(rows[1], rel=1e-4)  # each rank its own masks' slice
    sampled = []
    for name, launch in (("one", run_script), ("two", torchrun)):
        out = tmp_path / f"pairs_{name}"
        launch("sample_ldm.py", "--checkpoint", str(single), "--num-images", "6", "--batch-size", "2", "--steps", "2",
               "--guidance-scale", "1.5", "--out-dir", str(out), "--device", "cpu", "--no-progress", "--no-c2st")
        sampled.append(out)
    for sub in ("images", "masks/0"):
        names = sorted(p.name for p in (sampled[0] / sub).iterdir())
        assert len(names) == 6 and names == sorted(p.name for p in (sampled[1] / sub).iterdir())
        assert all((sampled[0] / sub / n).read_bytes() == (sampled[1] / sub / n).read_bytes() for n in names), sub
    assert (sampled[0] / "manifest.csv").read_text() == (sampled[1] / "manifest.csv").read_text()


@pytest.mark.slow
def test_ldm_json_conditioning_must_match_the_saved_denoiser(conditioned_run: Path, tmp_path: Path):
    """A run folder whose ldm.json predates the record (no "conditioning": unconditional by mask) or was edited
    cannot load a mask-conditioned denoiser: the input channels are checked, one clear error."""
    from generation.run import load_sampling_models, run_conditioning
    from utils.checkpoint import CheckpointError

    info = json.loads((conditioned_run / "ldm.json").read_text())
    _, unet, _ = load_sampling_models(conditioned_run, info)
    assert unet.config.in_channels == info["latent_channels"] + MASK_CHANNELS
    old = {k: v for k, v in info.items() if k not in ("conditioning", "mask_ids", "mask_labels", "mask_values")}
    assert run_conditioning(old) == "none"
    with pytest.raises(CheckpointError, match="denoiser input channels 6"):
        load_sampling_models(conditioned_run, old)
