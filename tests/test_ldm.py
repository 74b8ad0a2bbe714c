"""Stage 1: the latent diffusion model (train_ldm.py, sample_ldm.py) on small images the tests make.

Every script run uses configs/ldm_tiny.yaml on the CPU; one trained run is shared by the module.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import ROOT, run_script, write_dataset

import sample_ldm
import train_ldm
from dataloaders.io import DataError, check_images, read_id_list, unlabeled_images
from generation.data import StepBatchSampler, TrainingImages, class_labels, load_training_set, thumbnails
from networks.ldm import build_unet, build_vae, count_parameters, parameter_counts
from generation.image_quality import nearest_training_images, ssim, typical_training_distance
from utils.checkpoint import atomic_save
from utils.cli import run_cli
from utils.config import parse_config

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2

TINY = str(ROOT / "configs" / "ldm_tiny.yaml")
BUSI = str(ROOT / "configs" / "ldm_busi.yaml")
MEDFUSION = str(ROOT / "configs" / "ldm_medfusion.yaml")
SHORT = ("--vae-steps", "4", "--diffusion-steps", "4", "--sample-every", "2", "--checkpoint-every", "2",
         "--log-every", "1", "--disc-weight", "0.1", "--disc-start", "1", "--num-workers", "2",
         "--unet-dropout", "0.1")  # dropout draws from the global generator: resume must restore it


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", TINY, "--data-dir", str(data), "--out-dir", str(out), "--device", "cpu", *extra]


def exit_status(main, args: list[str]) -> int:
    """The exit status of a script's ``main`` run as its command line runs it (utils.cli.run_cli)."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main(args))
    return exit_.value.code


