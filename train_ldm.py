"""Stage 1 of MGCC: train the latent diffusion model that makes synthetic ultrasound images.

Two stages, both on the training images of one split only (never a validation image):
  vae        an AutoencoderKL (diffusers) learns to compress the images to latents:
             loss L1 + (1 - SSIM) + KL (+ an optional patch-discriminator term);
  diffusion  a UNet2DModel (diffusers) learns to denoise the frozen autoencoder's latents
             (DDPM, epsilon prediction, L1 loss), optionally conditioned on the class, with an EMA
             copy of its weights used for sampling.
--stage all runs both. --conditioning mask makes a mask-conditioned denoiser for image-mask pairs: the
lesion mask at the latent's size as extra input channels (dropped with --mask-dropout for classifier-free
guidance), learned from the labeled images only (--labeled-fraction / --labeled-list, as train.py picks
them), while the autoencoder learns from every training image (docs/generation.md). The run folder gets config.yaml, ldm.json, vae/, unet/, unet_ema/ (diffusers
save_pretrained), state files for --resume, preview grids and loss plots. Then sample with
sample_ldm.py --checkpoint <run folder>.

Several GPUs: torchrun --nproc_per_node N train_ldm.py ... (the same flags; gloo on CPU, NCCL on
GPUs). --vae-batch-size and --batch-size are then global, per step over all processes, and must
split evenly over them: each process takes its own slice of every batch and the gradients are
averaged (DistributedDataParallel), so N processes learn what one process does with the same
batch sizes. Rank 0 alone writes the run folder; the saved networks are plain diffusers models
that single-process scripts read, and --resume works across any number of processes. Both
networks normalise with GroupNorm, which keeps no batch statistics: there is nothing to
synchronise, hence no --sync-bn option (unlike train.py).

Stopping: SIGINT or SIGTERM (under torchrun: to torchrun, which passes it on) finishes the current
step, writes the checkpoint and exits with status 128 + the signal number; continue with --resume.
After kill -9 or a crash, --resume continues from the last checkpoint (--checkpoint-every). A
non-finite loss stops the run (status 3) naming the step, its last checkpoint untouched; bad
input and unusable run folders or state files exit with status 2 and one error line.
"""
# Where the pieces live: the options and their checks in generation/config.py, the run folder and the
# stages' skeleton (LdmStage, on utils/training.py's Trainer) in generation/run.py, the networks in
# networks/ldm.py, the losses in generation/losses.py, the autoencoder's evaluation in
# generation/image_quality.py; here the two stages' method code and main.
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers.training_utils import EMAModel
from diffusers.utils import logging as diffusers_logging
from torch.utils.data import DataLoader

from generation.data import StepBatchSampler, TrainingImages, latent_masks
from networks.ldm import (STREAM_DIFFUSION, STREAM_PREVIEW, STREAM_VAE, AutoencoderPass, PatchDiscriminator,
                          build_unet, build_vae, encode_training_set, latent_scaling_factor, latent_size,
                          noise_scheduler, optimizer_and_schedule, parameter_counts, sampling_scheduler)
from generation.losses import LatentDiffusionLoss, discriminator_loss, vae_losses
from generation.sampling import generate, to_uint8
from utils import distributed
from utils.cli import run_cli, run_on_device
from utils.config import parse_config
from utils.distributed import wrap_ddp
from generation.image_quality import evaluate_vae, reconstruct
from generation.config import OPTIONS, check_values
from generation.run import (EMA_DIR, PREVIEW_DIR, SCHEDULER_DIR, UNET_DIR, VAE_DIR, VAE_METRICS, LdmStage, load_model,
                           prepare_run, run_folder, save_model, write_run_info)
from utils.plots import image_grid, save_image
from utils.runtime import derived_seed, ignore_stop_signals, step_generator, StopRequest
from utils.training import ema_weights, optimizer_update

EPILOG = """examples:
  python train_ldm.py --config configs/ldm_busi.yaml --data-dir inputs/BUSI --split 1 --out-dir runs/ldm_busi_1
  python train_ldm.py --config configs/ldm_busi.yaml --out-dir runs/ldm_busi_1 --resume
  torchrun --nproc_per_node 4 train_ldm.py --config configs/ldm_busi.yaml --data-dir inputs/BUSI --out-dir runs/ldm_busi_1
  python train_ldm.py --config configs/ldm_tiny.yaml --data-dir inputs/BUSI --out-dir runs/ldm_tiny --device cpu
"""




# ----------------------------------------------------------------------------------------------
# stage 1a: the autoencoder
# ----------------------------------------------------------------------------------------------

