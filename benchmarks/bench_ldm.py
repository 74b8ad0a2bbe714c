"""Stage 1 (train_ldm.py, sample_ldm.py): FLOPs and predicted time of each configuration's whole
schedule, and measured speed of both training steps and of sampling, per variant.

    python benchmarks/bench_ldm.py --what schedule  # FLOPs, predicted times: ldm_busi.yaml, ldm_medfusion.yaml
    python benchmarks/bench_ldm.py                  # time configs/ldm_busi.yaml on CUDA, configs/ldm_tiny.yaml on CPU
    python benchmarks/bench_ldm.py --what sampling --variants "bf16 + channels_last + compile"
    python benchmarks/bench_ldm.py --config configs/ldm_busi.yaml --device cpu --steps 1 --warmup 0
    python benchmarks/bench_ldm.py --json           # one JSON line per benchmark and variant

Benchmarks (--what):
  vae         the autoencoder's training step: encode, sample the posterior, decode, L1 + (1 - SSIM)
              + KL (+ the patch-discriminator terms when disc_weight > 0), AdamW, gradient clipping;
  diffusion   the denoiser's training step on latents already encoded (as train_ldm.py does): batch
              indices and flips, posterior sample, noise, timesteps, class dropout, the UNet, L1/L2
              loss, AdamW, gradient clipping, the EMA update;
  sampling    generation.sampling.generate (the code path of sample_ldm.py): DDIM with --ddim-steps (50)
              and DPM-Solver++ with --dpmsolver-steps (20) denoising steps, then the decoder;
  schedule    nothing is timed: for each --config, the parameters, the FLOPs of one training step of
              each stage and of one sampled image, and the time train_ldm.py's whole schedule
              (vae_steps autoencoder steps, encoding the training images and their mirror images,
              diffusion_steps denoiser steps) and sampling --num-images images with DDIM
              --ddim-steps would take at --utilization of --peak-tflops. A prediction, not a
              measurement; preview grids are left out (under 1 % of the FLOPs of both GPU configs).
The networks, schedulers and optimizers are built from the configuration exactly as train_ldm.py
builds them, with random weights (speed does not depend on them). Inputs are made on the device,
so the data loader is not timed. Each variant runs --warmup untimed steps, then --steps timed ones
between device synchronisations; a sampling "step" is one batch of images. Training rows give
iterations/s, sampling rows images/s (the it_per_s key in --json; see its "unit"). FLOPs of one
step are counted with torch.utils.flop_counter on the eager networks (forward and backward). Peak
memory is measured on CUDA only (NaN on CPU). The schedule's FLOPs are counted the same way on the
meta device (shapes only: exact, no memory, under a second at 256x256); they equal the counts of
the timed steps.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the library modules (utils/, networks/, dataloaders/)
from networks.ldm import (STREAM_DIFFUSION, STREAM_VAE, AutoencoderPass, PatchDiscriminator,  # noqa: E402
                          build_unet, build_vae, check_architecture, condition_channels, count_parameters, latent_size,
                          noise_scheduler, optimizer_and_schedule, sampling_scheduler)
from generation.losses import LatentDiffusionLoss, discriminator_loss, vae_losses  # noqa: E402
from generation.sampling import generate  # noqa: E402
from utils.benchmarking import (VARIANTS, bf16_peak, counted_flops, default_variants, device_name,  # noqa: E402
                                memory_format, time_steps)
from utils.config import ConfigError, parse_config  # noqa: E402
from generation.config import OPTIONS  # noqa: E402
from utils.runtime import step_generator  # noqa: E402
from utils.training import optimizer_update  # noqa: E402

WHAT = ("vae", "diffusion", "sampling")
SCHEDULE_CONFIGS = ("ldm_busi.yaml", "ldm_medfusion.yaml")  # the two GPU configurations
META = torch.device("meta")
TITLES = {"vae": "autoencoder training", "diffusion": "denoiser training"}
SAMPLER_TITLES = {"ddim": "DDIM", "dpmsolver": "DPM-Solver++"}
# Images of a split's training list (BUSI split 1 has 452): the size of the latent table the
# denoiser's batches are drawn from. Only the gather's cost depends on it, and barely.
TRAINING_IMAGES = 452


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=None,
                        help="train_ldm.py configurations, one table each (default: with --what schedule, "
                             "configs/ldm_busi.yaml and configs/ldm_medfusion.yaml; otherwise "
                             "configs/ldm_busi.yaml on CUDA, configs/ldm_tiny.yaml on CPU)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu or cuda[:N]")
    parser.add_argument("--what", choices=(*WHAT, "all", "schedule"), default="all",
                        help="what to time: vae, diffusion, sampling or all; or schedule: FLOPs and "
                             "predicted time of the whole schedule, nothing timed (default: all)")
    parser.add_argument("--num-images", type=int, default=1000,
                        help="--what schedule: images sampled after training (default: 1000, as the "
                             "sample_ldm.py command of docs/generation.md)")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="--what schedule: the GPU's peak TFLOP/s in bf16 (default: 790, the H100 figure "
                             "of the stage-1 issue)")
    parser.add_argument("--utilization", type=float, default=0.4,
                        help="--what schedule: fraction of --peak-tflops assumed reached (default: 0.4)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square image size (default: the configuration's image_size)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="training batch of both stages (default: the configuration's vae_batch_size "
                             "for the autoencoder and batch_size for the denoiser)")
    parser.add_argument("--sampling-batch-size", type=int, default=16,
                        help="images denoised together (default: 16, as sample_ldm.py)")
    parser.add_argument("--ddim-steps", type=int, default=50, help="DDIM denoising steps; 0 = skip (default: 50)")
    parser.add_argument("--dpmsolver-steps", type=int, default=20,
                        help="DPM-Solver++ denoising steps; 0 = skip (default: 20)")
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance scale of the sampling rows; other than 1 doubles the "
                             "denoiser's batch (default: 1, as sample_ldm.py)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per benchmark (default on CUDA: 50 training steps, 5 sampling "
                             "batches; on CPU: 3 and 1)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default on CUDA: 10 training steps, 1 sampling batch; "
                             "on CPU: 1 and 1; 2 more for a compiled variant, whose first calls compile)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="variants to run (default: all on CUDA; on CPU fp32 eager, what train_ldm.py "
                             "trains with there)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    parser.add_argument("--json", action="store_true", help="print one JSON line per row instead of a table")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar on stderr (default: on)")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size", "steps", "sampling_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("warmup", "ddim_steps", "dpmsolver_steps", "num_images"):
        value = getattr(args, name)
        if value is not None and value < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative, got {value}")
    if not args.peak_tflops > 0:
        parser.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    if not 0 < args.utilization <= 1:
        parser.error(f"--utilization must be in (0, 1], got {args.utilization}")
    return args


def resolve(args) -> list[SimpleNamespace]:
    """One run description per configuration, all checked before anything runs; a bad value is a
    ConfigError naming it."""
    from utils.runtime import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.config:
        configs = [Path(c) for c in args.config]
    elif args.what == "schedule":
        configs = [ROOT / "configs" / name for name in SCHEDULE_CONFIGS]
    else:
        configs = [ROOT / "configs" / ("ldm_busi.yaml" if cuda else "ldm_tiny.yaml")]
    return [resolve_config(args, device, config) for config in configs]


def resolve_config(args, device: torch.device, config: Path) -> SimpleNamespace:
    """Configuration and step counts of one table."""
    cuda = device.type == "cuda"
    cfg = parse_config(OPTIONS, "", ["--config", str(config)])  # defaults, then the file: as train_ldm.py reads it
    if args.image_size is not None:
        cfg.image_size = args.image_size
    if args.batch_size is not None:
        cfg.vae_batch_size = cfg.batch_size = args.batch_size
    check_architecture(cfg)
    samplers = [(name, steps) for name, steps in (("ddim", args.ddim_steps), ("dpmsolver", args.dpmsolver_steps))
                if steps > 0]
    for name, steps in samplers:
        if steps > cfg.train_timesteps:
            raise ConfigError(f"--{name}-steps {steps} exceeds train_timesteps {cfg.train_timesteps} of {config}")
    what = {"all": list(WHAT), "schedule": []}.get(args.what, [args.what])
    if what == ["sampling"] and not samplers:
        raise ConfigError("--what sampling with --ddim-steps 0 and --dpmsolver-steps 0: nothing to time")
    return SimpleNamespace(
        device=device, config=config, cfg=cfg, what=what, samplers=samplers,
        # a class-conditional denoiser has one class embedding per class plus the "no class" one;
        # classes given by a class_csv alone are only known from the data: timed unconditional
        num_classes=len(cfg.class_names) if cfg.class_conditioning else 0,
        variants=args.variants or default_variants(device, list(VARIANTS)),
        train_steps=args.steps or (50 if cuda else 3), sampling_steps=args.steps or (5 if cuda else 1),
        train_warmup=args.warmup if args.warmup is not None else (10 if cuda else 1),
        sampling_warmup=args.warmup if args.warmup is not None else 1,
        # the first calls of a compiled network compile it, and a backward pass is compiled on its
        # first call too: timing after one warm-up step measured compilation on CPU
        compile_warmup=0 if args.warmup is not None else 2,
        sampling_batch_size=args.sampling_batch_size, guidance_scale=args.guidance_scale,
        compile_mode=args.compile_mode, json=args.json, progress=args.progress,
        num_images=args.num_images, peak_tflops=args.peak_tflops, utilization=args.utilization)


def vae_benchmark(run, spec):
    """(step, compile, batch) of the autoencoder's training step at steady state (past disc_start)."""
    cfg, device, dtype = run.cfg, run.device, spec["dtype"]
    fmt = memory_format(spec)
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg).to(device, memory_format=fmt).train()
    optimizer, schedule = optimizer_and_schedule(vae.parameters(), cfg.vae_lr, cfg)
    disc = disc_optimizer = None
    if cfg.disc_weight > 0:
        disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers).to(device, memory_format=fmt)
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
    vae_pass = AutoencoderPass(vae)
    images = (torch.rand(cfg.vae_batch_size, 1, cfg.image_size, cfg.image_size, device=device) * 2 - 1)
    images = images.contiguous(memory_format=fmt)
    latent_shape = (cfg.vae_batch_size, cfg.vae_latent_channels, latent_size(cfg), latent_size(cfg))
    counter = iter(range(1 << 62))

    def step():
        rng = step_generator(cfg.seed, next(counter), STREAM_VAE, device)
        noise = torch.randn(latent_shape, generator=rng, device=device)
        loss, reconstruction, _ = vae_losses(vae_pass, disc, images, noise, cfg, device, dtype, disc is not None)
        optimizer_update(loss, vae.parameters(), optimizer, schedule, cfg.grad_clip)
        if disc is not None:
            optimizer_update(discriminator_loss(disc, images, reconstruction, device, dtype), disc.parameters(),
                             disc_optimizer)

    def compile_networks():
        # in place (nn.Module.compile): the same modules, parameters and optimizer
        vae_pass.compile(mode=run.compile_mode)
        if disc is not None:
            disc.compile(mode=run.compile_mode)

    return step, compile_networks, cfg.vae_batch_size


