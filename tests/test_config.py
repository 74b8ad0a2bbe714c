"""The configuration layer: list options are typed as users type them, on every script."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
import sample_ldm
import train
import train_ldm
from utils.config import parse_config

LIST_OPTIONS = [(module, option) for module in (train, train_ldm, sample_ldm) for option in module.OPTIONS
                if option.repeatable]


def values_for(option) -> list[str]:
    return ["16", "32", "32"] if option.type is int else ["a", "b c", "d"]


def test_every_script_has_list_options_to_check():
    assert {option.name for _, option in LIST_OPTIONS} >= {"unlabeled_dir", "class_names", "vae_channels",
                                                           "unet_channels"}


@pytest.mark.parametrize("module,option", LIST_OPTIONS, ids=lambda x: getattr(x, "name", getattr(x, "__name__", "")))
def test_a_list_is_the_values_after_its_flag(module, option):
    values = values_for(option)
    expected = [int(v) for v in values] if option.type is int else values
    assert getattr(parse_config(module.OPTIONS, "", [option.flag, *values]), option.name) == expected
    # the repeated flag keeps working, and so does a mix
    repeated = [option.flag, values[0], option.flag, values[1], values[2]]
    assert getattr(parse_config(module.OPTIONS, "", repeated), option.name) == expected


def test_flags_after_a_list_are_still_flags(tmp_path):
    cfg = parse_config(train_ldm.OPTIONS, "", ["--vae-channels", "16", "32", "32", "--image-size", "64"])
    assert cfg.vae_channels == [16, 32, 32] and cfg.image_size == 64
    assert cfg.explicit == {"vae_channels", "image_size"}


def test_yaml_lists_stay_and_a_flag_replaces_them(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("vae_channels: [8, 16]\nclass_names:\n  - benign\n  - malignant\n")
    cfg = parse_config(train_ldm.OPTIONS, "", ["--config", str(config)])
    assert cfg.vae_channels == [8, 16] and cfg.class_names == ["benign", "malignant"]
    cfg = parse_config(train_ldm.OPTIONS, "", ["--config", str(config), "--vae-channels", "4", "4", "4"])
    assert cfg.vae_channels == [4, 4, 4] and cfg.class_names == ["benign", "malignant"]


@pytest.mark.slow
def test_help_says_how_to_type_a_list():
    result = subprocess.run([sys.executable, str(ROOT / "train_ldm.py"), "--help"], capture_output=True, text=True,
                            cwd=ROOT, env=dict(os.environ, COLUMNS="200"))
    assert result.returncode == 0
    assert "a list: --vae-channels A B ... (default: 64 128 256 512)" in result.stdout
