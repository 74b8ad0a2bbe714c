"""Careless and hostile use, the fourth round (issue 33): each case is one clear error naming the file or
value and what to do, or correct behaviour; nothing lost, half-written or followed out of its folder."""
from __future__ import annotations

import json
import os
import re
import signal
import stat

import numpy as np
import pytest
import torch

from conftest import write_dataset
from dataloaders.io import DataError
from dataloaders.splits import load_run_data
from test_data import generated_folder, leaky_samples
from utils.checkpoint import CheckpointError


# --- 1. a link does not hide a generator's manifest --------------------------------------------------

@pytest.mark.parametrize("target", ["images", ""])
def test_a_link_to_leaky_samples_is_refused_as_their_real_path_is(dataset, tmp_path, target):
    synth = leaky_samples(dataset, tmp_path)
    link = tmp_path / "innocent"
    link.symlink_to(synth / target if target else synth)
    with pytest.raises(DataError, match="a generator trained on 3 of the 3 val ids"):
        load_run_data(dataset, 2, unlabeled_dirs=[link])


# --- 3, 4. predict.py replaces its own output folder as a whole, and nothing else ---------------------

def predict_case(tmp_path):
    from test_hostile_output import segmenter_checkpoint
    data = write_dataset(tmp_path / "pe", n=4, splits=False)
    return data, segmenter_checkpoint(tmp_path / "model.pt")