def diffusion_benchmark(run, spec):
    """(step, compile, batch) of the denoiser's training step on a table of encoded training latents."""
    from diffusers.training_utils import EMAModel

    from generation.data import StepBatchSampler

    cfg, device, dtype = run.cfg, run.device, spec["dtype"]
    fmt = memory_format(spec)
    size = latent_size(cfg)
    shape = (TRAINING_IMAGES, 2, cfg.vae_latent_channels, size, size)  # each image and its mirror image
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    means = torch.randn(shape, generator=generator, device=device)
    stds = 0.1 * torch.rand(shape, generator=generator, device=device)
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg, run.num_classes).to(device, memory_format=fmt).train()
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power, foreach=True)
    scheduler = noise_scheduler(cfg)
    optimizer, schedule = optimizer_and_schedule(unet.parameters(), cfg.lr, cfg)
    labels_of = (torch.arange(TRAINING_IMAGES, device=device) % run.num_classes) if run.num_classes else None
    sampler = StepBatchSampler(TRAINING_IMAGES, cfg.batch_size, cfg.seed, 0, 1 << 62)
    diffusion_loss = LatentDiffusionLoss(scheduler, means, stds, labels_of, 1.0, cfg, run.num_classes,
                                         masks_of=bench_masks(cfg, (TRAINING_IMAGES, 2), device))
    counter = iter(range(1 << 62))

    def step():
        number = next(counter)
        rng = step_generator(cfg.seed, number, STREAM_DIFFUSION, device)
        loss = diffusion_loss(unet, sampler.batch(number), rng, dtype)
        optimizer_update(loss, unet.parameters(), optimizer, schedule, cfg.grad_clip)
        ema.step(unet.parameters())

    def compile_networks():
        unet.compile(mode=run.compile_mode)

    return step, compile_networks, cfg.batch_size