class AutoencoderStage(LdmStage):
    name, what = "vae", "autoencoder"
    panels = {"total": {"loss": "loss"}, "reconstruction": {"L1": "l1", "1 - SSIM": "one_minus_ssim"},
              "KL (summed over the latent, per image)": {"KL": "kl"},
              "adversarial": {"generator": "generator", "discriminator": "discriminator"}}

    def setup(self, data) -> None:
        cfg, ctx, device = self.cfg, self.ctx, self.device
        torch.manual_seed(cfg.seed)
        self.vae = build_vae(cfg).to(device)
        self.optimizer, self.schedule = optimizer_and_schedule(self.vae.parameters(), cfg.vae_lr, cfg)
        self.disc = self.disc_optimizer = None
        if cfg.disc_weight > 0:
            self.disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers).to(device)
            self.disc_optimizer = torch.optim.AdamW(self.disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9),
                                                    weight_decay=0.0)
        self.register(model=self.vae, optimizer=self.optimizer, schedule=self.schedule, disc=self.disc,
                      disc_optimizer=self.disc_optimizer)
        self.vae_pass = wrap_ddp(AutoencoderPass(self.vae), ctx, device)
        self.disc_pass = wrap_ddp(self.disc, ctx, device) if self.disc is not None else None
        dataset = TrainingImages(data.paths, data.labels, cfg.image_size)
        sampler = StepBatchSampler(len(dataset), cfg.vae_batch_size, cfg.seed, self.start, cfg.vae_steps,
                                   ctx.rank, ctx.world_size)
        # The loader's own generator seeds its workers: it leaves the global RNG alone (exact resume).
        self.batches = iter(DataLoader(
            dataset, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
            worker_init_fn=ignore_stop_signals,
            generator=torch.Generator().manual_seed(derived_seed(cfg.seed, self.start, STREAM_VAE))))
        self.latent_shape = (cfg.vae_latent_channels, latent_size(cfg), latent_size(cfg))
        self.preview = torch.stack([dataset[(i, False)][0] for i in range(min(cfg.preview_images, len(dataset)))]) \
            if cfg.preview_images > 0 and ctx.is_main else None
        self.vae.train()

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        cfg, ctx, device = self.cfg, self.ctx, self.device
        images = next(self.batches)[0].to(device, non_blocking=True)
        rng = step_generator(cfg.seed, step, STREAM_VAE, device)
        # the posterior noise of the whole batch, then this rank's slice: the same numbers for each
        # image as in a single-process run
        noise = torch.randn((cfg.vae_batch_size, *self.latent_shape), generator=rng, device=device)
        adversarial = self.disc is not None and step >= cfg.disc_start
        loss, reconstruction, terms = vae_losses(self.vae_pass, self.disc, images, noise[ctx.rank::ctx.world_size],
                                                 cfg, device, self.amp_dtype, adversarial)
        optimizer_update(loss, self.vae.parameters(), self.optimizer, self.schedule, cfg.grad_clip)
        if adversarial:
            terms["discriminator"] = discriminator_loss(self.disc_pass, images, reconstruction, device, self.amp_dtype)
            optimizer_update(terms["discriminator"], self.disc.parameters(), self.disc_optimizer)
        return {"loss": loss, **terms}

    def on_read(self, done: int, means: dict[str, float]) -> None:
        self.bar.set_postfix(loss=f"{means['loss']:.4f}", l1=f"{means['l1']:.4f}",
                             ssim=f"{1 - means['one_minus_ssim']:.3f}")

    def save_models(self) -> None:
        save_model(self.vae, self.run_dir / VAE_DIR)

    def save_preview(self, step: int) -> None:
        originals = self.preview
        grid = image_grid(list(to_uint8(originals)) + list(to_uint8(reconstruct(self.vae, originals.to(self.device)))),
                          columns=len(originals))
        save_image(self.run_dir / PREVIEW_DIR / f"vae_step{step:07d}.png", grid)
        self.board.image("autoencoder/reconstructions", step, grid)  # originals above, reconstructions below