def predict_into(data, checkpoint, out, *extra):
    import predict
    return predict.main(["--checkpoint", str(checkpoint), "--input-dir", str(data), "--masks-dir",
                         str(data / "masks" / "0"), "--output-dir", str(out), "--num-workers", "0", "--no-progress",
                         "--batch-size", "1", *map(str, extra)])


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("run_files", [["checkpoint_last.pt", "config.yaml", "metrics.json"], ["metrics.json"]])
def test_predict_never_writes_into_a_training_run_folder(tmp_path, run_files):
    data, checkpoint = predict_case(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    for name in run_files:
        (run / name).write_text(json.dumps({"selected_iteration": 40, "val": {"dice": 0.8}}))
    before = tree(run)
    with pytest.raises(DataError, match=rf"--output-dir {run} holds files predict.py does not write \(.*\): .*"
                                        rf"choose a new or empty --output-dir \(e.g. {run}/predictions\)"):
        predict_into(data, checkpoint, run)  # was: the run's metrics.json replaced, exit 0
    assert tree(run) == before and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert predict_into(data, checkpoint, run / "predictions") == 0  # inside it, a folder of its own


@pytest.mark.slow
def test_a_rerun_replaces_the_output_folder_as_a_whole(tmp_path):
    data, checkpoint = predict_case(tmp_path)
    out = tmp_path / "out"
    assert predict_into(data, checkpoint, out) == 0
    assert len(list((out / "masks").iterdir())) == 4
    ids = tmp_path / "ids.txt"
    ids.write_text("benign (1)\nmalignant (2)\n")
    assert predict_into(data, checkpoint, out, "--ids", ids, "--no-overlays") == 0
    # was: the other two masks, all four overlays and their metrics left beside the new ones
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["benign (1).png", "malignant (2).png"]
    assert not (out / "overlays").exists() and json.loads((out / "metrics.json").read_text())["images"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_a_signal_while_predicting_leaves_the_previous_folder_and_says_so(tmp_path, monkeypatch, capsys):
    import predict
    data, checkpoint = predict_case(tmp_path)
    out = tmp_path / "out"
    assert predict_into(data, checkpoint, out) == 0
    before = tree(out)
    real_save = predict.save_image
    written = []

    def save_then_signal(path, image):
        real_save(path, image)
        written.append(path)
        if len(written) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a scheduler's preemption would

    monkeypatch.setattr(predict, "save_image", save_then_signal)
    with pytest.raises(SystemExit) as stopped:
        predict_into(data, checkpoint, out, "--threshold", "0.9")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert f"stopped by SIGTERM: nothing was written to {out}; its previous contents" in capsys.readouterr().err
    assert tree(out) == before and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- 13. files written atomically get the mode a plain write gives --------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_files_and_staged_folders_get_the_umask_mode(tmp_path, mask):
    from utils.files import atomic_write_text, make_temp_dir
    previous = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        (tmp_path / "plain.json").write_text("{}")
        folder = make_temp_dir(tmp_path, ".x.")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask  # was 0600 whatever the umask
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)
    assert stat.S_IMODE(folder.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o777 & ~mask


@pytest.mark.slow
def test_predict_outputs_are_readable_by_the_group_with_umask_022(tmp_path):
    data, checkpoint = predict_case(tmp_path)
    previous = os.umask(0o022)
    try:
        assert predict_into(data, checkpoint, tmp_path / "out") == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert modes == {0o644}


# --- 5. weights of another dtype are refused, not cast ------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.float64])
def test_predict_refuses_weights_of_another_dtype(tmp_path, dtype):
    from test_hostile_output import MODEL_ARGS, segmenter_checkpoint
    from networks.mgcc import MGCCNet
    data = write_dataset(tmp_path / "pe", n=2, splits=False)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in MGCCNet(**MODEL_ARGS).state_dict().items()}
    checkpoint = segmenter_checkpoint(tmp_path / "cast.pt", model=state)
    with pytest.raises(CheckpointError, match=rf"cast.pt: \d+ of its weights are not of the network's dtype, e.g. "
                                              rf"\S+ is {dtype}, expected torch.float32"):
        predict_into(data, checkpoint, tmp_path / "out")  # was: int64 IoU 0.0000, exit 0; complex64 a warning
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_official_state_dict_of_another_dtype_is_refused(tmp_path):
    from reference_weights import official_reference_state_dict
    data = write_dataset(tmp_path / "pe", n=2, splits=False)
    state = {k: v.long() if v.is_floating_point() else v for k, v in official_reference_state_dict().items()}
    torch.save(state, tmp_path / "official.pt")
    with pytest.raises(CheckpointError, match="official.pt: .* of its weights are not of the network's dtype"):
        predict_into(data, tmp_path / "official.pt", tmp_path / "out")


def test_a_resumed_or_sampled_network_of_another_dtype_is_refused(tmp_path):
    from diffusers import UNet2DModel
    from networks.mgcc import MGCCNet
    from test_hostile_output import MODEL_ARGS
    from utils.checkpoint import weights_misfit
    from generation.run import load_model, save_model

    expected = MGCCNet(**MODEL_ARGS).state_dict()
    assert weights_misfit(expected, expected) == []
    misfit = weights_misfit(expected, {k: v.long() if v.is_floating_point() else v for k, v in expected.items()})
    assert misfit and all(", expected torch.float32" in m for m in misfit)  # train.py --resume refuses on these
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 4), layers_per_block=1,
                       norm_num_groups=2, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    save_model(unet.to(torch.float16), tmp_path / "unet_ema")
    with pytest.raises(CheckpointError, match=r"does not fit the network .*weights of another dtype, e.g. \S+ is "
                                              r"torch.float16, expected torch.float32"):
        load_model("unet", tmp_path / "unet_ema", "EMA denoiser")


# --- 6, 7. option values are checked before any work: finite, in range ---------------------------------