def bench_masks(cfg, leading: tuple, device):
    """Masks at the latent size for a mask-conditioned denoiser (train_ldm.py --conditioning mask), else None."""
    if not condition_channels(cfg):
        return None
    size = latent_size(cfg)
    return torch.rand((*leading, 1, size, size), device=device)


def sampling_benchmark(run, spec, sampler: str, num_steps: int):
    """(step, compile, batch) of one batch of generation.sampling.generate, the sampling loop of sample_ldm.py."""
    cfg, device, dtype = run.cfg, run.device, spec["dtype"]
    fmt = memory_format(spec)
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg, run.num_classes).to(device, memory_format=fmt).eval().requires_grad_(False)
    vae = build_vae(cfg).to(device, memory_format=fmt).eval().requires_grad_(False)
    scheduler = sampling_scheduler(sampler, noise_scheduler(cfg).config)
    size, batch = latent_size(cfg), run.sampling_batch_size
    noise = torch.randn(batch, cfg.vae_latent_channels, size, size, device=device).contiguous(memory_format=fmt)
    labels = (torch.arange(batch, device=device) % run.num_classes) if run.num_classes else None
    masks = bench_masks(cfg, (batch,), device)
    guidance = run.guidance_scale if labels is not None or masks is not None else 1.0

    def step():
        generate(unet, vae, scheduler, noise, labels, run.num_classes, guidance, num_steps, 1.0, dtype, masks=masks)

    def compile_networks():
        unet.compile(mode=run.compile_mode)
        vae.decoder.compile(mode=run.compile_mode)

    return step, compile_networks, batch


