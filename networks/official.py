"""Checkpoints of the official MGCC code: detect them and rename their state_dict to ours.

The official network (see tests/fixtures/mgcc_official_state_dict.tsv for every name) stores
``Conv1..Conv5``, ``ConvMixer1..3``, ``main_decoder`` and ``aux_decoder1..3`` with CMU-Net's module
names. The structure is the same as networks/mgcc.py, so the mapping is a renaming only.
"""
from __future__ import annotations

import re

import torch

# (official pattern, our replacement), applied in turn to each name; the first match wins.
_RULES = [
    (r"^Conv(\d)\.conv\.(.*)$", lambda m: f"encoder.stages.{int(m[1]) - 1}.{m[2]}"),
    (r"^ConvMixer(\d)\.block\.(\d+)\.0\.fn\.(.*)$", lambda m: f"mixers.{int(m[1]) - 1}.{m[2]}.depthwise.{m[3]}"),
    (r"^ConvMixer(\d)\.block\.(\d+)\.(\d)\.(.*)$",
     lambda m: f"mixers.{int(m[1]) - 1}.{m[2]}.pointwise.{int(m[3]) - 1}.{m[4]}"),
    (r"^(main_decoder|aux_decoder\d)\.(.*)$", lambda m: f"{_decoder(m[1])}.{_decoder_part(m[2])}"),
]
_MSAG_BRANCHES = {"pointwiseConv": "pointwise", "ordinaryConv": "ordinary", "dilationConv": "dilated",
                  "voteConv": "vote"}


def _decoder(name: str) -> str:
    return "main_decoder" if name == "main_decoder" else f"aux_decoders.{int(name[-1]) - 1}"


def _decoder_part(rest: str) -> str:
    # Up5/Up_conv5/msag4 work on the deepest skip: our index 0; Up2/Up_conv2/msag1: index 3.
    if m := re.match(r"^Up(\d)\.up\.(.*)$", rest):
        return f"ups.{5 - int(m[1])}.{m[2]}"
    if m := re.match(r"^Up_conv(\d)\.conv\.(.*)$", rest):
        return f"fuses.{5 - int(m[1])}.{m[2]}"
    if m := re.match(r"^msag(\d)\.(\w+)\.(.*)$", rest):
        return f"gates.{4 - int(m[1])}.{_MSAG_BRANCHES[m[2]]}.{m[3]}"
    if m := re.match(r"^Conv_1x1\.(.*)$", rest):
        return f"head.{m[1]}"
    raise KeyError(rest)


def official_to_ours(name: str) -> str:
    """Our parameter name for an official one; KeyError for a name the official network has not."""
    for pattern, replace in _RULES:
        if m := re.match(pattern, name):
            try:
                return replace(m)
            except KeyError:
                break
    raise KeyError(f"not a parameter name of the official MGCC network: {name}")


def is_official_state_dict(obj) -> bool:
    """True for a plain state_dict with the official MGCC names (as its checkpoints are saved)."""
    return (isinstance(obj, dict) and "Conv1.conv.0.weight" in obj and "main_decoder.Conv_1x1.weight" in obj
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official state_dict to this project's names (tensors are shared, not copied)."""
    return {official_to_ours(k): v for k, v in state_dict.items()}


def infer_official_architecture(state_dict: dict[str, torch.Tensor]) -> dict:
    """Constructor arguments of MGCCNet that fit an official state_dict."""
    first = state_dict["Conv1.conv.0.weight"]
    depth = 1 + max(int(m[1]) for k in state_dict if (m := re.match(r"^ConvMixer1\.block\.(\d+)\.", k)))
    return {"in_channels": first.shape[1], "width": first.shape[0],
            "num_classes": state_dict["main_decoder.Conv_1x1.weight"].shape[0],
            "mixer_depth": depth, "mixer_kernel": state_dict["ConvMixer1.block.0.0.fn.0.weight"].shape[-1]}
