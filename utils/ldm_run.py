"""The run folder of stage 1: its layout, its description file ``ldm.json``, and the networks
saved in it, written atomically and read back with every weight checked.

A run folder written by train_ldm.py::

    <run>/config.yaml            resolved options of the run
    <run>/ldm.json               kind "mgcc-ldm", sizes, latent scaling factor, classes, data, ids
    <run>/vae/                   AutoencoderKL.save_pretrained
    <run>/unet/, <run>/unet_ema/ UNet2DModel.save_pretrained (raw and EMA weights)
    <run>/scheduler/             DDPMScheduler.save_pretrained (the training noise schedule)
    <run>/state_vae.pt, <run>/state_diffusion.pt   everything --resume needs (atomic_save)
    <run>/vae_metrics.json       the autoencoder's PSNR and SSIM on the split's validation images
    <run>/previews/*.png, <run>/losses_*.png|csv    what people look at
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from utils.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint

KIND = "mgcc-ldm"
RUN_INFO = "ldm.json"
VAE_DIR, UNET_DIR, EMA_DIR, SCHEDULER_DIR = "vae", "unet", "unet_ema", "scheduler"
VAE_STATE, DIFFUSION_STATE = "state_vae.pt", "state_diffusion.pt"
VAE_METRICS = "vae_metrics.json"
PREVIEW_DIR = "previews"


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


def write_json(path: Path, data: dict) -> None:
    """Write a JSON file through a temporary file and a rename: a crash never leaves half a file."""
    tmp = path.parent / f".{path.name}.tmp"
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_run_info(run_dir: Path, info: dict) -> None:
    write_json(run_dir / RUN_INFO, info)


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
        except UnsafeCheckpointError:
            raise
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
