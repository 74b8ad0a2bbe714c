"""Stage 1 of MGCC: the latent diffusion model that makes synthetic ultrasound images.

Everything the two stage-1 scripts (train_ldm.py, sample_ldm.py) share lives here: the networks
built from the configuration (diffusers' AutoencoderKL and UNet2DModel, no hub download), the
noise schedulers, the run folder's description file (``ldm.json``), the SSIM used by the
autoencoder's loss, the denoising loop with classifier-free guidance, and the nearest-training-
image distances of the memorisation report.

A run folder written by train_ldm.py::

    <run>/config.yaml            resolved options of the run
    <run>/ldm.json               kind "mgcc-ldm", sizes, latent scaling factor, classes, data, ids
    <run>/vae/                   AutoencoderKL.save_pretrained
    <run>/unet/, <run>/unet_ema/ UNet2DModel.save_pretrained (raw and EMA weights)
    <run>/scheduler/             DDPMScheduler.save_pretrained (the training noise schedule)
    <run>/state_vae.pt, <run>/state_diffusion.pt   everything --resume needs (atomic_save)
    <run>/previews/*.png, <run>/losses_*.png|csv    what people look at
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.checkpoint import CheckpointError, load_checkpoint
from utils.config import ConfigError

KIND = "mgcc-ldm"
RUN_INFO = "ldm.json"
CONFIG_FILE = "config.yaml"
VAE_DIR, UNET_DIR, EMA_DIR, SCHEDULER_DIR = "vae", "unet", "unet_ema", "scheduler"
VAE_STATE, DIFFUSION_STATE = "state_vae.pt", "state_diffusion.pt"
PREVIEW_DIR = "previews"
IMAGE_CHANNELS = 1  # ultrasound images are grayscale

# Independent random streams derived from (seed, step, stream): a resumed run draws exactly the
# numbers an uninterrupted one would, whatever happened before (workers, previews, restarts).
STREAM_VAE, STREAM_DIFFUSION, STREAM_PREVIEW = 1, 2, 3


# ----------------------------------------------------------------------------------------------
# devices, precision, randomness
# ----------------------------------------------------------------------------------------------

def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` (bf16), or full precision for None (see utils.runtime.autocast_dtype)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def derived_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integers (seed, step, stream...) with numpy's SeedSequence."""
    low, high = np.random.SeedSequence([int(k) for k in keys]).generate_state(2)
    return (int(high) << 31 ^ int(low)) & ((1 << 63) - 1)


def step_generator(seed: int, step: int, stream: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derived_seed(seed, step, stream))


def on_main_rank(work: Callable[[], Any], ctx) -> Any:
    """``work()`` on rank 0 alone (checks, then writes), its result given to every rank.

    Bad input it raises (ConfigError, DataError, CheckpointError) is raised on every rank, so that
    all processes stop with the same message instead of waiting for rank 0 in a collective. A plain
    run (one process) just calls ``work``.
    """
    from utils import distributed
    from utils.cli import USER_ERRORS

    if not ctx.enabled:
        return work()
    outcome = None
    if ctx.is_main:
        try:
            outcome = ("done", work())
        except USER_ERRORS as error:
            outcome = ("error", error)
        except BaseException:
            distributed.broadcast_object(("failed", None))
            raise
    status, value = distributed.broadcast_object(outcome)
    if status == "error":
        raise value
    if status == "failed":
        raise RuntimeError("rank 0 failed (its traceback says why)")
    return value


# ----------------------------------------------------------------------------------------------
# networks and schedulers, built from the configuration
# ----------------------------------------------------------------------------------------------

def latent_size(cfg: SimpleNamespace) -> int:
    """AutoencoderKL halves the resolution in every encoder block but the last."""
    return cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)


def vae_config(cfg: SimpleNamespace) -> dict[str, Any]:
    blocks = len(cfg.vae_channels)
    return dict(in_channels=IMAGE_CHANNELS, out_channels=IMAGE_CHANNELS,
                down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                block_out_channels=tuple(cfg.vae_channels), layers_per_block=cfg.vae_layers_per_block,
                latent_channels=cfg.vae_latent_channels, norm_num_groups=cfg.vae_norm_groups,
                sample_size=cfg.image_size, mid_block_add_attention=cfg.vae_mid_attention)