def read_manifest(folder: Path) -> list[dict]:
    with (folder / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def load_png(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ldm") / "toy", n=12, size=(64, 80))


@pytest.fixture(scope="module")
def trained_run(data: Path) -> Path:
    """Both stages, 4 steps each, with the discriminator and two loader workers."""
    run = data.parent / "run"
    run_script("train_ldm.py", *tiny_args(data, run, *SHORT))
    return run


# ----------------------------------------------------------------------------------------------
# pieces, against hand-computed cases
# ----------------------------------------------------------------------------------------------

def test_ssim_matches_hand_computed_values_and_has_gradients():
    a, b = torch.full((1, 1, 16, 16), 0.5), torch.full((1, 1, 16, 16), -0.25)
    c1 = (0.01 * 2) ** 2  # constant images: the contrast-structure term is c2 / c2 = 1
    expected = (2 * 0.5 * -0.25 + c1) / (0.5 ** 2 + 0.25 ** 2 + c1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-5)

    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    value = ssim(y, x, reduction="none")
    assert value.shape == (2,) and (value < 0.9).all()
    value.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_step_sampler_covers_each_epoch_and_restarts_at_any_step():
    full = list(StepBatchSampler(5, 3, seed=7, start_step=0, end_step=10))
    stream = [i for batch in full for i, _ in batch]
    for epoch in range(6):  # 30 positions = 6 epochs of 5 images, each a permutation
        assert sorted(stream[5 * epoch: 5 * epoch + 5]) == list(range(5))
    assert list(StepBatchSampler(5, 3, seed=7, start_step=4, end_step=10)) == full[4:]
    flips = [f for batch in full for _, f in batch]
    assert any(flips) and not all(flips)
    assert list(StepBatchSampler(5, 3, seed=8, start_step=0, end_step=10)) != full


def test_training_images_are_gray_resized_scaled_and_only_mirrored_left_right(data: Path):
    path = sorted((data / "images").glob("*.png"))[0]
    images = TrainingImages([path], [1], size=32)
    image, label = images[(0, False)]
    gray = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (32, 32), interpolation=cv2.INTER_AREA)
    assert image.shape == (1, 32, 32) and label == 1
    assert torch.allclose(image[0], torch.from_numpy(gray).float() / 127.5 - 1)  # 0 -> -1, 255 -> 1
    mirrored, _ = images[(0, True)]
    assert torch.equal(mirrored, image.flip(-1))  # left-right only: depth runs downwards


def test_memorisation_distances_expose_copies_and_mirror_copies(data: Path):
    training = thumbnails(sorted((data / "images").glob("*.png")))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    samples = np.stack([training[3], training[5][:, ::-1], noise])
    distance, nearest = nearest_training_images(samples, training)
    assert distance[0] == pytest.approx(0, abs=1e-6) and nearest[0] == 3
    assert distance[1] == pytest.approx(0, abs=1e-6) and nearest[1] == 5
    typical = typical_training_distance(training)
    assert 0.5 < typical < distance[2]  # noise is farther than real images are from each other
    # normalised L2 = sqrt(2 (1 - correlation)): a (mirror-symmetric) ramp and its negative are at
    # distance 2, whatever their brightness and contrast
    ramp = np.repeat(np.arange(0, 256, 4, dtype=np.uint8)[:, None], 64, axis=1)[None]
    inverted, _ = nearest_training_images(255 - ramp // 2, ramp)
    assert inverted[0] == pytest.approx(2.0, abs=1e-6)


def test_training_set_is_the_training_list_and_refuses_validation_ids(tmp_path: Path):
    root = write_dataset(tmp_path / "toy", n=9)
    training = load_training_set(root, 1, ["benign", "malignant"])
    assert training.ids == read_id_list(root / "toy_train1.txt")
    assert not set(training.ids) & set(read_id_list(root / "toy_val1.txt"))
    assert [p.stem for p in training.paths] == training.ids
    assert training.labels == [0 if i.startswith("benign") else 1 for i in training.ids]

    with (root / "toy_train1.txt").open("a") as f:
        f.write("malignant (8)\n")  # a validation id
    with pytest.raises(DataError, match=r"(?s)toy_train1.txt shares ids with the validation list.*malignant \(8\)"):
        load_training_set(root, 1)


def test_classes_from_id_prefix_or_csv(tmp_path: Path):
    ids = ["benign (1)", "Malignant (2)", "benign-x (3)"]
    assert class_labels(ids, [], None) == ([], None)
    assert class_labels(ids, ["benign", "malignant", "benign-x"], None)[1] == [0, 1, 2]  # longest prefix wins
    with pytest.raises(DataError, match=r"(?s)start with none of the classes.*Malignant \(2\)"):
        class_labels(ids, ["benign", "normal"], None)
    table = tmp_path / "classes.csv"
    table.write_text("id,class\nbenign (1),b\nMalignant (2),m\nbenign-x (3),b\n")
    assert class_labels(ids, [], table) == (["b", "m"], [0, 1, 0])
    table.write_text("benign (1),b\n")
    with pytest.raises(DataError, match=r"(?s)no class for training ids.*Malignant \(2\)"):
        class_labels(ids, [], table)


def test_networks_of_the_configs():
    # the figures docs/generation.md gives; both GPU configs make the reference system's 8x32x32 latents
    for config, counts, dropout in ((BUSI, {"vae": 13_491_337, "unet": 34_177_288}, 0.1),
                                    (MEDFUSION, {"vae": 53_807_017, "unet": 236_538_376}, 0.0)):
        cfg = parse_config(train_ldm.OPTIONS, "", ["--config", config])
        assert parameter_counts(cfg, 2) == counts, config
        with torch.device("meta"):
            vae, unet = build_vae(cfg), build_unet(cfg, 2)
            latents = vae.encode(torch.empty(2, 1, 256, 256)).latent_dist.mean
            assert latents.shape == (2, 8, 32, 32)  # 256^2 -> 32^2 x 8, as the reference system
            out = unet(latents, torch.zeros(2, dtype=torch.long), class_labels=torch.tensor([0, 2])).sample
            assert out.shape == latents.shape
        rates = {m.p for m in unet.modules() if isinstance(m, torch.nn.Dropout)}
        assert rates == {dropout}, config  # --unet-dropout reaches every resnet of the denoiser
    tiny = parse_config(train_ldm.OPTIONS, "", ["--config", TINY])
    assert parameter_counts(tiny, 2) == {"vae": count_parameters(build_vae(tiny)),
                                         "unet": count_parameters(build_unet(tiny, 2))}
    assert sum(parameter_counts(tiny, 2).values()) < 100_000


# ----------------------------------------------------------------------------------------------
# the scripts, end to end
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_training_writes_a_complete_run_from_training_images_only(trained_run: Path, data: Path):
    import json
    info = json.loads((trained_run / "ldm.json").read_text())
    assert info["kind"] == "mgcc-ldm" and info["vae_step"] == 4 and info["diffusion_step"] == 4
    assert info["train_ids"] == read_id_list(data / "toy_train1.txt")
    assert info["class_names"] == ["benign", "malignant"] and info["latent_size"] == 16
    assert info["latent_scaling_factor"] > 0
    assert json.loads((trained_run / "unet" / "config.json").read_text())["dropout"] == 0.1  # --unet-dropout
    for name in ("config.yaml", "vae/config.json", "unet/config.json", "unet_ema/config.json",
                 "scheduler/scheduler_config.json", "state_vae.pt", "state_diffusion.pt",
                 "losses_vae.png", "losses_diffusion.png", "previews/vae_step0000004.png",
                 "previews/diffusion_step0000002.png"):
        assert (trained_run / name).is_file(), name
    with (trained_run / "losses_vae.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert rows[0]["discriminator"] == "" and float(rows[-1]["discriminator"]) > 0  # from disc_start 1


@pytest.mark.slow
def test_validation_images_never_reach_the_generator(tmp_path: Path, monkeypatch, capsys):
    """Every image the training process opens to train is a training image (an unconditional run,
    sampled too); the validation images are opened only to measure the trained autoencoder."""
    import json

    import generation.data as generation_data

    root = write_dataset(tmp_path / "toy", n=9)
    opened, measured = [], []
    real_read, real_evaluate = generation_data.read_image, train_ldm.evaluate_vae
    monkeypatch.setattr(generation_data, "read_image", lambda path, channels: opened.append(Path(path).stem)
                        or real_read(path, channels))

    def evaluate_vae(*args, **kwargs):
        before = len(opened)
        metrics = real_evaluate(*args, **kwargs)
        measured.extend(opened[before:])
        del opened[before:]
        return metrics

    monkeypatch.setattr(train_ldm, "evaluate_vae", evaluate_vae)
    run = tmp_path / "run"
    assert train_ldm.main(tiny_args(root, run, "--vae-steps", "3", "--diffusion-steps", "2", "--num-workers", "0",
                                    "--sample-every", "0", "--no-class-conditioning")) == 0
    train_ids, val_ids = set(read_id_list(root / "toy_train1.txt")), read_id_list(root / "toy_val1.txt")
    assert set(opened) == train_ids  # every training image was used, and nothing else
    assert not set(opened) & set(val_ids)
    assert measured == val_ids  # after training, each validation image once
    metrics = json.loads((run / "vae_metrics.json").read_text())
    assert metrics["images"] == 3 and metrics["image_size"] == 64 and metrics["vae_step"] == 3
    assert 0 < metrics["psnr"] < 100 and -1 < metrics["ssim"] < 1

    out = tmp_path / "synth"
    assert sample_ldm.main(["--checkpoint", str(run), "--num-images", "2", "--steps", "2", "--out-dir", str(out),
                            "--device", "cpu"]) == 0
    assert [r["class"] for r in read_manifest(out)] == ["none", "none"]
    # the C2ST reads the training images, the memorisation check also the val images: its reference of how
    # near a real image the generator never saw comes to a training image
    assert set(opened) == train_ids | set(val_ids)
    capsys.readouterr()
    for bad in (["--class", "benign"], ["--guidance-scale", "2"]):
        assert exit_status(sample_ldm.main, ["--checkpoint", str(run), "--out-dir", str(tmp_path / "x"), *bad]) == 2
        assert "unconditional" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_gives_the_weights_of_an_uninterrupted_run(trained_run: Path, data: Path):
    """The fixture ran 4 + 4 steps straight; here 2 + 2 steps of each stage with a restart between
    (in this process: the state must come from the run folder alone, not from the process)."""
    from safetensors.torch import load_file

    run = data.parent / "resumed"
    same = ("--disc-weight", "0.1", "--disc-start", "1", "--num-workers", "2", "--unet-dropout", "0.1")
    for extra in (("--stage", "vae", "--vae-steps", "2"),
                  ("--stage", "vae", "--vae-steps", "4", "--resume"),
                  # the diffusion stage of a run whose autoencoder is trained needs no --resume
                  ("--stage", "diffusion", "--vae-steps", "4", "--diffusion-steps", "2"),
                  ("--stage", "diffusion", "--vae-steps", "4", "--diffusion-steps", "4", "--resume")):
        assert train_ldm.main(tiny_args(data, run, *same, *extra)) == 0, extra
    for folder in ("vae", "unet", "unet_ema"):
        straight = load_file(trained_run / folder / "diffusion_pytorch_model.safetensors")
        resumed = load_file(run / folder / "diffusion_pytorch_model.safetensors")
        assert straight.keys() == resumed.keys()
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), folder
    a = torch.load(trained_run / "state_vae.pt", weights_only=True)
    b = torch.load(run / "state_vae.pt", weights_only=True)
    assert all(torch.equal(a["disc"][k], b["disc"][k]) for k in a["disc"])
    c = torch.load(run / "state_diffusion.pt", weights_only=True)
    assert c["step"] == 4 and c["ema"]["optimization_step"] == 4


@pytest.mark.slow
def test_sampled_folder_is_train_py_unlabeled_data(trained_run: Path, data: Path, tmp_path: Path, capsys):
    import json
    out = tmp_path / "synth"
    result = run_script("sample_ldm.py", "--checkpoint", trained_run, "--num-images", "5", "--batch-size", "1",
                        "--steps", "4", "--out-dir", out, "--device", "cpu")
    paths = unlabeled_images(out)  # what train.py --unlabeled-dir reads
    check_images(paths)
    assert [p.name for p in paths] == [f"synth_{n:04d}.png" for n in range(5)]
    images = [load_png(p) for p in paths]
    assert all(im.dtype == np.uint8 and im.shape == (64, 64) for im in images)  # gray 8-bit, training size
    rows = read_manifest(out)
    assert [r["file"] for r in rows] == [f"images/{p.name}" for p in paths]
    assert [int(r["seed"]) for r in rows] == [0] * 5
    assert all(r["checkpoint"] == str(trained_run.resolve()) for r in rows)
    train_ids = read_id_list(data / "toy_train1.txt")
    assert all(r["nearest_train_id"] in train_ids and 0 <= float(r["nearest_distance"]) <= 2 for r in rows)
    assert all(r["class"] in ("benign", "malignant") and r["scheduler"] == "ddim" and r["steps"] == "4"
               for r in rows)
    assert "memorisation:" in (out / "memorisation.txt").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == 5 and report["checkpoint"] == str(trained_run.resolve())
    assert report["settings"]["seed"] == 0 and report["settings"]["steps"] == 4
    for q in ("q01", "q05"):  # 4 val images: the threshold is the nearest one's distance, 1/5 expected
        assert report[f"memorisation_{q}"] == sum(float(r["nearest_distance"]) < report[
            f"memorisation_threshold_{q}"] for r in rows) / 5
        assert report[f"memorisation_expected_{q}"] == pytest.approx(1 / 5)
    assert report["memorisation_val_images"] == 4 and 0 <= report["fraction_closer_than_median_train_nn"] <= 1
    assert len(report["memorisation_quantiles"]["val"]) == len(report["memorisation_quantiles"]["levels"])
    assert load_png(out / "closest_pairs.png").shape[1] >= 5 * 64  # five samples (all there are) over their matches

    # --report-only: the figures again for any folder of images; copies of training images score 1
    copies = tmp_path / "copies"
    copies.mkdir()
    for case_id in train_ids[:6]:
        shutil.copy(data / "images" / f"{case_id}.png", copies / f"{case_id}.png")
    control = run_script("sample_ldm.py", "--report-only", "--checkpoint", trained_run, "--out-dir", copies,
                         "--no-c2st")
    assert "1.000 of the 6 samples" in control.stdout
    copied = json.loads((copies / "report.json").read_text())
    assert copied["num_images"] == 6 and copied["report_only"] and copied["memorisation_q01"] == 1.0
    assert not (copies / "manifest.csv").exists()  # no claim that the generator made them
    run_script("sample_ldm.py", "--report-only", "--checkpoint", trained_run, "--out-dir", copies, "--no-c2st")
    assert json.loads((copies / "report.json").read_text())["num_images"] == 6  # its own pictures are not images
    # on sample_ldm.py's own folder it gives the figures sampling gave
    run_script("sample_ldm.py", "--report-only", "--checkpoint", trained_run, "--out-dir", out, "--no-c2st")
    again = json.loads((out / "report.json").read_text())
    assert again["memorisation_q05"] == report["memorisation_q05"] and again["settings"] == report["settings"]
    assert 0 <= report["c2st_accuracy"] <= 1 and report["c2st"]["images_per_set"] == 5  # 5 samples, 8 training
    assert "memorisation: " in result.stdout and "C2ST accuracy" in result.stdout
    grid = load_png(out / "grid.png")  # the 5 images in one row of 8 columns
    assert grid.ndim == 2 and 64 <= grid.shape[0] < 128 and grid.shape[1] >= 5 * 64

    # image n comes from (seed, n) alone: the same image in batches of 4 as one at a time, up to one gray
    # level where the CPU's convolution kernels for another batch shape round differently
    again = tmp_path / "again"
    assert sample_ldm.main(["--checkpoint", str(trained_run), "--num-images", "4", "--batch-size", "4", "--steps",
                            "4", "--out-dir", str(again), "--device", "cpu", "--no-check-memorisation",
                            "--no-c2st"]) == 0
    for n in range(4):
        batched = load_png(again / "images" / f"synth_{n:04d}.png").astype(int)
        assert np.abs(batched - images[n]).max() <= 1 and np.mean(batched != images[n]) < 0.01, n
        assert np.abs(batched - images[(n + 1) % 4]).max() > 1  # each image its own noise
    assert [r["class"] for r in read_manifest(again)] == [r["class"] for r in rows[:4]]
    assert json.loads((again / "report.json").read_text())["c2st_accuracy"] is None
    # ... and another seed shares none of them (with seed + n, seed 4 would start with seed 0's image 4)
    other = tmp_path / "seed4"
    assert sample_ldm.main(["--checkpoint", str(trained_run), "--num-images", "5", "--seed", "4", "--steps", "4",
                            "--out-dir", str(other), "--device", "cpu", "--no-check-memorisation", "--no-c2st"]) == 0
    assert not any(np.array_equal(load_png(path), image) for path in unlabeled_images(other) for image in images)

    # an existing folder is replaced only with --overwrite
    capsys.readouterr()
    assert exit_status(sample_ldm.main, ["--checkpoint", str(trained_run), "--out-dir", str(again), "--device", "cpu"]) == 2
    assert "already holds files; give --overwrite" in capsys.readouterr().err
    assert sample_ldm.main(["--checkpoint", str(trained_run), "--out-dir", str(again), "--device", "cpu",
                            "--num-images", "2", "--steps", "2", "--overwrite"]) == 0
    assert len(unlabeled_images(again)) == 2 and len(read_manifest(again)) == 2


@pytest.mark.slow
def test_conditional_model_samples_the_asked_class(trained_run: Path, tmp_path: Path):
    made = {}
    for name, extra in (("malignant", ()), ("benign", ("--scheduler", "dpmsolver", "--guidance-scale", "3"))):
        out = tmp_path / name
        assert sample_ldm.main(["--checkpoint", str(trained_run), "--num-images", "3", "--class", name, "--steps",
                                "4", "--out-dir", str(out), "--device", "cpu", "--no-check-memorisation", *extra]) == 0
        rows = read_manifest(out)
        assert [r["class"] for r in rows] == [name] * 3
        made[name] = np.stack([load_png(out / r["file"]) for r in rows])
    assert read_manifest(tmp_path / "benign")[0]["scheduler"] == "dpmsolver"
    assert not np.array_equal(made["malignant"], made["benign"])  # the class reaches the denoiser


# ----------------------------------------------------------------------------------------------
# bad input: one clear error, exit status 2, nothing half-written
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_training_errors(tmp_path: Path, data: Path, trained_run: Path, capsys):
    def fails(args: list[str], *expected: str, status: int = 2) -> None:
        assert exit_status(train_ldm.main, args) == status
        err = capsys.readouterr().err
        assert "error: " in err and "Traceback" not in err and all(e in err for e in expected), err

    fails(tiny_args(tmp_path / "nowhere", tmp_path / "r1"), "data folder not found", "nowhere")
    assert not (tmp_path / "r1").exists()
    empty = write_dataset(tmp_path / "empty", n=6)
    (empty / "empty_train1.txt").write_text("\n")
    fails(tiny_args(empty, tmp_path / "r2"), "split file is empty", "empty_train1.txt")
    fails(tiny_args(data, tmp_path / "r3", "--class-names", "benign", "--class-names", "normal"),
          "start with none of the classes", "malignant (2)")
    fails(tiny_args(data, trained_run), "already holds a run", "--resume", "--overwrite")
    fails(tiny_args(data, trained_run, "--resume", "--lr", "0.5"), "lr: 0.001 in the run, 0.5 now")
    fails(tiny_args(data, tmp_path / "r4", "--stage", "diffusion"), "needs a run folder with a trained autoencoder")
    fails(tiny_args(data, tmp_path / "r5", "--vae-channels", "6", "--vae-channels", "8"),
          "vae_channels", "vae_norm_groups")
    assert not any((tmp_path / f"r{k}").exists() for k in (2, 3, 4, 5))
    fails(tiny_args(data, tmp_path / "r6", "--vae-steps", "3", "--vae-lr", "1e30", "--log-every", "1"),
          "non-finite autoencoder loss at step", "no checkpoint was written", status=3)  # diverged, not bad input
    assert not (tmp_path / "r6" / "state_vae.pt").exists() and not (tmp_path / "r6" / "vae").exists()


@pytest.mark.slow
def test_sampling_errors(tmp_path: Path, trained_run: Path, capsys):
    def fails(args: list[str], *expected: str) -> None:
        assert exit_status(sample_ldm.main, [*args, "--out-dir", str(tmp_path / "out"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "error: " in err and "Traceback" not in err and all(e in err for e in expected), err

    segmenter = tmp_path / "checkpoint_best.pt"
    atomic_save({"kind": "mgcc-segmenter", "model": {}}, segmenter)
    fails(["--checkpoint", str(segmenter)], "'mgcc-segmenter' checkpoint file", "run folder written by train_ldm.py")
    (tmp_path / "not_a_run").mkdir()
    fails(["--checkpoint", str(tmp_path / "not_a_run")], "not a train_ldm.py run folder (no ldm.json)")
    fails(["--checkpoint", str(tmp_path / "missing")], "checkpoint not found")
    fails(["--checkpoint", str(trained_run), "--class", "normal"], "'normal' unknown", "benign, malignant")
    fails(["--checkpoint", str(trained_run), "--steps", "5000"], "exceeds the 1000 timesteps")
    assert not (tmp_path / "out").exists()


def test_classes_of_a_config_apply_only_to_ids_that_carry_them(capsys):
    """Issue 34: a config's class names (every shipped one names BUSI's) and ids that start with none of
    them: an unconditional model, said in one note line; BUSI's ids keep their two classes; names the user
    gave (--class-names) or ids of which only some match stay an error."""
    thyroid = ["1", "2", "10"]
    assert class_labels(thyroid, ["benign", "malignant"], None, names_given=False) == ([], None)
    assert capsys.readouterr().err.count("note: unconditional generator") == 1
    busi = ["benign (1)", "malignant (2)"]
    assert class_labels(busi, ["benign", "malignant"], None, names_given=False) == (["benign", "malignant"], [0, 1])
    with pytest.raises(DataError, match="start with none of the classes"):
        class_labels(thyroid, ["benign", "malignant"], None, names_given=True)
    with pytest.raises(DataError, match=r"(?s)start with none of the classes.*--no-class-conditioning.*\b1\b"):
        class_labels(["benign (1)", "1"], ["benign", "malignant"], None, names_given=False)
