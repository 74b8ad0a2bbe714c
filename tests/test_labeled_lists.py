"""Explicit labeled lists: split.py --labeled N writes them, load_run_data / train.py --labeled-list read them."""
from __future__ import annotations

import re

import pytest

import split
from conftest import write_dataset
from dataloaders.io import DataError, read_id_list
from dataloaders.splits import load_run_data


def test_labeled_list_gives_the_labeled_ids_and_the_rest_unlabeled(dataset):
    train = read_id_list(dataset / "toy_train1.txt")  # 8 ids
    chosen = [train[5], train[1], train[6]]
    listed = dataset / "labeled.txt"
    listed.write_text("\n".join(chosen) + "\n")
    data = load_run_data(dataset, 1, labeled_list=listed)
    assert [i for i, *_ in data.labeled] == chosen  # the list's order
    assert [i for i, *_ in data.unlabeled] == [i for i in train if i not in chosen]
    assert data.labeled_share == pytest.approx(3 / 8)
    assert all(mask is not None for *_, mask in data.labeled)


def test_labeled_list_outside_the_training_list_names_the_first_stray_id(dataset):
    train, val = read_id_list(dataset / "toy_train1.txt"), read_id_list(dataset / "toy_val1.txt")
    listed = dataset / "labeled.txt"
    listed.write_text(f"{train[0]}\n{val[1]}\n{val[0]}\n")
    with pytest.raises(DataError, match=rf"names '{re.escape(val[1])}', which is not among the training ids of toy_train1.txt"):
        load_run_data(dataset, 1, labeled_list=listed)
    # the holdout ids (the training list's last) are not labeled candidates either
    listed.write_text(f"{train[0]}\n{train[-1]}\n")
    with pytest.raises(DataError, match=rf"'{re.escape(train[-1])}'.*outside its last 2 \(holdout\)"):
        load_run_data(dataset, 1, labeled_list=listed, holdout=0.25)
    with pytest.raises(DataError, match="split file not found"):
        load_run_data(dataset, 1, labeled_list=dataset / "missing.txt")


def test_split_writes_seeded_nested_labeled_lists(tmp_path):
    data = write_dataset(tmp_path / "toy", n=20, splits=False)
    assert split.main(["--data-dir", str(data), "--labeled", "3", "6"]) == 0
    for i in (1, 2, 3):
        train = read_id_list(data / f"toy_train{i}.txt")
        small, large = (read_id_list(data / f"toy_train{i}_labeled{n}.txt") for n in (3, 6))
        assert len(small) == 3 and len(large) == 6 and set(small) < set(large) < set(train)
        assert small == [t for t in train if t in small]  # in the training list's order
    draws = [read_id_list(data / f"toy_train{i}_labeled6.txt") for i in (1, 2, 3)]
    assert read_id_list(data / "toy_train1.txt") != read_id_list(data / "toy_train2.txt")
    # the same folder elsewhere gives the same files; another seed other draws
    again = write_dataset(tmp_path / "again" / "toy", n=20, splits=False)
    assert split.main(["--data-dir", str(again), "--labeled", "6"]) == 0
    assert [read_id_list(again / f"toy_train{i}_labeled6.txt") for i in (1, 2, 3)] == draws
    assert split.main(["--data-dir", str(again), "--labeled", "6", "--labeled-seed", "1", "--overwrite"]) == 0
    assert [read_id_list(again / f"toy_train{i}_labeled6.txt") for i in (1, 2, 3)] != draws


def test_labeled_lists_for_split_files_already_there(tmp_path, capsys):
    data = write_dataset(tmp_path / "toy", n=12)  # toy_train1.txt / toy_val1.txt written by hand
    before = (data / "toy_train1.txt").read_text()
    assert split.main(["--data-dir", str(data), "--labeled", "4"]) == 0
    assert (data / "toy_train1.txt").read_text() == before and not (data / "toy_train2.txt").exists()
    assert set(read_id_list(data / "toy_train1_labeled4.txt")) < set(read_id_list(data / "toy_train1.txt"))
    assert "split files there are kept" in capsys.readouterr().out
    assert split.main(["--data-dir", str(data), "--labeled", "4"]) == 2  # never replaced without --overwrite
    assert "toy_train1_labeled4.txt" in capsys.readouterr().err
    assert split.main(["--data-dir", str(data), "--labeled", "20"]) == 2
    assert "--labeled 20: split 1 has 8 training ids" in capsys.readouterr().err
    # new splits make the old labeled lists stale: --overwrite removes them
    assert split.main(["--data-dir", str(data), "--overwrite"]) == 0
    assert not (data / "toy_train1_labeled4.txt").exists()


def test_reproduce_gives_every_arm_the_splits_labeled_list(tmp_path):
    import reproduce
    from utils.config import ConfigError

    data = write_dataset(tmp_path / "toy", n=20, splits=False)
    assert split.main(["--data-dir", str(data), "--seeds", "1", "2", "--labeled", "4"]) == 0
    args = reproduce.parse_args(["--data-dir", str(data), "--labeled", "4", "--preset", "demo", "--no-estimate"])
    args.nproc_per_node = 1
    assert args.out_dir.name == "toy_n4" and args.labels == "labeled lists of 4"
    stages = reproduce.plan(args, "toy", [1, 2], "cpu")
    training = [s for s in stages if s.command[0] == "train.py"]
    assert len(training) == 2 * 3  # two splits, three arms
    for stage in training:
        i = stage.command[stage.command.index("--split") + 1]
        assert stage.command[stage.command.index("--labeled-list") + 1] == str(data.resolve() / f"toy_train{i}_labeled4.txt")
        assert "--labeled-fraction" not in stage.command
    # the time estimate's iterations: base_iterations x the list's share of the training list (14 ids)
    from fractions import Fraction
    from protocol.estimate import stage_run_data
    from protocol.plan import stage_config
    from utils.schedule import run_schedule

    cfg = stage_config(training[0])
    assert stage_run_data(cfg).labeled_share == pytest.approx(4 / 14)
    assert run_schedule(cfg, stage_run_data(cfg)).iterations == round(round(cfg.base_iterations * 4 / 14)
                                                                      * Fraction(str(cfg.schedule_scale)))
    args.labeled = 5  # no such lists: one error that says how to write them
    with pytest.raises(DataError, match=r"toy_train1_labeled5.txt not found: write it with python split.py .* --labeled 5"):
        reproduce.plan(args, "toy", [1, 2], "cpu")
    with pytest.raises(ConfigError, match="not both"):
        reproduce.parse_args(["--data-dir", str(data), "--labeled", "4", "--labeled-fraction", "0.5"])


@pytest.mark.slow
def test_train_py_labeled_list_errors(dataset, tmp_path):
    import train
    from utils.config import ConfigError

    listed = tmp_path / "labeled.txt"
    listed.write_text(read_id_list(dataset / "toy_val1.txt")[0] + "\n")
    common = ["--data-dir", str(dataset), "--out-dir", str(tmp_path / "run"), "--num-workers", "0", "--no-progress"]
    with pytest.raises(ConfigError, match="--labeled-fraction or --labeled-list, not both"):
        train.main(common + ["--labeled-list", str(listed), "--labeled-fraction", "0.5"])
    with pytest.raises(DataError, match="which is not among the training ids of toy_train1.txt"):
        train.main(common + ["--labeled-list", str(listed)])