def unet_config(cfg: SimpleNamespace, num_classes: int) -> dict[str, Any]:
    """The denoiser on the latents. A conditional model gets one class embedding more than there
    are classes: the last one is the "no class" label of classifier-free guidance."""
    blocks = len(cfg.unet_channels)
    return dict(sample_size=latent_size(cfg), in_channels=cfg.vae_latent_channels,
                out_channels=cfg.vae_latent_channels,
                down_block_types=("DownBlock2D",) * blocks, up_block_types=("UpBlock2D",) * blocks,
                block_out_channels=tuple(cfg.unet_channels), layers_per_block=cfg.unet_layers_per_block,
                norm_num_groups=cfg.unet_norm_groups, add_attention=cfg.unet_mid_attention,
                dropout=cfg.unet_dropout, num_class_embeds=num_classes + 1 if num_classes else None)


def build_vae(cfg: SimpleNamespace):
    from diffusers import AutoencoderKL
    return AutoencoderKL(**vae_config(cfg))


def build_unet(cfg: SimpleNamespace, num_classes: int):
    from diffusers import UNet2DModel
    return UNet2DModel(**unet_config(cfg, num_classes))


def noise_scheduler(cfg: SimpleNamespace):
    """The training noise schedule. No clipping: latents are not bounded to [-1, 1]. Trailing
    timestep spacing lets DDIM / DPM-Solver start from the last (pure-noise) step."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_start=cfg.beta_start,
                         beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False, timestep_spacing="trailing")


def sampling_scheduler(name: str, training_config: dict):
    """DDIM or DPM-Solver++ on the noise schedule the denoiser was trained with."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    if name == "ddim":
        return DDIMScheduler.from_config(training_config)
    if name == "dpmsolver":
        return DPMSolverMultistepScheduler.from_config(training_config, algorithm_type="dpmsolver++")
    raise ConfigError(f"scheduler {name!r} unknown; choose ddim or dpmsolver")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(cfg: SimpleNamespace, num_classes: int) -> dict[str, int]:
    """Parameters of both networks, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return {"vae": count_parameters(build_vae(cfg)), "unet": count_parameters(build_unet(cfg, num_classes))}


def check_architecture(cfg: SimpleNamespace) -> None:
    """Catch sizes diffusers would reject with an obscure message, naming the option at fault."""
    for name in ("vae_channels", "unet_channels"):
        widths = getattr(cfg, name)
        if not widths or any(w <= 0 for w in widths):
            raise ConfigError(f"{name} must be a non-empty list of positive widths, got {widths}")
    for widths, groups in (("vae_channels", "vae_norm_groups"), ("unet_channels", "unet_norm_groups")):
        bad = [w for w in getattr(cfg, widths) if w % getattr(cfg, groups)]
        if getattr(cfg, groups) <= 0 or bad:
            raise ConfigError(f"every width of {widths} {getattr(cfg, widths)} must be a multiple of "
                              f"{groups} = {getattr(cfg, groups)} (group normalisation)")
    down = 2 ** (len(cfg.vae_channels) - 1)
    if cfg.image_size <= 0 or cfg.image_size % down:
        raise ConfigError(f"image_size {cfg.image_size} must be a multiple of {down} "
                          f"(the autoencoder halves it {len(cfg.vae_channels) - 1} times)")
    unet_down = 2 ** (len(cfg.unet_channels) - 1)
    if latent_size(cfg) % unet_down:
        raise ConfigError(f"latent size {latent_size(cfg)} (image_size / {down}) must be a multiple of "
                          f"{unet_down} (the denoiser halves it {len(cfg.unet_channels) - 1} times)")


class PatchDiscriminator(nn.Module):
    """PatchGAN critic (Isola et al.): one realness score per overlapping patch of the image.

    Optional adversarial term of the autoencoder loss; diffusers has no such module. Group
    normalisation instead of batch normalisation: no running statistics to keep in step."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = IMAGE_CHANNELS):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False),
                       nn.GroupNorm(min(32, out // 4) or 1, out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class AutoencoderPass(nn.Module):
    """One training pass of the autoencoder as a single ``forward``: encode, sample the posterior
    with the given unit noise, decode. DistributedDataParallel synchronises the gradients of what
    runs through ``forward`` only, and AutoencoderKL's own forward draws its noise itself; here the
    caller draws it (the same numbers for an image whatever the number of processes)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(posterior parameters: mean and log-variance stacked on dim 1, reconstruction)."""
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)  # = posterior.sample()
        return posterior.parameters, self.vae.decode(latents).sample


# ----------------------------------------------------------------------------------------------
# SSIM (differentiable, gaussian window) for the autoencoder loss
# ----------------------------------------------------------------------------------------------

def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window_size: int = 11,
         sigma: float = 1.5, reduction: str = "mean") -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of two NxCxHxW batches, gaussian 11x11 window.

    Computed in float32 over the 'valid' part of the image (no padding). ``data_range`` is the
    span of the values: 2 for images in [-1, 1]. reduction "none" gives one value per image.
    """
    x, y = x.float(), y.float()
    channels = x.shape[1]
    size = min(window_size, x.shape[-1], x.shape[-2])
    window = _gaussian_window(size, sigma, channels, x.device, x.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(t):
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    per_image = ssim_map.flatten(1).mean(1)
    return per_image if reduction == "none" else per_image.mean()


# ----------------------------------------------------------------------------------------------
# latents, sampling, images
# ----------------------------------------------------------------------------------------------

def latent_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of the training latents, so that the denoiser sees unit-variance data (LDM, §4.3.2)."""
    std = float(latents.float().std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"training latents have std {std}: the autoencoder is degenerate")
    return 1.0 / std


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Nx1xHxW in [-1, 1] -> uint8 NxHxW."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].cpu().numpy()


