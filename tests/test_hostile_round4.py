"""Careless and hostile use, the fourth round (issue 33): each case is one clear error naming the file or
value and what to do, or correct behaviour; nothing lost, half-written or followed out of its folder."""
from __future__ import annotations

import pytest

from dataloaders.io import DataError
from dataloaders.splits import load_run_data
from test_data import generated_folder


# --- 1. a link does not hide a generator's manifest --------------------------------------------------

@pytest.mark.parametrize("target", ["images", ""])
def test_a_link_to_leaky_samples_is_refused_as_their_real_path_is(dataset, tmp_path, target):
    train1 = (dataset / "toy_train1.txt").read_text().splitlines()
    val1 = (dataset / "toy_val1.txt").read_text().splitlines()
    (dataset / "toy_train2.txt").write_text("\n".join(train1[3:] + val1) + "\n")
    (dataset / "toy_val2.txt").write_text("\n".join(train1[:3]) + "\n")
    synth = tmp_path / "synth_split1"
    generated_folder(synth, train1, tmp_path)
    link = tmp_path / "innocent"
    link.symlink_to(synth / target if target else synth)
    with pytest.raises(DataError, match="a generator trained on 3 of the 3 val ids"):
        load_run_data(dataset, 2, unlabeled_dirs=[link])