@pytest.mark.parametrize("script, flags, message", [
    ("predict", ["--nsd-tolerance", "nan"], "argument --nsd-tolerance: nan must be a finite number"),
    ("predict", ["--nsd-tolerance", "-1"], "argument --nsd-tolerance: -1.0 must be at least 0"),
    ("predict", ["--spacing-mm", "0.5", "inf"], "argument --spacing-mm: inf must be a finite number"),
    ("reproduce", ["--spacing-mm", "nan"], "argument --spacing-mm: nan must be a finite number"),
    ("reproduce", ["--nsd-tolerance", "-1"], "argument --nsd-tolerance: -1.0 must be at least 0"),
])
def test_evaluation_flags_are_checked_when_parsed(capsys, script, flags, message):
    import importlib
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(["--checkpoint", "c", "--input-dir", "i", "--output-dir", "o", *flags]
                          if script == "predict" else ["--data-dir", "d", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("script, flags, message", [
    ("train", ["--nsd-tolerance", "-1"], "--nsd-tolerance -1.0 must be at least 0"),
    ("train", ["--nsd-tolerance", "nan"], "--nsd-tolerance nan must be a finite number"),
    ("train", ["--lr", "inf"], "--lr inf must be a finite number"),
    ("sample_ldm", ["--guidance-scale", "inf"], "--guidance-scale inf must be a finite number"),
    ("sample_ldm", ["--guidance-scale", "nan"], "--guidance-scale nan must be a finite number"),
    ("sample_ldm", ["--guidance-scale", "1e30"], "--guidance-scale 1e+30 must be in [0, 100.0]"),
])
def test_schema_options_are_finite_and_in_range(script, flags, message):
    import importlib

    from utils.config import ConfigError, parse_config
    module = importlib.import_module(script)
    with pytest.raises(ConfigError, match=re.escape(message)):  # before any work: train.py trained first
        parse_config(module.OPTIONS, "", flags)


def test_a_yaml_list_for_a_single_value_is_refused(tmp_path):
    import train
    from utils.config import ConfigError, parse_config
    (tmp_path / "c.yaml").write_text("out_dir: [a, b]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: out_dir = \['a', 'b'\] is a list; it takes a single value"):
        parse_config(train.OPTIONS, "", ["--config", str(tmp_path / "c.yaml")])


# --- 16, 12. a resumed run's options are checked by the schema; config.yaml edits are refused ----------

@pytest.mark.slow
@pytest.mark.parametrize("key, value, message", [
    ("lr", -5.0, "lr = -5.0 must be greater than 0"),
    ("eval_batch_size", 0, "eval_batch_size = 0 must be at least 1"),
    ("log_every", 0, "log_every = 0 must be at least 1"),
    ("eval_every", 0, "eval_every = 0 is not valid"),
    ("nsd_tolerance", float("nan"), "nsd_tolerance = nan must be a finite number"),
    ("method", ["mgcc"], "method = \\['mgcc'\\] is a list"),
])
def test_a_resumed_config_is_checked_by_the_schema(tmp_path, stopped_run, key, value, message):
    from test_hostile_runs import crafted_resume
    from utils.config import ConfigError

    error = crafted_resume(tmp_path, stopped_run, lambda c: c["config"].update({key: value}))
    assert isinstance(error, ConfigError), error  # was: a traceback, or a run evaluating never
    assert re.search(rf"checkpoint_last.pt's config: {message}", str(error)), str(error)
    assert "give --" in str(error)


@pytest.mark.slow
def test_a_hand_edited_config_yaml_is_refused_on_resume(tmp_path, stopped_run):
    import shutil

    import train
    from utils.config import ConfigError
    _, run = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    text = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(text.replace("lr: 0.01", "lr: 0.02"))
    with pytest.raises(ConfigError, match=r"config.yaml was edited after the run started \(lr: 0.02 in config.yaml, "
                                          r"0.01 in the run\): --resume continues the run with the options it started"):
        train.main(["--out-dir", str(copy), "--resume", "--no-progress"])  # was: the edit silently discarded
    (copy / "config.yaml").write_text(text)
    assert train.main(["--out-dir", str(copy), "--resume", "--no-progress"]) == 0


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    from test_hostile_runs import stopped_run as make
    return make.__wrapped__(tmp_path_factory)


@pytest.mark.slow
def test_train_ldm_refuses_a_hand_edited_config_yaml_as_train_py_does(tmp_path):
    from conftest import LDM_TINY_VAE, run_script
    data = write_dataset(tmp_path / "toy", n=6, size=(32, 32))
    run = tmp_path / "ldm"
    tiny = LDM_TINY_VAE
    run_script("train_ldm.py", "--data-dir", data, "--out-dir", run, *tiny, "--vae-steps", "1")
    text = (run / "config.yaml").read_text()
    edited = re.sub(r"vae_latent_channels: \d+", "vae_latent_channels: 7", text)
    assert edited != text
    (run / "config.yaml").write_text(edited)
    result = run_script("train_ldm.py", "--out-dir", run, "--resume", "--stage", "vae", "--vae-steps", "2",
                        "--device", "cpu", "--no-progress", "--num-workers", "0", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]  # was: RuntimeError
    assert re.search(r"error: .*config.yaml was edited after the run wrote it \(vae_latent_channels: 7 in config.yaml, "
                     r"\d+ in the run\): --resume continues the run with the options it has", result.stderr)
    (run / "config.yaml").write_text(text)
    run_script("train_ldm.py", "--out-dir", run, "--resume", "--stage", "vae", "--vae-steps", "2", "--device", "cpu",
               "--no-progress", "--num-workers", "0")


# --- 14. lock files: in the folder, removed at the end, no folders left by a refused run -----------------

def test_a_writable_folder_under_a_read_only_parent_can_be_locked(tmp_path):
    from utils.locks import FolderLock
    (tmp_path / "mount").mkdir()
    tmp_path.chmod(0o555)  # the parent of a container's bind mount
    try:
        if os.access(tmp_path, os.W_OK):
            pytest.skip("running as root: a read-only folder stays writable")
        with FolderLock(tmp_path / "mount", "run folder") as lock:  # was: refused, the lock went beside it
            assert lock.path == tmp_path / "mount" / ".writer.lock" and lock.path.exists()
    finally:
        tmp_path.chmod(0o755)
    assert list((tmp_path / "mount").iterdir()) == []


def test_a_lock_lies_in_its_folder_and_folders_it_made_go_when_left_empty(tmp_path):
    from utils.locks import FolderLock, holds_files
    lock = FolderLock(tmp_path / "typo" / "run", "run folder").acquire()
    assert lock.path == tmp_path / "typo" / "run" / ".writer.lock" and not holds_files(tmp_path / "typo" / "run")
    assert not (tmp_path / "typo" / ".run.lock").exists()
    lock.release()
    assert list(tmp_path.iterdir()) == []  # a refused run (a --resume of a mistyped folder) leaves nothing
    lock = FolderLock(tmp_path / "kept", "run folder").acquire()
    (tmp_path / "kept" / "metrics.json").write_text("{}")
    lock.release()
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["metrics.json"]


@pytest.mark.slow
def test_train_resume_of_a_mistyped_folder_creates_no_folder(tmp_path):
    import train
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        train.main(["--out-dir", str(tmp_path / "typo" / "run"), "--resume", "--no-progress"])
    assert list(tmp_path.iterdir()) == []  # was: typo/ and typo/run/ created, empty


def test_run_cli_removes_the_locks_a_script_held(tmp_path):
    """reproduce.py never released its lock: the file stayed after every run."""
    from utils.cli import run_cli
    from utils.locks import hold

    (tmp_path / "protocol").mkdir()

    def main():
        hold(tmp_path / "protocol", "protocol folder")
        return 0
    with pytest.raises(SystemExit):
        run_cli(main)
    assert list((tmp_path / "protocol").iterdir()) == [] and not (tmp_path / ".protocol.lock").exists()


def test_sample_ldm_into_the_empty_working_folder_is_not_refused_for_its_own_lock(tmp_path, monkeypatch):
    import sample_ldm
    from utils.locks import hold, release_held
    monkeypatch.chdir(tmp_path)
    try:
        hold(sample_ldm.Path(".").absolute(), "sample folder")
        sample_ldm.check_out_dir(sample_ldm.Path(".").absolute(), overwrite=False)  # was: "already holds files"
        partial = tmp_path.parent / f".{tmp_path.name}.partial-test"
        (partial / "images").mkdir(parents=True)
        (partial / "manifest.csv").write_text("file\n")
        sample_ldm.publish(partial, tmp_path)  # filled in place: the working folder is not renamed away
    finally:
        release_held()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "manifest.csv"] and not partial.exists()


# --- 9. an output folder inside the dataset's images/ or masks/ is refused -------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("inside", ["images", "masks/0", "images/run"])
def test_train_refuses_an_out_dir_inside_the_dataset(dataset, inside):
    import train
    from test_hostile_runs import TINY
    before = sorted(p.relative_to(dataset) for p in dataset.rglob("*"))
    with pytest.raises(DataError, match=rf"--out-dir {dataset / inside} lies in {dataset}/(images|masks), a folder of "
                                        r"the dataset .*choose a folder outside"):
        train.main(["--data-dir", str(dataset), "--out-dir", str(dataset / inside), *TINY])
    assert sorted(p.relative_to(dataset) for p in dataset.rglob("*")) == before  # not even a lock file


def test_an_output_folder_beside_the_dataset_folders_is_fine(dataset):
    from dataloaders.io import check_outside_data
    check_outside_data(dataset / "runs" / "a", dataset)
    check_outside_data(dataset.parent / "images", dataset)
    with pytest.raises(DataError, match="lies in"):
        check_outside_data(dataset / "images" / ".." / "masks", dataset, "--out-dir")


# --- 11, 17. YAML: aliases and other encodings ----------------------------------------------------------

def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    import train
    from utils.config import ConfigError, read_yaml
    lines = ['a0: &a0 ["xxxxxxxx", "xxxxxxxx"]'] + [f"a{k}: &a{k} [*a{k - 1}, *a{k - 1}, *a{k - 1}, *a{k - 1}]"
                                                    for k in range(1, 30)] + ["out_dir: *a29"]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")  # 4^29 strings once expanded
    with pytest.raises(ConfigError, match=r"bomb.yaml, line 2: a YAML alias \(\*name\); config files take plain "
                                          r"values only"):
        read_yaml(tmp_path / "bomb.yaml", train.OPTIONS)


def test_a_latin1_config_is_named_and_a_bom_is_read(tmp_path):
    import train
    from utils.config import ConfigError, read_yaml
    (tmp_path / "latin.yaml").write_bytes("out_dir: runs/caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml is not UTF-8 text \(byte 17: 0xe9\); save it as UTF-8"):
        read_yaml(tmp_path / "latin.yaml", train.OPTIONS)  # was: a UnicodeDecodeError traceback
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfout_dir: runs/a\n")
    assert read_yaml(tmp_path / "bom.yaml", train.OPTIONS) == {"out_dir": "runs/a"}


# --- 15. a checkpoint zip bomb is refused from its central directory -------------------------------------

def test_a_checkpoint_zip_bomb_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    import zipfile

    from utils.checkpoint import load_checkpoint
    plain = tmp_path / "plain.pt"
    torch.save({"kind": "mgcc-segmenter", "model": {"w": torch.zeros(4_000_000)}}, plain)  # 16 MB of zeros
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry.filename))
    assert bomb.stat().st_size < 1_000_000
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(CheckpointError, match=rf"refused to load {bomb}: its entries unpack to 15.3 MiB from a "
                                              r"0.0 MiB file \(compressed\).*nothing of it was decoded"):
        load_checkpoint(bomb)
    monkeypatch.undo()
    assert load_checkpoint(plain)["model"]["w"].shape == (4_000_000,)  # torch.save's own files: stored, loaded