@torch.no_grad()
def generate(unet, vae, scheduler, noise: torch.Tensor, labels: torch.Tensor | None, null_label: int | None,
             guidance_scale: float, num_steps: int, scaling_factor: float, amp_dtype: torch.dtype | None,
             progress: bool = False) -> np.ndarray:
    """Denoise ``noise`` (latent-shaped, unit variance) in ``num_steps`` and decode to uint8 images.

    With ``labels`` and a guidance scale other than 1, classifier-free guidance: the conditional and
    the "no class" predictions are made in one batch and mixed as u + s (c - u).
    """
    from tqdm import tqdm

    device = noise.device
    scheduler.set_timesteps(num_steps, device=device)
    latents = noise * scheduler.init_noise_sigma
    guided = labels is not None and guidance_scale != 1.0
    for t in tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False):
        model_input = scheduler.scale_model_input(latents, t)
        if guided:
            both = torch.cat([labels, torch.full_like(labels, null_label)])
            with autocast(device, amp_dtype):
                out = unet(torch.cat([model_input, model_input]), t, class_labels=both).sample.float()
            conditional, unconditional = out.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        else:
            with autocast(device, amp_dtype):
                prediction = unet(model_input, t, class_labels=labels).sample.float()
        latents = scheduler.step(prediction, t, latents).prev_sample
    with autocast(device, amp_dtype):
        images = vae.decode(latents / scaling_factor).sample
    return to_uint8(images)


# ----------------------------------------------------------------------------------------------
# memorisation: distance of each sample to its nearest training image
# ----------------------------------------------------------------------------------------------

def _standardised(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), -1).astype(np.float64)
    flat -= flat.mean(1, keepdims=True)
    return flat / (flat.std(1, keepdims=True) + 1e-8)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalised L2 between standardised rows: sqrt(mean((a - b)^2)) = sqrt(2 (1 - correlation)),
    0 for the same image up to brightness and contrast, about 1.4 for unrelated ones."""
    d2 = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0) / a.shape[1])


def nearest_training_images(samples: np.ndarray, training: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each sample (uint8 NxHxW, same size as ``training`` MxHxW): the distance to the nearest
    training image or its mirror image (training used horizontal flips) and that image's index."""
    references = _standardised(np.concatenate([training, training[:, :, ::-1]]))
    d = _distances(_standardised(samples), references)
    nearest = d.argmin(1)
    return d[np.arange(len(samples)), nearest], nearest % len(training)


