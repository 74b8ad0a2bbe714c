"""Smoke tests of the benchmark scripts at their smallest on CPU: they run, and every JSON row holds
coherent figures. Speed itself is never asserted."""
from __future__ import annotations

import pytest

import csv
import importlib.util
import json
import math
from pathlib import Path

import torch

from conftest import ROOT, run_script, write_dataset

KEYS = ("variant", "it_per_s", "ms_per_step", "peak_mem_gib", "tflops")
EAGER_VARIANTS = ["fp32 eager", "bf16 + channels_last"]  # both eager variants (the CPU default: fp32 eager alone)


def json_rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def check_row(row: dict) -> None:
    for key in KEYS:
        assert key in row, f"{key} missing from {row}"
    for key in ("it_per_s", "ms_per_step", "tflops"):
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row)
    # peak memory is a CUDA measurement: on CPU the row says "not measured" (NaN), never a made-up 0
    assert isinstance(row["peak_mem_gib"], float) and math.isnan(row["peak_mem_gib"]), row


@pytest.mark.slow
def test_bench_train_json_rows():
    result = run_script("benchmarks/bench_train.py", "--device", "cpu", "--width", "4", "--image-size", "32",
                        "--steps", "1", "--warmup", "0", "--variants", *EAGER_VARIANTS, "--json")
    rows = json_rows(result.stdout)
    assert [r["variant"] for r in rows] == EAGER_VARIANTS
    for row in rows:
        check_row(row)
        assert math.isclose(row["it_per_s"] * row["ms_per_step"], 1000, rel_tol=1e-6)
    assert rows[0]["tflop_per_step"] == rows[1]["tflop_per_step"]  # the same math in both variants


@pytest.mark.slow
def test_bench_train_loop_times_train_py(tmp_path):
    data = write_dataset(tmp_path / "toy", n=12)
    result = run_script("benchmarks/bench_train.py", "--loop", "--data-dir", data, "--device", "cpu", "--width", "4",
                        "--image-size", "32", "--batch-size", "4", "--labeled-batch-size", "2", "--eval-every", "1",
                        "--warmup", "1", "--steps", "2", "--train-args", "--num-workers 0 --eval-batch-size 8", "--json")
    rows = json_rows(result.stdout)
    assert [r["variant"] for r in rows] == ["fp32 eager"]  # the CPU default
    row = rows[0]
    assert math.isfinite(row["it_per_s"]) and row["it_per_s"] > 0 and math.isnan(row["peak_mem_gib"])
    assert math.isclose(row["it_per_s"] * row["ms_per_step"], 1000, rel_tol=1e-6)
    assert math.isclose(row["ratio_to_official"], row["it_per_s"] / 3.55, rel_tol=1e-9)
    assert "done: val IoU" in result.stderr  # train.py itself ran, its messages kept out of the JSON
    bad = run_script("benchmarks/bench_train.py", "--loop", "--data-dir", data, "--eval-every", "2", "--steps", "3",
                     check=False)
    assert bad.returncode == 2 and "must be multiples of --eval-every (2)" in bad.stderr