# --- 10, 17, 18. bounds, seeds, repeated folders, a BOM, torch's raw write errors ------------------------

@pytest.mark.parametrize("module_name, flags, message", [
    ("sample_ldm", ["--num-images", "1000000000"], "--num-images 1000000000 must be in [1, 1000000]"),
    ("dataloaders.phantom", ["--seed", "-1"], "--seed -1 must be at least 0"),
])
def test_more_options_are_bounded_by_their_schema(module_name, flags, message):
    import importlib

    from utils.config import ConfigError, parse_config
    module = importlib.import_module(module_name)
    options = module.OPTIONS if hasattr(module, "OPTIONS") else module._options()
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(options, "", flags)


@pytest.mark.slow
def test_demo_checks_its_seed_and_out_dir(tmp_path, capsys):
    import demo
    from utils.config import ConfigError
    with pytest.raises(SystemExit):
        demo.parse_args(["--seed", "-1"])
    assert "argument --seed: -1 must be at least 0" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--out-dir .*file is a file, not a folder"):
        demo.main(["--out-dir", str(tmp_path / "file")])


def test_split_refuses_repeated_seeds():
    from split import make_splits
    with pytest.raises(DataError, match="--seeds 1 1 repeats 1: each seed makes one split"):
        make_splits([f"benign ({k})" for k in range(10)], seeds=[1, 1])


