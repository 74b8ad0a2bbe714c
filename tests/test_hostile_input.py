"""Careless and hostile input (issue 19): images of other bit depths and layouts, oversized images,
undecodable split files, manifests and generator folders that cannot be trusted, bad option values.
Each case is one clear error naming the file or value, or correct values; nothing is lost."""
from __future__ import annotations

import csv
import json
import re
import shutil
import struct
import zlib

import cv2
import numpy as np
import pytest

from conftest import write_dataset
from dataloaders.io import DataError, check_pairs, read_image, read_mask
from dataloaders.splits import load_run_data
from test_data import generated_folder, leaky_samples
from utils.config import ConfigError, Option, at_least, multiple_of, odd_positive, parse_config


# --- 5. 16-bit and alpha images are read with their real values ---------------------------------------

def square_mask(dtype=np.uint8, value=255, shape=(20, 30)) -> np.ndarray:
    mask = np.zeros(shape, dtype)
    mask[5:10, 5:10] = value  # 25 foreground pixels
    return mask


def test_a_16_bit_0_1_mask_is_foreground_with_nonzero_and_named_with_binary(tmp_path):
    path = tmp_path / "m.png"
    cv2.imwrite(str(path), square_mask(np.uint16, 1))
    assert read_mask(path, "nonzero").sum() == 25  # OpenCV's 8-bit conversion made this 0
    image = tmp_path / "i.png"
    cv2.imwrite(str(image), np.full((20, 30), 100, np.uint8))
    with pytest.raises(DataError, match=r"m.png: values \[0, 1\] \(16-bit\)") as error:
        check_pairs([("i", image, path)], mask_values="binary")
    assert "use mask_values 'nonzero'" in str(error.value)
    check_pairs([("i", image, path)], mask_values="nonzero")


def test_a_16_bit_0_65535_mask_reads_as_a_0_255_one(tmp_path):
    path = tmp_path / "m.png"
    cv2.imwrite(str(path), square_mask(np.uint16, 65535))
    assert read_mask(path, "binary").sum() == read_mask(path, "threshold").sum() == 25


def test_a_mask_drawn_in_the_alpha_channel_is_read_from_it(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 3] = square_mask()
    cv2.imwrite(str(tmp_path / "m.png"), rgba)
    assert read_mask(tmp_path / "m.png").sum() == 25
    # an opaque RGBA mask is read from its colour
    rgba = np.dstack([np.dstack([square_mask()] * 3), np.full((20, 30), 255, np.uint8)])
    cv2.imwrite(str(tmp_path / "opaque.png"), rgba)
    assert read_mask(tmp_path / "opaque.png").sum() == 25
    # colour and alpha both drawn: which is the mask cannot be told
    rgba[..., 3] = 255 - square_mask()
    cv2.imwrite(str(tmp_path / "both.png"), rgba)
    with pytest.raises(DataError, match="both.png: mask has both a drawn colour and a drawn alpha channel"):
        read_mask(tmp_path / "both.png")


def test_12_bit_images_in_16_bit_files_keep_their_range(tmp_path):
    image = np.zeros((4, 4), np.uint16)
    image[0, 0], image[0, 1], image[0, 2] = 4095, 2048, 1000
    cv2.imwrite(str(tmp_path / "i.png"), image)
    gray = read_image(tmp_path / "i.png", 1)[..., 0]
    assert gray.dtype == np.uint8 and gray[0, :3].tolist() == [255, 128, 62]  # OpenCV's own: 15, 8, 3
    assert read_image(tmp_path / "i.png", 3)[0, 0].tolist() == [255, 255, 255]
    image[0, 3] = 65535  # more than 12 bits: a 16-bit image
    cv2.imwrite(str(tmp_path / "j.png"), image)
    assert read_image(tmp_path / "j.png", 1)[0, :4, 0].tolist() == [16, 8, 4, 255]