@pytest.mark.slow
def test_bench_ldm_json_rows():
    common = ("--device", "cpu", "--config", "configs/ldm_tiny.yaml", "--image-size", "32", "--batch-size", "2",
              "--sampling-batch-size", "3", "--ddim-steps", "2", "--dpmsolver-steps", "2", "--json")
    result = run_script("benchmarks/bench_ldm.py", *common, "--steps", "1", "--warmup", "0", "--no-progress",
                        "--variants", *EAGER_VARIANTS)
    rows = json_rows(result.stdout)
    benchmarks = ["autoencoder training", "denoiser training", "sampling DDIM 2", "sampling DPM-Solver++ 2"]
    assert [(r["benchmark"], r["variant"]) for r in rows] == [(b, v) for b in benchmarks for v in EAGER_VARIANTS]
    for row in rows:
        check_row(row)
        assert row["image_size"] == 32
        sampling = row["benchmark"].startswith("sampling")
        assert row["unit"] == ("images/s" if sampling else "it/s")
        assert row["batch_size"] == (3 if sampling else 2)
        # training: iterations/s = 1000 / ms per step; sampling: images/s = batch * 1000 / ms per batch
        assert math.isclose(row["it_per_s"] * row["ms_per_step"], 1000 * (3 if sampling else 1), rel_tol=1e-6)
    flops = {}
    for row in rows:
        flops.setdefault(row["benchmark"], set()).add(row["tflop_per_step"])
    assert all(len(per_variant) == 1 for per_variant in flops.values()), flops  # same math, same FLOPs
    # DDIM and DPM-Solver++ at 2 steps run the denoiser equally often: the same FLOPs per batch
    assert flops["sampling DDIM 2"] == flops["sampling DPM-Solver++ 2"]
    assert flops["denoiser training"] != flops["autoencoder training"]

    # --what schedule counts on the meta device exactly what the timed steps ran
    schedule = json_rows(run_script("benchmarks/bench_ldm.py", *common, "--what", "schedule").stdout)
    each = {r["part"]: r["tflop_per_step"] for r in schedule}
    assert each["autoencoder training"] == flops["autoencoder training"].pop()
    assert each["denoiser training"] == flops["denoiser training"].pop()
    assert math.isclose(3 * each["sampling DDIM 2"], flops["sampling DDIM 2"].pop(), rel_tol=1e-12)  # batch 3