# ----------------------------------------------------------------------------------------------
# the whole schedule: FLOPs counted on the meta device, time predicted from them
# ----------------------------------------------------------------------------------------------

def vae_step_flops(cfg, adversarial: bool) -> int:
    """One autoencoder training step, forward and backward, with the discriminator's terms when
    ``adversarial`` (the steps from disc_start on), as train_ldm.py runs it."""
    size = latent_size(cfg)
    with META:
        vae_pass = AutoencoderPass(build_vae(cfg))
        disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers) if adversarial else None
        images = torch.empty(cfg.vae_batch_size, 1, cfg.image_size, cfg.image_size)
        noise = torch.empty(cfg.vae_batch_size, cfg.vae_latent_channels, size, size)

    def step():
        loss, reconstruction, _ = vae_losses(vae_pass, disc, images, noise, cfg, META, None, adversarial)
        loss.backward()
        if adversarial:
            discriminator_loss(disc, images, reconstruction, META, None).backward()

    return counted_flops(step)


def diffusion_step_flops(cfg, num_classes: int) -> int:
    """One denoiser training step on encoded latents, forward and backward, as train_ldm.py runs it
    (``rng`` None: the meta device has no generator, and random values do not change FLOPs)."""
    from generation.data import StepBatchSampler

    size = latent_size(cfg)
    with META:
        unet = build_unet(cfg, num_classes)
        means = stds = torch.empty(TRAINING_IMAGES, 2, cfg.vae_latent_channels, size, size)
        labels_of = torch.zeros(TRAINING_IMAGES, dtype=torch.long) if num_classes else None
    batch = StepBatchSampler(TRAINING_IMAGES, cfg.batch_size, cfg.seed, 0, 1).batch(0)
    masks_of = bench_masks(cfg, (TRAINING_IMAGES, 2), META)
    loss = LatentDiffusionLoss(noise_scheduler(cfg), means, stds, labels_of, 1.0, cfg, num_classes, masks_of=masks_of)
    return counted_flops(lambda: loss(unet, batch, None).backward())