def train_vae(cfg: SimpleNamespace, run_dir: Path, info: dict, data, device, ctx, stop) -> int:
    """Train (or continue) the autoencoder, then measure it on the validation images; 0, or
    128 + signal number when stopped by a signal."""
    stage = AutoencoderStage(cfg.vae_steps, cfg, run_dir, info, ctx, device, stop)
    if stage.finished():
        if ctx.is_main and not (run_dir / VAE_METRICS).is_file():  # e.g. stopped before its evaluation
            evaluate_vae(load_model("vae", run_dir / VAE_DIR, "autoencoder").to(device).eval(), data, cfg, run_dir,
                         device)
        distributed.barrier()
        return 0
    stage.setup(data)
    code = stage.train()
    if code == 0 and ctx.is_main:
        metrics = evaluate_vae(stage.vae.eval(), data, cfg, run_dir, device)
        stage.board.scalars(stage.total, {k: (metrics or {}).get(k) for k in ("psnr", "ssim")},
                            prefix="autoencoder_val")  # on the split's val images
    stage.board.close()
    distributed.barrier()  # the other ranks wait for the evaluation (rank 0) before the next stage
    return code


# ----------------------------------------------------------------------------------------------
# stage 1b: the denoiser on the frozen autoencoder's latents
# ----------------------------------------------------------------------------------------------

class DenoiserStage(LdmStage):
    name, what = "diffusion", "denoiser"

    def setup(self, data) -> None:
        cfg, ctx, device, info = self.cfg, self.ctx, self.device, self.info
        self.panels = {"denoising loss": {cfg.diffusion_loss: "loss"}}
        self.vae = load_model("vae", self.run_dir / VAE_DIR, "autoencoder").to(device).eval().requires_grad_(False)
        dataset, masks = denoiser_pairs(cfg, data)
        means, stds = encode_training_set(self.vae, dataset, device, cfg.batch_size, cfg.progress and ctx.is_main)
        if info["latent_scaling_factor"] is None:
            # rank 0's value on every rank (GPUs may differ in the last bits): the one written to ldm.json
            info["latent_scaling_factor"] = distributed.broadcast_object(latent_scaling_factor(means))
            if ctx.is_main:
                write_run_info(self.run_dir, info)
        self.scaling = info["latent_scaling_factor"]
        if ctx.is_main:
            print(f"latent scaling factor: {self.scaling:.5f} (1 / std of the training latents)")

        num_classes = len(data.class_names)
        torch.manual_seed(cfg.seed)
        self.unet = build_unet(cfg, num_classes).to(device)
        # every rank keeps the EMA of the same (synchronised) weights: the copies stay identical
        self.ema = EMAModel(self.unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power,
                            foreach=True)
        self.scheduler = noise_scheduler(cfg)
        self.optimizer, self.schedule = optimizer_and_schedule(self.unet.parameters(), cfg.lr, cfg)
        self.register(model=self.unet, ema=self.ema, optimizer=self.optimizer, schedule=self.schedule)
        self.ema.to(device)
        self.denoiser = wrap_ddp(self.unet, ctx, device)

        labels_of = torch.tensor(dataset.labels, device=device) if dataset.labels is not None else None
        self.null_label = num_classes  # the extra embedding: "no class" (classifier-free guidance)
        self.sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, self.start, cfg.diffusion_steps)
        self.loss = LatentDiffusionLoss(self.scheduler, means, stds, labels_of, self.scaling, cfg, self.null_label,
                                        mine=slice(ctx.rank, None, ctx.world_size),  # this rank's items of a batch
                                        masks_of=masks.to(device) if masks is not None else None)
        self.preview_noise = torch.randn((cfg.preview_images, *means.shape[2:]), generator=torch.Generator().manual_seed(
            derived_seed(cfg.seed, 0, STREAM_PREVIEW)))
        self.preview_labels = (torch.arange(cfg.preview_images, device=device) % num_classes) if num_classes else None
        # a mask-conditioned preview: the first training masks in turn (shown above the samples)
        self.preview_masks = masks[torch.arange(cfg.preview_images) % len(masks), 0] if masks is not None else None
        self.unet.train()

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        rng = step_generator(self.cfg.seed, step, STREAM_DIFFUSION, self.device)
        loss = self.loss(self.denoiser, self.sampler.batch(step), rng, self.amp_dtype)
        optimizer_update(loss, self.unet.parameters(), self.optimizer, self.schedule, self.cfg.grad_clip)
        self.ema.step(self.unet.parameters())
        return {"loss": loss}

    def save_models(self) -> None:
        save_model(self.unet, self.run_dir / UNET_DIR)
        with ema_weights(self.ema, self.unet):
            save_model(self.unet, self.run_dir / EMA_DIR)
        save_model(self.scheduler, self.run_dir / SCHEDULER_DIR)

    def save_preview(self, step: int) -> None:
        self.unet.eval()
        with ema_weights(self.ema, self.unet):
            masks = self.preview_masks.to(self.device) if self.preview_masks is not None else None
            images = generate(self.unet, self.vae, sampling_scheduler("ddim", self.scheduler.config),
                              self.preview_noise.to(self.device), self.preview_labels, self.null_label, 1.0,
                              self.cfg.preview_steps, self.scaling, self.amp_dtype, masks=masks)
        self.unet.train()
        shown = list(images)
        if masks is not None:  # each sample below its mask (brought to the image's size)
            size = images.shape[-1]
            big = torch.nn.functional.interpolate(masks.float().cpu(), size=(size, size), mode="nearest")
            shown = [m for m in (big[:, 0] * 255).round().to(torch.uint8).numpy()] + shown
        grid = image_grid(shown, columns=len(images) if masks is not None else 8)
        save_image(self.run_dir / PREVIEW_DIR / f"diffusion_step{step:07d}.png", grid)
        self.board.image("denoiser/samples", step, grid)