@pytest.mark.slow
def test_bench_ldm_bad_size_is_one_clear_error():
    # ldm_tiny's autoencoder halves the image twice: 30 is not a multiple of 4
    result = run_script("benchmarks/bench_ldm.py", "--device", "cpu", "--config", "configs/ldm_tiny.yaml",
                        "--image-size", "30", "--json", check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("error: image_size 30 must be a multiple of 4"), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def load_bench_ldm():
    spec = importlib.util.spec_from_file_location("bench_ldm", ROOT / "benchmarks" / "bench_ldm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_count_of_a_convolution_by_hand():
    """The convention every FLOP figure of bench_ldm.py rests on: 2 FLOPs per multiply-add; the
    backward pass computes the input's and the weight's gradients, each as costly as the forward."""
    bench = load_bench_ldm()
    conv = torch.nn.Conv2d(3, 5, kernel_size=3, padding=1)  # the bias add is elementwise: 0 FLOPs
    image = torch.rand(2, 3, 8, 8)
    forward = 2 * (2 * 5 * 8 * 8) * (3 * 3 * 3)  # 2 x output elements x multiply-adds per output = 34,560
    assert bench.counted_flops(lambda: conv(image)) == forward
    assert bench.counted_flops(lambda: conv(image).sum().backward()) == 2 * forward  # + weight gradient
    image.requires_grad_(True)
    assert bench.counted_flops(lambda: conv(image).sum().backward()) == 3 * forward  # + input gradient


@pytest.mark.slow  # runs training steps for seconds to minutes: out of the fast tier
def test_bench_ldm_schedule_table(tmp_path, capsys):
    """The schedule of a tiny config with a discriminator from step 3 of 5: each part's FLOPs, the
    totals and the predicted minutes add up; the printed table names every part."""
    import yaml

    bench = load_bench_ldm()
    config = yaml.safe_load((ROOT / "configs" / "ldm_tiny.yaml").read_text())
    config.update(vae_steps=5, disc_weight=0.5, disc_start=3, diffusion_steps=7)
    path = tmp_path / "disc.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["--config", str(path), "--image-size", "32", "--num-images", "10", "--ddim-steps", "4",
            "--peak-tflops", "100", "--utilization", "0.5"]
    assert bench.main([*args, "--what", "schedule", "--json"]) == 0
    rows = json_rows(capsys.readouterr().out)
    assert [(r["part"], r["count"]) for r in rows] == [
        ("autoencoder training", 3), ("autoencoder + discriminator", 2), ("encoding 452 x 2 images", 904),
        ("denoiser training", 7), ("sampling DDIM 4", 10), ("total", None)]
    parts, total = rows[:-1], rows[-1]
    assert parts[1]["tflop_per_step"] > parts[0]["tflop_per_step"]  # the discriminator's forward and backward
    for row in parts:
        assert math.isclose(row["pflop"], row["tflop_per_step"] * row["count"] / 1000, rel_tol=1e-12)
        assert math.isclose(row["minutes"], row["pflop"] * 1e15 / 50e12 / 60, rel_tol=1e-12)  # 50 % of 100
    assert math.isclose(total["pflop"], sum(r["pflop"] for r in parts), rel_tol=1e-12)
    assert math.isclose(total["minutes"], sum(r["minutes"] for r in parts), rel_tol=1e-12)
    assert total["parameters"] == parts[0]["parameters"] + parts[3]["parameters"]

    assert bench.main([*args, "--what", "schedule", "--config", str(path), str(path)]) == 0  # two tables
    out = capsys.readouterr().out
    assert out.count("stage 1 (disc.yaml): images 32x32") == 2 and out.count("\ntotal ") == 2
    assert "at 50 % of 100 TFLOP/s = 50 TFLOP/s, not measured" in out
    for part in ("autoencoder + discriminator", "sampling DDIM 4", "10 images", "7 steps"):
        assert part in out


@pytest.mark.slow  # runs training steps for seconds to minutes: out of the fast tier
def test_bench_ldm_schedule_of_the_gpu_configs(capsys):
    """The figures docs/generation.md and the configs' comments give (default: both GPU configs, 40 % of
    790 TFLOP/s): ldm_busi.yaml's schedule fits 15 minutes with room to spare, medfusion's does not."""
    bench = load_bench_ldm()
    assert bench.main(["--what", "schedule", "--json"]) == 0
    rows = json_rows(capsys.readouterr().out)
    figures = {(r["config"], r["part"]): (r["parameters"], round(r["tflop_per_step"] or 0, 2), round(r["minutes"], 1))
               for r in rows}
    assert figures[("ldm_busi.yaml", "autoencoder training")] == (13_491_337, 1.83, 1.9)
    assert figures[("ldm_busi.yaml", "denoiser training")] == (34_177_288, 1.10, 2.9)
    assert figures[("ldm_busi.yaml", "total")][2] == 4.9
    assert figures[("ldm_medfusion.yaml", "autoencoder training")] == (53_807_017, 7.32, 7.7)
    assert figures[("ldm_medfusion.yaml", "denoiser training")] == (236_538_376, 3.30, 8.7)
    assert figures[("ldm_medfusion.yaml", "total")][2] == 16.5


def logged_losses(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_bench_ldm_steps_compute_train_ldm_losses(tmp_path):
    """The benchmark times copies of train_ldm.py's inline training steps: they must stay the same
    math. Replayed on the data and seeds of a real two-step run, they give the losses it logged."""
    import train_ldm
    from generation.data import StepBatchSampler, TrainingImages, load_training_set
    from networks.ldm import (STREAM_DIFFUSION, STREAM_VAE, AutoencoderPass, PatchDiscriminator, build_unet, build_vae,
                              latent_size, noise_scheduler)
    from generation.losses import LatentDiffusionLoss
    from generation.run import VAE_DIR, load_model
    from utils.runtime import step_generator
    from utils.config import parse_config

    bench = load_bench_ldm()
    data = write_dataset(tmp_path / "toy", n=9, size=(64, 80))
    args = ["--config", str(ROOT / "configs" / "ldm_tiny.yaml"), "--data-dir", str(data),
            "--out-dir", str(tmp_path / "run"), "--device", "cpu", "--vae-steps", "2", "--diffusion-steps", "2",
            "--log-every", "1", "--checkpoint-every", "2", "--sample-every", "0", "--disc-weight", "0.5",
            "--disc-start", "0", "--num-workers", "0", "--no-progress"]
    run_script("train_ldm.py", *args)
    cfg = parse_config(train_ldm.OPTIONS, "", args)
    cpu = torch.device("cpu")
    training = load_training_set(data, cfg.split, cfg.class_names)
    dataset = TrainingImages(training.paths, training.labels, cfg.image_size)

    # autoencoder: two steps (the second sees the first's updates of both networks)
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg).train()
    optimizer, schedule = train_ldm.optimizer_and_schedule(vae.parameters(), cfg.vae_lr, cfg)
    disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers)
    disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
    sampler = StepBatchSampler(len(dataset), cfg.vae_batch_size, cfg.seed, 0, cfg.vae_steps)
    logged = logged_losses(tmp_path / "run" / "losses_vae.csv")
    for step in range(2):
        images = torch.stack([dataset[item][0] for item in sampler.batch(step)])
        rng = step_generator(cfg.seed, step, STREAM_VAE, cpu)
        noise = torch.randn((cfg.vae_batch_size, cfg.vae_latent_channels, latent_size(cfg), latent_size(cfg)),
                            generator=rng)
        loss, reconstruction, terms = bench.vae_losses(AutoencoderPass(vae), disc, images, noise, cfg, cpu, None, True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        disc_loss = bench.discriminator_loss(disc, images, reconstruction, cpu, None)
        disc_optimizer.zero_grad(set_to_none=True)
        disc_loss.backward()
        disc_optimizer.step()
        mine = {"loss": loss, **terms, "discriminator": disc_loss}
        assert logged[step]["step"] == step + 1
        for key, value in mine.items():
            assert math.isclose(float(value.detach()), logged[step][key], rel_tol=1e-4, abs_tol=1e-6), (step, key)

    # denoiser: the first step's loss on the latents of the run's autoencoder
    vae = load_model("vae", tmp_path / "run" / VAE_DIR, "autoencoder").eval().requires_grad_(False)
    means, stds = train_ldm.encode_training_set(vae, dataset, cpu, cfg.batch_size, progress=False)
    scaling = json.loads((tmp_path / "run" / "ldm.json").read_text())["latent_scaling_factor"]
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg, len(training.class_names)).train()
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, 0, cfg.diffusion_steps)
    diffusion_loss = LatentDiffusionLoss(noise_scheduler(cfg), means, stds, torch.tensor(training.labels), scaling, cfg,
                                         len(training.class_names))
    loss = diffusion_loss(unet, sampler.batch(0), step_generator(cfg.seed, 0, STREAM_DIFFUSION, cpu))
    first = logged_losses(tmp_path / "run" / "losses_diffusion.csv")[0]
    assert first["step"] == 1 and math.isclose(float(loss.detach()), first["loss"], rel_tol=1e-4, abs_tol=1e-6)