@torch.no_grad()
def sampling_flops(cfg, num_classes: int, num_steps: int, guidance_scale: float, batch: int) -> int:
    """One batch of networks.ldm.generate: ``num_steps`` denoiser calls (on twice the batch with
    classifier-free guidance), then the decoder. Scheduler updates are elementwise: 0 FLOPs."""
    size = latent_size(cfg)
    extra = condition_channels(cfg)
    guided = (num_classes > 0 or extra > 0) and guidance_scale != 1.0
    with META:
        unet, vae = build_unet(cfg, num_classes), build_vae(cfg)
        latents = torch.empty(batch, cfg.vae_latent_channels, size, size)
        labels = torch.zeros(batch * (2 if guided else 1), dtype=torch.long) if num_classes else None
        timestep = torch.zeros((), dtype=torch.long)
    unet_input = torch.cat([latents, latents]) if guided else latents
    if extra:  # a mask-conditioned denoiser: its mask channels concatenated (networks.ldm.mask_channels)
        with META:
            unet_input = torch.cat([unet_input, torch.empty(len(unet_input), extra, size, size)], dim=1)
    return (num_steps * counted_flops(lambda: unet(unet_input, timestep, class_labels=labels))
            + counted_flops(lambda: vae.decode(latents)))


@torch.no_grad()
def encoding_flops(cfg, images: int) -> int:
    """train_ldm.py's encoding of the training set before the denoiser's stage (each image and its
    mirror image, once)."""
    with META:
        vae = build_vae(cfg)
        batch = torch.empty(images, 1, cfg.image_size, cfg.image_size)
    return counted_flops(lambda: vae.encode(batch))