def denoiser_pairs(cfg: SimpleNamespace, data) -> tuple[TrainingImages, torch.Tensor | None]:
    """What the denoiser learns from: every training image, or (conditioning mask) the labeled images alone
    with their masks at the latent's size, (N, 2, 1, h, w) (as they are, mirrored)."""
    if cfg.conditioning != "mask":
        return TrainingImages(data.paths, data.labels, cfg.image_size), None
    dataset = TrainingImages([data.paths[k] for k in data.mask_index], data.mask_labels, cfg.image_size)
    return dataset, latent_masks(data.mask_paths, cfg.image_size, latent_size(cfg), cfg.mask_values)


def train_diffusion(cfg: SimpleNamespace, run_dir: Path, info: dict, data, device, ctx, stop) -> int:
    """Train (or continue) the denoiser on the frozen autoencoder's latents; 0, or 128 + signal
    number when stopped by a signal."""
    stage = DenoiserStage(cfg.diffusion_steps, cfg, run_dir, info, ctx, device, stop)
    if stage.finished():
        return 0
    stage.setup(data)
    code = stage.train()
    stage.board.close()
    return code


# ----------------------------------------------------------------------------------------------

def train(cfg: SimpleNamespace, ctx, device) -> int:
    """Run the stages the configuration asks for; the exit status (0, or 128 + signal number when
    stopped by a signal)."""
    diffusers_logging.set_verbosity_error()
    check_values(cfg, ctx.world_size)
    run_dir = run_folder(cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    # From here a signal only sets a flag: the run folder is never left half-prepared, and the
    # training loops act on it after their current step.
    with StopRequest() as stop:
        # rank 0 checks the data and settles the run folder; the others get its outcome (or its error)
        cfg, info, data = distributed.on_main_rank(lambda: prepare_run(cfg, run_dir, ctx.world_size), ctx)
        if ctx.is_main:
            counts = parameter_counts(cfg, len(info["class_names"]))
            classes = (f"{len(info['class_names'])} classes ({', '.join(info['class_names'])})"
                       if info["class_names"] else "unconditional")
            where = f"{device} x {ctx.world_size} processes" if ctx.enabled else str(device)
            print(f"run {run_dir}: {len(data.ids)} training images of {data.train_file.name}, {classes}, on {where}")
            if cfg.conditioning == "mask":
                print(f"mask-conditioned denoiser: learns from the {len(data.mask_index)} labeled images and their "
                      f"masks (the autoencoder from all {len(data.ids)}); mask dropout {cfg.mask_dropout}")
            print(f"autoencoder {counts['vae']:,} parameters, denoiser {counts['unet']:,} parameters; latents "
                  f"{info['latent_channels']}x{info['latent_size']}x{info['latent_size']} for images "
                  f"{cfg.image_size}x{cfg.image_size}", flush=True)
        if cfg.stage in ("vae", "all"):
            code = train_vae(cfg, run_dir, info, data, device, ctx, stop)
            if code:
                return code
        if cfg.stage in ("diffusion", "all"):
            code = train_diffusion(cfg, run_dir, info, data, device, ctx, stop)
            if code:
                return code
    if ctx.is_main:
        print(f"done: {run_dir}" + (f" (sample with: python sample_ldm.py --checkpoint {run_dir} --out-dir <folder>)"
                                    if cfg.stage != "vae" else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Train; the exit status. Bad input raises ConfigError / DataError / CheckpointError and a
    diverged run FloatingPointError: utils.cli.run_cli turns them into one error line (status 2, 3)."""

    cfg = parse_config(OPTIONS, __doc__, argv, epilog=EPILOG)
    return run_on_device(cfg, train)


if __name__ == "__main__":
    run_cli(main)
