"""The run folder of stage 1: its layout, its description file ``ldm.json``, the networks saved in
it (written atomically, read back with every weight checked), what a command means for it
(:func:`prepare_run`: a new run, a continued one, a diffusion stage started over; nothing written
before the settings and the data are checked) and :class:`LdmStage`, the training skeleton both
stages of train_ldm.py share (utils.training.Trainer with the run folder's state files).

A run folder written by train_ldm.py::

    <run>/config.yaml            resolved options of the run
    <run>/ldm.json               kind "mgcc-ldm", sizes, latent scaling factor, classes, data, ids
    <run>/vae/                   AutoencoderKL.save_pretrained
    <run>/unet/, <run>/unet_ema/ UNet2DModel.save_pretrained (raw and EMA weights)
    <run>/scheduler/             DDPMScheduler.save_pretrained (the training noise schedule)
    <run>/state_vae.pt, <run>/state_diffusion.pt   everything --resume needs (atomic_save)
    <run>/vae_metrics.json       the autoencoder's PSNR and SSIM on the split's validation images
    <run>/previews/*.png, <run>/losses_*.png|csv    what people look at
    <run>/tensorboard/vae/, <run>/tensorboard/diffusion/   the same in TensorBoard (--no-tensorboard: none)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

from dataloaders.io import check_outside_data, dataset_name
from dataloaders.provenance import RUN_INFO
from generation.data import LabeledSelection, load_training_set
from networks.ldm import IMAGE_CHANNELS, condition_channels, latent_size
from utils.checkpoint import CheckpointError, UnsafeCheckpointError, check_finite, load_checkpoint, retyped
from utils import distributed
from utils.config import ConfigError, file_values, read_yaml, save_yaml
from utils.files import atomic_write_text, remove_stale_temporaries, write_error
from generation.config import DIFFUSION_KEYS, OPTIONS, absolute_paths, check_values, merged_config
from utils.locks import LOCK_NAME, hold, holds_files
from utils.runtime import autocast_dtype
from utils.tensorboard import LOG_DIR
from utils.training import Trainer, TrainingState

KIND = "mgcc-ldm"
VAE_DIR, UNET_DIR, EMA_DIR, SCHEDULER_DIR = "vae", "unet", "unet_ema", "scheduler"
VAE_STATE, DIFFUSION_STATE = "state_vae.pt", "state_diffusion.pt"
VAE_METRICS = "vae_metrics.json"
PREVIEW_DIR = "previews"
# each stage's state file (for --resume) and the kind recorded in it
STATE_FILES = {"vae": (VAE_STATE, "mgcc-ldm-vae-state"), "diffusion": (DIFFUSION_STATE, "mgcc-ldm-diffusion-state")}



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
    except (OSError, RuntimeError) as error:  # a full disk, a read-only folder: the old weights stay
        raise write_error(folder, error) from None
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
    other_dtype = sorted(retyped(own, weights))  # load_state_dict would cast them silently
    if missing or unexpected or resized or other_dtype:
        found = "; ".join(f"{len(names)} {label}, e.g. {names[0]}" for label, names in
                          (("weights missing", missing), ("unknown weights", unexpected),
                           ("weights of another shape", resized), ("weights of another dtype", other_dtype)) if names)
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not fit the network of {folder / 'config.json'} "
                              f"({found}): another architecture or width; {expected}")
    check_finite(weights, folder / WEIGHTS_FILE, f"{what} weights")  # NaN weights sample black images
    model.load_state_dict(weights)
    return model


def write_json(path: Path, data: dict) -> None:
    """Write a JSON file atomically (utils.files): a crash or a full disk never leaves half a file."""
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


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
    ids = info.get("train_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        found = type(ids).__name__ if not isinstance(ids, list) else "a list holding non-strings"
        raise CheckpointError(f"{path}: train_ids is {found}, where train_ldm.py writes the list of the ids it trained "
                              "on (a damaged or edited file)")
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
    extra = condition_channels(SimpleNamespace(conditioning=run_conditioning(info)))
    found = {"autoencoder latent channels": (vae.config.latent_channels, info["latent_channels"]),
             "denoiser input channels": (unet.config.in_channels, info["latent_channels"] + extra),
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


# ----------------------------------------------------------------------------------------------
# what a command means for the run folder: new, continued, its diffusion stage started over
# ----------------------------------------------------------------------------------------------

def run_folder(cfg: SimpleNamespace) -> Path:
    """The run folder (--out-dir, else runs/ldm_<dataset>_<split>); the data paths made absolute in ``cfg``."""
    cfg.data_dir = absolute_paths({"data_dir": cfg.data_dir})["data_dir"]
    cfg.class_csv = absolute_paths({"class_csv": cfg.class_csv})["class_csv"]
    if cfg.out_dir is None:
        if cfg.data_dir is None:
            raise ConfigError("give --out-dir (the run folder) or --data-dir (to name it runs/ldm_<dataset>_<split>)")
        cfg.out_dir = f"runs/ldm_{dataset_name(cfg.data_dir)}_{cfg.split}"
    return Path(cfg.out_dir)


def load_data(cfg: SimpleNamespace):
    if cfg.data_dir is None:
        raise ConfigError("give --data-dir (the dataset folder whose training images the model learns)")
    class_names = cfg.class_names if cfg.class_conditioning else []
    class_csv = cfg.class_csv if cfg.class_conditioning else None
    # class names from a config file apply only where the ids carry them; --class-names must (class_labels)
    labeled = (LabeledSelection(cfg.labeled_fraction, cfg.labeled_list, cfg.mask_values)
               if cfg.conditioning == "mask" else None)
    return load_training_set(cfg.data_dir, cfg.split, class_names, class_csv, progress=cfg.progress,
                             split_name=cfg.split_name, holdout=cfg.holdout,
                             names_given="class_names" in getattr(cfg, "explicit", ()), labeled=labeled)


def new_run_info(cfg: SimpleNamespace, data) -> dict:
    counts = [data.labels.count(k) for k in range(len(data.class_names))] if data.labels is not None else []
    return {"kind": KIND, "version": 1, "image_size": cfg.image_size, "channels": IMAGE_CHANNELS,
            "latent_channels": cfg.vae_latent_channels, "latent_size": latent_size(cfg),
            "latent_scaling_factor": None, "class_names": data.class_names, "class_counts": counts,
            "data_dir": str(Path(cfg.data_dir).resolve()), "split": cfg.split,
            "train_file": str(data.train_file), "val_file": str(data.val_file) if data.val_file else None,
            "train_ids": data.ids, "vae_step": 0, "diffusion_step": 0, **conditioning_info(cfg, data)}


def conditioning_info(cfg: SimpleNamespace, data) -> dict:
    """What ldm.json records of the denoiser's conditioning: "none", or "mask" with the ids whose masks it
    learns from (``mask_ids``, a subset of ``train_ids``: the leak checks read train_ids), their classes
    (``mask_labels``, indices into class_names, or None: sample_ldm.py makes pair n in its mask's class) and how
    masks are read."""
    if cfg.conditioning != "mask":
        return {"conditioning": "none"}
    return {"conditioning": "mask", "mask_ids": data.mask_ids, "mask_labels": data.mask_labels,
            "mask_values": cfg.mask_values}


def run_conditioning(info: dict) -> str:
    """A run's conditioning; runs written before it was recorded are unconditional by mask."""
    return info.get("conditioning", "none")


def remove_diffusion_outputs(run_dir: Path, info: dict) -> None:
    for name in (UNET_DIR, EMA_DIR, SCHEDULER_DIR):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    shutil.rmtree(run_dir / LOG_DIR / "diffusion", ignore_errors=True)
    for path in [run_dir / DIFFUSION_STATE, run_dir / "losses_diffusion.csv", run_dir / "losses_diffusion.png",
                 *(run_dir / PREVIEW_DIR).glob("diffusion_*.png")]:
        path.unlink(missing_ok=True)
    info.update(diffusion_step=0, latent_scaling_factor=None)
    write_run_info(run_dir, info)


def claim_out_dir(cfg: SimpleNamespace, run_dir: Path) -> bool:
    """Hold --out-dir for this process (one writer) and refuse a folder of anything but a train_ldm.py
    run; True when it holds one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out-dir {run_dir} is a file, not a folder")
    check_outside_data(run_dir, cfg.data_dir)
    hold(run_dir, "run folder")  # one writer: a second train_ldm.py into this folder is refused here
    remove_stale_temporaries(run_dir)  # a state file's write cut short by kill -9
    is_run = (run_dir / RUN_INFO).is_file()
    if run_dir.is_dir() and holds_files(run_dir) and not is_run:
        segmenter = " (it holds checkpoint_last.pt: a segmenter run of train.py?)" \
            if (run_dir / "checkpoint_last.pt").exists() else ""
        raise ConfigError(f"--out-dir {run_dir} exists and is not a train_ldm.py run folder (no {RUN_INFO})"
                          f"{segmenter}; " + ("--resume continues a run folder of train_ldm.py" if cfg.resume
                                             else "choose another folder (nothing was changed)"))
    return is_run


def start_run(cfg: SimpleNamespace, run_dir: Path):
    """A new run folder, once the data are checked: (cfg, its ldm.json dict, the training set)."""
    data = load_data(cfg)
    for entry in run_dir.iterdir() if run_dir.exists() else ():  # all but the lock this writer holds
        if entry.name != LOCK_NAME:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    info = new_run_info(cfg, data)
    save_config(cfg, run_dir, info)
    return cfg, info, data


def check_steps_done(cfg: SimpleNamespace, vae_step: int, diffusion_step: int, has_diffusion: bool) -> None:
    """The steps a continued run has done must fit the steps asked for, stage by stage."""
    if cfg.vae_steps < vae_step:
        raise ConfigError(f"the run's autoencoder has trained {vae_step} steps, more than --vae-steps {cfg.vae_steps}")
    if cfg.diffusion_steps < diffusion_step:
        raise ConfigError(f"the run's denoiser has trained {diffusion_step} steps, more than "
                          f"--diffusion-steps {cfg.diffusion_steps}")
    if cfg.stage == "diffusion" and vae_step < cfg.vae_steps:
        raise ConfigError(f"the run's autoencoder has trained {vae_step} of {cfg.vae_steps} steps: "
                          "finish it first with --stage vae --resume (or --stage all --resume)")
    if cfg.stage != "diffusion" and vae_step < cfg.vae_steps and has_diffusion:
        raise ConfigError(f"the run's denoiser was trained on the latents of its autoencoder at step {vae_step}; "
                          "training the autoencoder further would invalidate it (use --overwrite to start over)")


def prepare_run(cfg: SimpleNamespace, run_dir: Path, world_size: int = 1):
    """Decide what the command means for the run folder; return (cfg, ldm.json dict, training set).

    Nothing is written or deleted before the configuration and the data have been checked. Under
    torchrun rank 0 alone calls this (see utils.distributed.on_main_rank).
    """
    is_run = claim_out_dir(cfg, run_dir)
    wants_diffusion = cfg.stage in ("diffusion", "all")
    if is_run:
        info = read_run_info(run_dir)
        has_diffusion = (run_dir / DIFFUSION_STATE).is_file()
        if cfg.overwrite and cfg.stage != "diffusion":
            is_run = False  # started over below, once the data are checked
        elif not cfg.resume and not cfg.overwrite and not (cfg.stage == "diffusion" and not has_diffusion):
            raise ConfigError(f"{run_dir} already holds a run; give --resume to continue it or "
                              "--overwrite to start it over")
    if not is_run:
        if cfg.resume:
            raise ConfigError(f"--resume: there is no run to continue in {run_dir}")
        if cfg.stage == "diffusion":
            raise ConfigError(f"--stage diffusion needs a run folder with a trained autoencoder and "
                              f"{run_dir} holds none: train it with --stage vae first, or use --stage all")
        return start_run(cfg, run_dir)

    fresh_diffusion = wants_diffusion and (cfg.overwrite or not has_diffusion)
    check_config_unedited(run_dir, info)
    cfg = merged_config(cfg, run_dir, DIFFUSION_KEYS if fresh_diffusion else set())
    check_values(cfg, world_size)
    check_steps_done(cfg, info["vae_step"], 0 if fresh_diffusion else info["diffusion_step"], has_diffusion)
    data = load_data(cfg)
    if data.ids != info["train_ids"]:
        raise ConfigError(f"the training list {data.train_file} changed since the run in {run_dir} started; "
                          "a continued run must learn from the same images")
    info["data_dir"] = cfg.data_dir  # where the memorisation check of sample_ldm.py finds the images
    if fresh_diffusion:  # classes and masks matter to the denoiser only, which starts afresh here
        fresh = new_run_info(cfg, data)
        info.update(class_names=fresh["class_names"], class_counts=fresh["class_counts"])
        for key in ("mask_ids", "mask_labels", "mask_values"):
            info.pop(key, None)
        info.update(conditioning_info(cfg, data))
    elif data.class_names != info["class_names"]:
        raise ConfigError(f"the classes of the training images changed since the run in {run_dir} started "
                          f"({info['class_names']} then, {data.class_names} now)")
    elif data.mask_ids != info.get("mask_ids", []):
        raise ConfigError(f"the labeled images whose masks the denoiser learns from changed since the run in "
                          f"{run_dir} started ({len(info.get('mask_ids', []))} then, {len(data.mask_ids)} now); a "
                          "continued run must learn from the same pairs")
    if cfg.overwrite:
        remove_diffusion_outputs(run_dir, info)
    save_config(cfg, run_dir, info)
    return cfg, info, data


def save_config(cfg: SimpleNamespace, run_dir: Path, info: dict) -> None:
    """config.yaml, and its values in ldm.json too: the record a hand edit of config.yaml is found by."""
    info["config"] = file_values(cfg, OPTIONS)
    save_yaml(info["config"], run_dir / "config.yaml")
    write_run_info(run_dir, info)


def check_config_unedited(run_dir: Path, info: dict) -> None:
    """Refuse a config.yaml edited since the run wrote it (as train.py does): --resume continues a run with
    the options it has, and changes only those given as flags (FREE_KEYS, a fresh stage's); an edited
    architecture gave a traceback on loading its weights. Runs older than the record are not checked."""
    recorded = info.get("config")
    if not isinstance(recorded, dict):
        return
    path = run_dir / "config.yaml"
    if not path.is_file():
        return  # merged_config names it
    written = absolute_paths(read_yaml(path, OPTIONS))
    recorded = absolute_paths({k: v for k, v in recorded.items() if k in {o.name for o in OPTIONS}})
    edited = [f"{k}: {written.get(k)!r} in config.yaml, {v!r} in the run" for k, v in sorted(recorded.items())
              if written.get(k) != v]
    if edited:
        raise ConfigError(f"{path} was edited after the run wrote it ({'; '.join(edited[:4])}): --resume continues "
                          f"the run with the options it has (recorded in {RUN_INFO}); undo the edit, give a flag for "
                          "what a continued run may change (e.g. --vae-steps, --diffusion-steps), or start a new run "
                          "(--config <the edited file> --out-dir <another folder>)")


def read_state(path: Path, kind: str, what: str):
    """The state file --resume continues from, or None before the stage's first checkpoint."""
    if not path.is_file():
        return None
    try:
        return load_checkpoint(path, kind)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; expected the {what} training state that train_ldm.py writes there "
                              f"(kind {kind!r}). The run cannot continue from it: start the stage over with "
                              "--overwrite, or use another --out-dir") from None


# ----------------------------------------------------------------------------------------------
# the training skeleton of both stages
# ----------------------------------------------------------------------------------------------

class LdmStage(Trainer):
    """The skeleton both stages share (utils.training.Trainer): the state file --resume continues
    from, the loss records (losses_<stage>.csv and .png), previews every sample_every steps, and at
    each checkpoint the stage's networks (diffusers save_pretrained) and ldm.json. A stage is
    ``stage = Stage(...)``; nothing to do when ``stage.finished()``; else ``stage.setup(data)``
    (builds the networks, then ``register`` restores what the state file holds) and ``stage.train()``.
    """
    name = ""  # "vae" or "diffusion"
    panels: dict[str, dict[str, str]] = {}  # the loss plot: {panel title: {curve label: loss name}}
    advice = ". A lower learning rate or --grad-clip needs a new run (--overwrite)"
    eval_reads_losses = False  # a preview is no evaluation of the losses: losses are read every log_every
    # under torchrun the ranks agree on a stop at the loss readings (every log_every steps), not with an
    # all-reduce read back every step: the step never waits for the device
    agree_every_step = False

    def __init__(self, total: int, cfg: SimpleNamespace, run_dir: Path, info: dict, ctx, device, stop):
        state_file, kind = STATE_FILES[self.name]
        self.saved = read_state(run_dir / state_file, kind, self.what)
        super().__init__(total, self.saved["step"] if self.saved else 0, ctx, device, stop, TrainingState(), kind,
                         run_dir / state_file, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                         eval_every=cfg.sample_every, progress=cfg.progress,
                         history=self.saved["history"] if self.saved else None,
                         # one TensorBoard run per stage: each counts its own steps and purges its own on resume
                         board_dir=run_dir / LOG_DIR / self.name if cfg.tensorboard else None)
        self.board_prefix = self.what
        self.cfg, self.run_dir, self.info = cfg, run_dir, info
        self.amp_dtype = autocast_dtype(cfg.precision, device)

    def finished(self) -> bool:
        """True (and said) when the stage has already trained its steps."""
        if self.start >= self.total and self.ctx.is_main:
            print(f"{self.what}: already trained for {self.start} steps")
        return self.start >= self.total

    def register(self, **parts) -> None:
        """What the state file holds, under these names; restored (with the RNG) when the stage is continued."""
        self.state = TrainingState(**parts)
        self.restore(self.saved)
        if self.saved and self.ctx.is_main:
            print(f"{self.what}: resuming at step {self.start} of {self.total}")

    def checkpoint_extra(self, done: int) -> dict:
        self.info[f"{self.name}_step"] = done
        return {"step": done, "history": self.losses.history}

    def on_checkpoint(self, done: int) -> None:
        self.save_models()
        write_run_info(self.run_dir, self.info)
        self.losses.write(self.run_dir / f"losses_{self.name}.csv", self.run_dir / f"losses_{self.name}.png",
                          f"{self.what} training losses", self.panels)

    def on_eval(self, done: int) -> None:
        if self.ctx.is_main and self.cfg.preview_images > 0:
            self.save_preview(done)

    def board_scalars(self, done: int) -> dict[str, float]:
        return {"lr": float(self.schedule.get_last_lr()[0])}

    def train(self) -> int:
        """Train the remaining steps; 0, or 128 + the signal number when a signal stopped the stage."""
        if self.ctx.is_main:
            (self.run_dir / PREVIEW_DIR).mkdir(exist_ok=True)
        finished = self.run(self.what)
        distributed.barrier()  # rank 0 has written this stage's models before any rank reads them
        if not finished:
            stage = self.name if self.cfg.stage == self.name else "all"
            return self.stopped("train_ldm.py", "--out-dir", str(self.run_dir), "--stage", stage, who=self.what)
        self.report_speed(self.what)
        return 0