def schedule(run) -> list[dict]:
    """Rows of the schedule table: each part's FLOPs per step (or per image), its count, its total
    and the time it would take at run.utilization of run.peak_tflops; then the total."""
    cfg = run.cfg
    with META:
        vae_parameters = count_parameters(build_vae(cfg))
        unet_parameters = count_parameters(build_unet(cfg, run.num_classes))
    # (part, parameters, batch, FLOPs per step or image, count, unit)
    parts = []
    plain_steps = min(cfg.vae_steps, cfg.disc_start) if cfg.disc_weight > 0 else cfg.vae_steps
    if plain_steps:
        parts.append(("autoencoder training", vae_parameters, cfg.vae_batch_size, vae_step_flops(cfg, False),
                      plain_steps, "steps"))
    if cfg.vae_steps > plain_steps:
        parts.append(("autoencoder + discriminator", vae_parameters, cfg.vae_batch_size,
                      vae_step_flops(cfg, True), cfg.vae_steps - plain_steps, "steps"))
    parts.append((f"encoding {TRAINING_IMAGES} x 2 images", vae_parameters, None,
                  encoding_flops(cfg, 1), 2 * TRAINING_IMAGES, "images"))
    parts.append(("denoiser training", unet_parameters, cfg.batch_size, diffusion_step_flops(cfg, run.num_classes),
                  cfg.diffusion_steps, "steps"))
    for sampler, num_steps in run.samplers[:1] if run.num_images else []:
        batch = run.sampling_batch_size
        per_batch = sampling_flops(cfg, run.num_classes, num_steps, run.guidance_scale, batch)
        parts.append((f"sampling {SAMPLER_TITLES[sampler]} {num_steps}", unet_parameters + vae_parameters, None,
                      per_batch / batch, run.num_images, "images"))
    rate = run.peak_tflops * 1e12 * run.utilization  # FLOP/s
    rows = [{"config": run.config.name, "part": part, "parameters": parameters, "batch_size": batch,
             "tflop_per_step": flops / 1e12, "count": count, "unit": unit, "pflop": flops * count / 1e15,
             "minutes": flops * count / rate / 60, "image_size": cfg.image_size}
            for part, parameters, batch, flops, count, unit in parts]
    rows.append({"config": run.config.name, "part": "total", "parameters": vae_parameters + unet_parameters,
                 "batch_size": None, "tflop_per_step": None, "count": None, "unit": None,
                 "pflop": sum(r["pflop"] for r in rows), "minutes": sum(r["minutes"] for r in rows),
                 "image_size": cfg.image_size})
    return rows


def sizes(cfg) -> str:
    size = latent_size(cfg)
    return f"images {cfg.image_size}x{cfg.image_size}, latents {cfg.vae_latent_channels}x{size}x{size}"


def print_schedule(run, rows: list[dict]) -> None:
    print(f"\nstage 1 ({run.config.name}): {sizes(run.cfg)}; FLOPs counted (forward + backward for training), "
          f"times predicted at {100 * run.utilization:g} % of {run.peak_tflops:g} TFLOP/s = "
          f"{run.peak_tflops * run.utilization:g} TFLOP/s, not measured")
    print(f"{'part':28s} {'parameters':>12s} {'batch':>6s} {'TFLOP each':>11s} {'count':>14s} {'PFLOP':>9s} "
          f"{'minutes':>8s}")
    for r in rows:
        each = "" if r["tflop_per_step"] is None else f"{r['tflop_per_step']:.4f}"
        count = "" if r["count"] is None else f"{r['count']} {r['unit']}"
        batch = "" if r["batch_size"] is None else str(r["batch_size"])
        print(f"{r['part']:28s} {r['parameters']:12,d} {batch:>6s} {each:>11s} {count:>14s} {r['pflop']:9.2f} "
              f"{r['minutes']:8.2f}")
    print("TFLOP each: per training step (its batch) or per image; previews and evaluation left out")


# ----------------------------------------------------------------------------------------------

def measure(run, build, spec, warmup: int, steps: int) -> dict:
    """FLOPs of one step (eager), then warm-up and timed steps of the variant; one result row."""
    device = run.device
    gc.collect()  # the previous row's networks, optimizer states and compiled code are gone
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = True  # fixed sizes, as train_ldm.py sets on CUDA
    step, compile_networks, batch = build()
    flops = counted_flops(step)  # before compiling: compiled code hides the ops
    if spec["compile"]:
        compile_networks()
        warmup += run.compile_warmup
    timed = time_steps(step, device, warmup, steps)
    return {"ms_per_step": timed["ms_per_step"], "peak_mem_gib": timed["peak_mem_gib"],
            "tflops": flops / timed["seconds"] / 1e12, "tflop_per_step": flops / 1e12, "batch_size": batch,
            "steps": steps, "warmup": warmup, "seconds": timed["seconds"]}