def test_an_unlabeled_folder_given_twice_is_refused(dataset, tmp_path):
    synth = tmp_path / "synth"
    generated_folder(synth, ["some other id"], tmp_path)
    with pytest.raises(DataError, match="--unlabeled-dir lists .*synth more than once"):
        load_run_data(dataset, 1, unlabeled_dirs=[synth, tmp_path / "." / "synth"])  # was: every image twice


def test_a_bom_in_a_split_file_is_not_part_of_the_first_id(dataset):
    from dataloaders.io import read_id_list
    path = dataset / "toy_val1.txt"
    ids = path.read_text().splitlines()
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_id_list(path) == ids  # was: an error naming an id with an invisible first character


# --- 8. files the pixel limit cannot measure are refused before decoding --------------------------------

@pytest.mark.parametrize("ext, image", [(".pam", np.zeros((60, 50), np.uint8)),
                                        (".hdr", np.zeros((60, 50, 3), np.float32))])
def test_an_image_of_another_format_named_png_is_refused_before_decoding(tmp_path, monkeypatch, ext, image):
    import cv2

    from dataloaders.io import read_image
    ok, encoded = cv2.imencode(ext, image)
    assert ok
    (tmp_path / "big.png").write_bytes(encoded.tobytes())  # at 30 Mpx (PAM) or 144 Mpx (HDR): the same path
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded"))
    with pytest.raises(DataError, match=r"big.png: its header is not that of a PNG, JPEG, BMP or TIFF image, so its "
                                        r"size cannot be checked before decoding"):
        read_image(tmp_path / "big.png")  # was: decoded in full, past the limit