def typical_training_distance(training: np.ndarray) -> float:
    """Median over training images of the distance to the nearest *other* training image (or its
    mirror): how far apart two real images typically are. NaN with fewer than two images."""
    m = len(training)
    if m < 2:
        return float("nan")
    std = _standardised(training)
    d = _distances(std, np.concatenate([std, _standardised(training[:, :, ::-1])]))
    d[np.arange(m), np.arange(m)] = np.inf
    d[np.arange(m), np.arange(m) + m] = np.inf
    return float(np.median(d.min(1)))


# ----------------------------------------------------------------------------------------------
# the run folder
# ----------------------------------------------------------------------------------------------

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained writes


def save_model(model, folder: Path) -> None:
    """``model.save_pretrained(folder)``, each file replaced atomically.

    save_pretrained writes in place, so a crash while it writes would leave half a weights file
    in the run. Here it writes into a temporary folder beside ``folder`` and each file is then
    renamed over its old version: a reader sees the old weights or the new ones, never a mix of
    bytes (the config never changes during a run).
    """
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        folder.mkdir(exist_ok=True)
        for path in sorted(tmp.iterdir()):
            with path.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(kind: str, folder: Path, what: str):
    """AutoencoderKL (kind "vae") or UNet2DModel ("unet") from a folder written by :func:`save_model`.

    Unlike ``from_pretrained``, which quietly leaves weights it cannot match at their random
    initial values, every weight must be there with its shape: a truncated file, a file of another
    network or of another width is a CheckpointError that says what was expected.
    """
    from diffusers import AutoencoderKL, UNet2DModel
    from safetensors.torch import load_file

    cls = {"vae": AutoencoderKL, "unet": UNet2DModel}[kind]
    expected = f"expected the {what} that train_ldm.py saves there ({cls.__name__}: config.json and {WEIGHTS_FILE})"
    if not (folder / "config.json").is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder} is incomplete (config.json or {WEIGHTS_FILE} missing); {expected}")
    try:
        config = cls.load_config(folder)
        model = cls.from_config(config)
    except Exception as error:  # diffusers raises OSError, ValueError, TypeError... for a foreign config
        raise CheckpointError(f"cannot build a {cls.__name__} from {folder / 'config.json'}: {error}; "
                              f"{expected}") from None
    try:
        weights = load_file(folder / WEIGHTS_FILE)
    except Exception as error:  # safetensors' own error type for truncated or foreign bytes
        raise CheckpointError(f"cannot read {folder / WEIGHTS_FILE}: {error} (truncated?); {expected}") from None
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    resized = sorted(k for k in own.keys() & weights.keys() if own[k].shape != weights[k].shape)
    if missing or unexpected or resized:
        found = "; ".join(f"{len(names)} {label}, e.g. {names[0]}" for label, names in
                          (("weights missing", missing), ("unknown weights", unexpected),
                           ("weights of another shape", resized)) if names)
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not fit the network of {folder / 'config.json'} "
                              f"({found}): another architecture or width; {expected}")
    model.load_state_dict(weights)
    return model


def write_run_info(run_dir: Path, info: dict) -> None:
    """Write ldm.json through a temporary file and a rename: a crash never leaves half a file."""
    tmp = run_dir / f".{RUN_INFO}.tmp"
    try:
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, run_dir / RUN_INFO)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_run_info(run_dir: Path) -> dict:
    path = run_dir / RUN_INFO
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error} (truncated?); expected the JSON run description "
                              f"that train_ldm.py writes (kind {KIND!r})") from None
    if not isinstance(info, dict) or info.get("kind") != KIND:
        found = info.get("kind") if isinstance(info, dict) else None
        raise CheckpointError(f"{path} does not describe a train_ldm.py run (kind={found!r}, expected {KIND!r})")
    return info