def jobs(run):
    """(benchmark title, unit, builder(spec), warm-up, steps) for each thing to time."""
    out = []
    if "vae" in run.what:
        out.append((TITLES["vae"], "it/s", lambda spec: lambda: vae_benchmark(run, spec),
                    run.train_warmup, run.train_steps))
    if "diffusion" in run.what:
        out.append((TITLES["diffusion"], "it/s", lambda spec: lambda: diffusion_benchmark(run, spec),
                    run.train_warmup, run.train_steps))
    if "sampling" in run.what:
        for sampler, num_steps in run.samplers:
            out.append((f"sampling {SAMPLER_TITLES[sampler]} {num_steps}", "images/s",
                        lambda spec, s=sampler, n=num_steps: lambda: sampling_benchmark(run, spec, s, n),
                        run.sampling_warmup, run.sampling_steps))
    return out


def benchmark(run) -> list[dict]:
    from tqdm import tqdm

    peak = bf16_peak(device_name(run.device))
    todo = [(job, variant) for job in jobs(run) for variant in run.variants]
    rows = []
    for (title, unit, builder, warmup, steps), variant in tqdm(todo, desc="benchmarks", unit="row",
                                                              disable=not run.progress, file=sys.stderr):
        spec = VARIANTS[variant]
        result = measure(run, builder(spec), spec, warmup, steps)
        rate = (result["batch_size"] if unit == "images/s" else 1) / result.pop("seconds")
        row = {"benchmark": title, "variant": variant, "it_per_s": rate, "unit": unit, **result,
               "image_size": run.cfg.image_size,
               "fraction_of_bf16_peak": result["tflops"] / peak if peak else None}
        rows.append(row)
        if run.json:
            print(json.dumps(row), flush=True)
    return rows


def print_table(run, rows: list[dict]) -> None:
    cfg = run.cfg
    print(f"\nstage 1 ({run.config.name}) on {device_name(run.device)}: {sizes(cfg)}; training batches: "
          f"autoencoder {cfg.vae_batch_size}, denoiser {cfg.batch_size}; sampling batch {run.sampling_batch_size}, "
          f"guidance {run.guidance_scale}; timed {run.train_steps} training steps after {run.train_warmup} "
          f"warm-up, {run.sampling_steps} sampling batches after {run.sampling_warmup}"
          + (f" (compiled variants: {run.compile_warmup} more warm-up)"
             if run.compile_warmup and any(VARIANTS[v]["compile"] for v in run.variants) else "")
          + f"; torch {torch.__version__}")
    print(f"{'benchmark':24s} {'variant':32s} {'rate':>9s} {'unit':8s} {'ms/step':>9s} {'peak GiB':>9s} "
          f"{'TFLOP/s':>8s} {'of bf16 peak':>13s} {'TFLOP/step':>11s}")
    for r in rows:
        frac = f"{100 * r['fraction_of_bf16_peak']:.1f}%" if r["fraction_of_bf16_peak"] else "n/a"
        peak = "n/a" if math.isnan(r["peak_mem_gib"]) else f"{r['peak_mem_gib']:.2f}"
        print(f"{r['benchmark']:24s} {r['variant']:32s} {r['it_per_s']:9.2f} {r['unit']:8s} {r['ms_per_step']:9.1f} "
              f"{peak:>9s} {r['tflops']:8.3f} {frac:>13s} {r['tflop_per_step']:11.4f}")
    print("ms/step: per training iteration, or per sampling batch (all denoising steps and the decoder); "
          "FLOPs counted forward + backward for training")


def main(argv=None) -> int:
    from dataloaders.io import DataError
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    args = parse_args(argv)
    try:
        runs = resolve(args)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for run in runs:
        rows = schedule(run) if args.what == "schedule" else benchmark(run)
        if run.json:
            if args.what == "schedule":  # timing rows are printed as they are measured
                for row in rows:
                    print(json.dumps(row), flush=True)
        elif args.what == "schedule":
            print_schedule(run, rows)
        else:
            print_table(run, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
