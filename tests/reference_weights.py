"""The closed-form weights of the reference test vectors (tests/fixtures, rule from the reference README)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).parent / "fixtures"


def lcg_uniform(k: int, n: int) -> np.ndarray:
    """u_k(i) = ((i * 1103515245 + 12345 + 7919 k) mod 2^31) / 2^31 for i = 0..n-1, in int64."""
    i = np.arange(n, dtype=np.int64)
    return ((i * 1103515245 + 12345 + 7919 * k) % 2 ** 31) / 2 ** 31


def read_layout(tsv: str = "mgcc_official_state_dict_w16.tsv") -> list[tuple[str, tuple[int, ...]]]:
    rows = [line.split("\t") for line in (FIXTURES / tsv).read_text().splitlines()
            if line and not line.startswith("#") and not line.startswith("name\t")]
    return [(name, tuple(int(d) for d in shape.strip("()").split(",") if d.strip())) for name, shape in rows]


def official_reference_state_dict(tsv: str = "mgcc_official_state_dict_w16.tsv") -> dict[str, torch.Tensor]:
    """An official-layout float64 state_dict with the k-th entry built by the reference rule."""
    state = {}
    for k, (name, shape) in enumerate(read_layout(tsv)):
        n = math.prod(shape)
        u = lcg_uniform(k, n)
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
            continue
        if name.endswith("running_mean"):
            values = 0.1 * (2 * u - 1)
        elif name.endswith("running_var"):
            values = 1 + 0.25 * u
        elif name.endswith(".bias"):
            values = 0.05 * (2 * u - 1)
        elif len(shape) == 1:
            values = 1 + 0.1 * (2 * u - 1)
        else:
            values = math.sqrt(6 / (n / shape[0])) * (2 * u - 1)
        state[name] = torch.from_numpy(values.reshape(shape))
    return state