def open_run(path: str | Path, need_denoiser: bool = True) -> dict:
    """Check that ``path`` is a run folder of train_ldm.py and return its ldm.json.

    Anything else (a segmenter checkpoint file written by train.py, an empty folder, a run whose
    diffusion stage has not saved yet) gets one error that says what was expected.
    """
    path = Path(path)
    expected = (f"expected the run folder written by train_ldm.py (holding {RUN_INFO}, {VAE_DIR}/ "
                f"and {EMA_DIR}/), e.g. runs/ldm_busi_1")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}; {expected}")
    if path.is_file():
        found = None
        try:
            found = load_checkpoint(path).get("kind")
            what = f"a {found!r} checkpoint file" if found else "a checkpoint file"
        except (CheckpointError, AttributeError):
            what = "a file"
        if found == "mgcc-segmenter":
            what += " (a segmenter written by train.py)"
        raise CheckpointError(f"{path} is {what}, not a latent diffusion model; {expected}")
    if not (path / RUN_INFO).is_file():
        raise CheckpointError(f"{path} is not a train_ldm.py run folder (no {RUN_INFO}); {expected}")
    info = read_run_info(path)
    if not (path / VAE_DIR).is_dir() or not info.get("vae_step"):
        raise CheckpointError(f"run {path} has no trained autoencoder yet ({VAE_DIR}/ missing): "
                              "train it with train_ldm.py --stage vae or --stage all")
    if need_denoiser and (not (path / EMA_DIR).is_dir() or not info.get("diffusion_step")
                          or info.get("latent_scaling_factor") is None):
        raise CheckpointError(f"run {path} has no trained denoiser yet ({EMA_DIR}/ missing): "
                              "train it with train_ldm.py --stage diffusion (or --stage all)")
    return info


def load_sampling_models(run_dir: Path, info: dict):
    """The autoencoder, the EMA denoiser and the training noise schedule's config of a run that
    :func:`open_run` accepted, checked against its ldm.json: (vae, unet, schedule config)."""
    from diffusers import DDPMScheduler

    vae = load_model("vae", run_dir / VAE_DIR, "autoencoder")
    unet = load_model("unet", run_dir / EMA_DIR, "EMA denoiser")
    classes = len(info["class_names"])
    found = {"autoencoder latent channels": (vae.config.latent_channels, info["latent_channels"]),
             "denoiser input channels": (unet.config.in_channels, info["latent_channels"]),
             "denoiser input size": (unet.config.sample_size, info["latent_size"]),
             "denoiser class embeddings": (unet.config.num_class_embeds, classes + 1 if classes else None)}
    wrong = [f"{name} {got} (ldm.json implies {want})" for name, (got, want) in found.items() if got != want]
    if wrong:
        raise CheckpointError(f"the networks in {run_dir} do not match its {RUN_INFO}: {'; '.join(wrong)}; "
                              "expected the vae/ and unet_ema/ that train_ldm.py saved with it")
    try:
        schedule = DDPMScheduler.from_pretrained(run_dir / SCHEDULER_DIR).config
    except Exception as error:  # diffusers raises OSError / ValueError for missing or broken files
        raise CheckpointError(f"cannot read the noise schedule in {run_dir / SCHEDULER_DIR}: {error}; expected "
                              "the scheduler_config.json that train_ldm.py saves there") from None
    return vae, unet, schedule


def class_for_sampling(requested: str, class_names: Sequence[str]) -> int | None:
    """Label index for ``--class NAME``; None for ``all``. Unknown names are a ConfigError."""
    if requested == "all":
        return None
    if not class_names:
        raise ConfigError(f"--class {requested}: this model is unconditional (trained without classes); "
                          "use --class all")
    if requested not in class_names:
        raise ConfigError(f"--class {requested!r} unknown: the model knows {', '.join(class_names)} (or all)")
    return list(class_names).index(requested)