def test_an_alpha_channel_of_an_image_is_dropped(tmp_path):
    rgba = np.dstack([np.full((4, 4, 3), 90, np.uint8), np.zeros((4, 4), np.uint8)])
    cv2.imwrite(str(tmp_path / "i.png"), rgba)
    assert read_image(tmp_path / "i.png", 3).shape == (4, 4, 3) and read_image(tmp_path / "i.png", 1).max() == 90


# --- 7. a configurable pixel limit, checked on the header ----------------------------------------------

def png_claiming(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (its pixel data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_split_py_names_an_image_whose_header_claims_40000x40000(tmp_path, capsys):
    import split

    data = write_dataset(tmp_path / "toy", n=4, splits=False)
    png_claiming(data / "images" / "benign (1).png", 40000, 40000)
    assert split.main(["--data-dir", str(data)]) == 2  # was OpenCV's CV_IO_MAX_IMAGE_PIXELS traceback
    err = capsys.readouterr().err
    assert f"{data / 'images' / 'benign (1).png'} is 40000x40000 = 1600000000 pixels, more than the limit" in err
    assert "option max_image_pixels" in err and "Traceback" not in err
    assert not list(data.glob("*.txt"))


def test_the_pixel_limit_is_an_option(tmp_path, capsys, monkeypatch):
    import split

    monkeypatch.delenv("MGCC_MAX_IMAGE_PIXELS", raising=False)  # the limit set here ends with the test

    data = write_dataset(tmp_path / "toy", n=4, splits=False)  # 80 x 64 = 5120 pixels
    assert split.main(["--data-dir", str(data), "--max-image-pixels", "5000", "--val-fraction", "0.5"]) == 2
    assert "is 80x64 = 5120 pixels, more than the limit of 5000" in capsys.readouterr().err
    assert split.main(["--data-dir", str(data), "--max-image-pixels", "5120", "--val-fraction", "0.5"]) == 0
    with pytest.raises(SystemExit) as exit_:
        split.main(["--data-dir", str(data), "--max-image-pixels", "0"])
    assert exit_.value.code == 2 and "must be in [1, 1073741824]" in capsys.readouterr().err


@pytest.mark.slow
def test_train_py_takes_the_pixel_limit(dataset, tmp_path, monkeypatch):
    import train

    monkeypatch.delenv("MGCC_MAX_IMAGE_PIXELS", raising=False)
    with pytest.raises(DataError, match=r"is 80x64 = 5120 pixels, more than the limit of 5000 \(option max_image_pixels"):
        train.main(["--data-dir", str(dataset), "--out-dir", str(tmp_path / "run"), "--max-image-pixels", "5000",
                    "--no-progress"])
    assert not (tmp_path / "run").exists()


# --- 8. a split file that is not UTF-8 -----------------------------------------------------------------

def test_a_split_file_that_is_not_utf8_is_named(dataset):
    (dataset / "toy_val1.txt").write_bytes("malignant (10)\nbenign (11)\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"split file .*toy_val1.txt is not UTF-8 text"):
        load_run_data(dataset, 1)


# --- 3. provenance fails closed ------------------------------------------------------------------------

@pytest.fixture
def leaking(dataset, tmp_path):
    """Split 2, whose val ids split 1's generator trained on, and split 1's samples (see test_data)."""
    synth = leaky_samples(dataset, tmp_path)
    with pytest.raises(DataError, match="a generator trained on 3 of the 3 val ids"):  # the real manifest
        load_run_data(dataset, 2, unlabeled_dirs=[synth])
    return dataset, synth, tmp_path / "ldm_synth_split1"


def rewrite_manifest(synth, edit) -> None:
    with (synth / "manifest.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    text = edit(rows)
    (synth / "manifest.csv").write_text(text)


def as_csv(rows) -> str:
    import io
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


MANIFEST_EDITS = {
    "empty": (lambda rows: "", r"has no 'checkpoint' column \(it is empty\)"),
    "header only": (lambda rows: as_csv(rows[:1]), "lists no image"),
    "blank checkpoint": (lambda rows: as_csv([rows[0], *[[*r[:6], "", *r[7:]] for r in rows[1:2]], *rows[2:]]),
                         "line.s. 2 name no checkpoint"),
    "unclosed quote": (lambda rows: as_csv(rows) + '"images/x.png,1,,ddim,50,1,' + rows[1][6] + "\n", "cannot read"),
}


@pytest.mark.parametrize("edit", MANIFEST_EDITS, ids=list(MANIFEST_EDITS))
def test_a_manifest_that_cannot_be_read_in_full_is_refused(leaking, edit):
    dataset, synth, _ = leaking
    change, message = MANIFEST_EDITS[edit]
    rewrite_manifest(synth, change)
    with pytest.raises(DataError, match=message):
        load_run_data(dataset, 2, unlabeled_dirs=[synth])


RUN_INFO_EDITS = {
    "train_ids a string": (lambda info: {**info, "train_ids": "benign (1)"}, "train_ids of type str"),
    "train_ids numbers": (lambda info: {**info, "train_ids": [1, 2]}, "train_ids that are not all strings"),
    "train_ids null": (lambda info: {**info, "train_ids": None}, "train_ids of type NoneType"),
    "train_ids lists": (lambda info: {**info, "train_ids": [["benign (1)"]]}, "train_ids that are not all strings"),
    "no train_ids": (lambda info: {"kind": "mgcc-ldm"}, "has no train_ids"),
    "not a mapping": (lambda info: [1], "has no train_ids"),
}


@pytest.mark.parametrize("edit", RUN_INFO_EDITS, ids=list(RUN_INFO_EDITS))
def test_a_generator_whose_training_ids_cannot_be_read_is_refused(leaking, edit):
    dataset, synth, run = leaking
    change, message = RUN_INFO_EDITS[edit]
    (run / "ldm.json").write_text(json.dumps(change(json.loads((run / "ldm.json").read_text()))))
    with pytest.raises(DataError, match=message):
        load_run_data(dataset, 2, unlabeled_dirs=[synth])


def test_a_checkpoint_column_naming_an_unrelated_folder_is_refused(leaking, tmp_path):
    dataset, synth, run = leaking
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    rewrite_manifest(synth, lambda rows: as_csv([rows[0], *[[*r[:6], str(unrelated), *r[7:]] for r in rows[1:]]]))
    with pytest.raises(DataError, match=rf"the generator {unrelated} named in .* has no ldm.json: not a run folder"):
        load_run_data(dataset, 2, unlabeled_dirs=[synth])


def test_a_relative_checkpoint_is_found_from_the_manifest_not_the_working_folder(leaking, tmp_path, monkeypatch):
    dataset, synth, run = leaking
    rewrite_manifest(synth, lambda rows: as_csv([rows[0], *[[*r[:6], f"../{run.name}", *r[7:]] for r in rows[1:]]]))
    elsewhere = tmp_path / "elsewhere" / "deeper"  # where ../ldm_synth_split1 is no folder
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    with pytest.raises(DataError, match="a generator trained on 3 of the 3 val ids"):
        load_run_data(dataset, 2, unlabeled_dirs=[synth])


def test_val_images_copied_into_an_unlabeled_folder_are_found_by_their_pixels(dataset, tmp_path, capsys):
    val = (dataset / "toy_val1.txt").read_text().splitlines()
    synth = tmp_path / "synth"
    generated_folder(synth, ["some other id"], tmp_path)  # a generator that saw no evaluated id
    assert len(load_run_data(dataset, 1, unlabeled_dirs=[synth]).unlabeled) == 4 + 3
    # a val image, re-saved in another lossless format under another name, with the manifest unchanged
    image = cv2.imread(str(dataset / "images" / f"{val[1]}.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(synth / "images" / "synth_99.bmp"), image)
    with pytest.raises(DataError, match=rf"unlabeled folder {synth} holds 1 copy of images this run evaluates "
                                        rf".*, e.g. synth_99.bmp = val image '{re.escape(val[1])}' \(same pixels\)"):
        load_run_data(dataset, 1, unlabeled_dirs=[synth])
    # and in a folder of one's own images, without a manifest
    own = tmp_path / "own"
    own.mkdir()
    shutil.copy(dataset / "images" / f"{val[0]}.png", own / "mine.png")
    with pytest.raises(DataError, match=f"mine.png = val image '{re.escape(val[0])}'"):
        load_run_data(dataset, 1, unlabeled_dirs=[own])


@pytest.mark.parametrize("sub", ["", "images"])
def test_the_data_folder_is_not_an_unlabeled_folder(dataset, sub):
    with pytest.raises(DataError, match="is the data folder .* itself: it holds the val images"):
        load_run_data(dataset, 1, unlabeled_dirs=[dataset / sub])


# --- 8. option values are checked by the option schema --------------------------------------------------

SCHEMA = [Option("image_size", 32, "side", check=multiple_of(16, " (the network halves it four times)")),
          Option("kernel", 7, "kernel", check=odd_positive()),
          Option("lr", 0.1, "rate", check=at_least(0)),
          Option("channels", [4, 8], "widths", type=int, repeatable=True, check=at_least(1))]


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "33"], r"--image-size 33 must be a positive multiple of 16 \(the network halves it four times\)"),
    (["--image-size", "0"], "--image-size 0 must be a positive multiple of 16"),
    (["--kernel", "4"], "--kernel 4 must be an odd number >= 1"),
    (["--lr", "-1"], "--lr -1.0 must be at least 0"),
    (["--channels", "4", "0"], r"--channels \[4, 0\] must be at least 1"),
])
def test_option_checks_name_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(SCHEMA, "", flags)
    assert parse_config(SCHEMA, "", []).image_size == 32


def test_option_checks_name_the_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text("kernel: 0\n")
    with pytest.raises(ConfigError, match=r"c.yaml: kernel = 0 must be an odd number >= 1"):
        parse_config(SCHEMA, "", ["--config", str(tmp_path / "c.yaml")])


def test_reproduce_names_an_unclosed_quote_in_train_args():
    import reproduce

    with pytest.raises(ConfigError, match=r"--train-args '--iterations \"4' cannot be split into flags .* "
                                          "No closing quotation"):
        reproduce.parse_args(["--data-dir", "x", "--train-args", '--iterations "4'])


@pytest.mark.slow
@pytest.mark.parametrize("flag, value, message", [
    ("--image-size", "0", "must be a positive multiple of 16 (the network halves the image four times)"),
    ("--image-size", "-32", "must be a positive multiple of 16"),
    ("--image-size", "1", "must be a positive multiple of 16"),
    ("--image-size", "33", "must be a positive multiple of 16"),
    ("--width", "0", "must be at least 1"),
    ("--mixer-kernel", "0", "must be an odd number >= 1"),
    ("--mixer-kernel", "4", "must be an odd number >= 1"),
    ("--mixer-depth", "0", "must be at least 1"),
    ("--log-every", "0", "must be at least 1"),
    ("--eval-batch-size", "0", "must be at least 1"),
    ("--consistency-ramp-every", "0", "must be at least 1"),
    ("--seed", "-1", "must be in [0, 4294967295]"),
    ("--num-workers", "-1", "must be at least 0"),
    ("--lr", "-1", "must be greater than 0"),
    ("--labeled-batch-size", "0", "must be at least 1"),
    ("--checkpoint-every", "0", "must be at least 1"),
    ("--checkpoint-every", "-3", "must be at least 1"),
    ("--labeled-fraction", "0", "must be in (0, 1]"),
])
def test_train_py_checks_its_flags_before_any_work(tmp_path, flag, value, message):
    """Each was a traceback (exit 1) or, for --checkpoint-every and --mixer-depth, accepted silently. The
    data folder does not exist: the flag's error comes first, before anything is read or written."""
    import train

    argv = ["--data-dir", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "run"), flag, value, "--no-progress"]
    with pytest.raises(ConfigError, match=f"^{re.escape(flag)} {re.escape(value)}(.0)? {re.escape(message)}"):
        train.main(argv)
    assert not (tmp_path / "run").exists()