@pytest.mark.slow
def test_a_temporary_checkpoint_left_by_kill_9_is_removed_on_resume(tmp_path, stopped_run):
    import shutil

    import train
    _, run = stopped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    stale = copy / ".checkpoint_last.pt.x1y2z3.tmp"  # what kill -9 during torch.save leaves
    stale.write_bytes(b"PK\x03\x04 partial")
    assert train.main(["--out-dir", str(copy), "--resume", "--no-progress"]) == 0
    assert not stale.exists() and not list(copy.glob(".*.tmp"))  # was: left forever


@pytest.mark.parametrize("edit, message", [
    ({"labels": ["background", "lesion"]}, "labels is a list, where nnU-Net v2 writes an object"),
    ({"channel_names": 0}, "channel_names is a int, where nnU-Net v2 writes an object"),
])
def test_convert_nnunet_names_a_dataset_json_of_other_types(tmp_path, edit, message):
    from dataloaders.nnunet import read_dataset_json
    meta = {"channel_names": {"0": "US"}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".png", **edit}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=message):  # was: a TypeError / AttributeError traceback
        read_dataset_json(tmp_path)


@pytest.mark.parametrize("text, found", [("{not json", "cannot be read"), ("[1, 2]", "holds a list")])
def test_report_only_refuses_a_damaged_report_before_rewriting_anything(tmp_path, text, found):
    import sample_ldm
    (tmp_path / "report.json").write_text(text)
    with pytest.raises(DataError, match=rf"--report-only: .*report.json {found}.*, where sample_ldm.py writes a JSON"):
        sample_ldm.previous_report(tmp_path)  # was: a traceback after memorisation.txt was rewritten
    (tmp_path / "report.json").write_text(json.dumps({"settings": {"seed": 1}, "c2st_accuracy": 0.5}))
    assert sample_ldm.previous_report(tmp_path) == {"settings": {"seed": 1}}


def test_the_manifest_on_a_full_disk_is_one_error(tmp_path, monkeypatch):
    import errno

    import sample_ldm
    from utils.files import WriteError
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    cfg = type("Cfg", (), {"num_images": 1, "seed": 0, "scheduler": "ddim", "steps": 2, "guidance_scale": 1.0,
                           "class": "all", "batch_size": 1, "precision": "fp32", "prefix": "synth"})()
    (tmp_path / "images").mkdir()
    with pytest.raises(WriteError, match=r"could not write .*manifest.csv: no space left on the device"):
        sample_ldm.write_outputs(cfg, {"diffusion_step": 1, "class_names": []}, [None], ["synth_0000.png"],
                                 tmp_path, tmp_path, None, None, {})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not (tmp_path / "manifest.csv").exists()