def write_history(run_dir: Path, ious: dict[int, float]) -> None:
    run_dir.mkdir()
    records = [{"iteration": it, "set": "val", "iou": iou, "dice": 2 * iou / (1 + iou), "train_loss": 1 / it}
               for it, iou in ious.items()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.slow
def test_compare_runs_table_and_png(tmp_path):
    write_history(tmp_path / "fp32", {100: 0.25, 200: 0.5, 300: 0.45})
    write_history(tmp_path / "bf16", {100: 0.3, 200: 0.4})  # stopped early: no row at 300
    png = tmp_path / "curves.png"
    result = run_script("benchmarks/compare_runs.py", tmp_path / "fp32", tmp_path / "bf16", "--png", png)
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert rows[:3] == [["100", "0.2500", "0.3000"], ["200", "0.5000", "0.4000"], ["300", "0.4500", "-"]]
    assert rows[3] == ["best", "0.5000", "@200", "0.4000", "@200"]
    assert png.stat().st_size > 0 and png.read_bytes()[:4] == b"\x89PNG"
    dice = run_script("benchmarks/compare_runs.py", tmp_path / "fp32", "--metric", "dice").stdout
    assert "0.6667" in dice  # 2 * 0.5 / 1.5 at iteration 200


@pytest.mark.slow
def test_compare_runs_names_a_folder_without_metrics(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_script("benchmarks/compare_runs.py", tmp_path / "empty", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'empty'} is not a train.py run folder: metrics.jsonl not found"


def test_cpu_defaults_are_what_the_cpu_trains_with():
    """On a CPU train.py and train_ldm.py train in fp32 without channels_last (--precision auto,
    --channels-last auto): the benchmarks' default variants there are that alone."""
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    assert bench_train.parse_args(["--device", "cpu"]).variants == ["fp32 eager"]
    bench = load_bench_ldm()
    run, = bench.resolve(bench.parse_args(["--device", "cpu", "--config", "configs/ldm_tiny.yaml"]))
    assert run.variants == ["fp32 eager"]
    assert bench_train.VARIANTS["fp32 eager"] == {"dtype": None, "channels_last": False, "compile": None}
