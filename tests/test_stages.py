"""protocol/ledger.py: which stages of a pipeline are done, resume, run afresh, or are stale."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from utils.config import ConfigError
from protocol.ledger import Ledger, Stage, check_plan, describe_change, experiment_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_stages(tmp_path, iterations=4):
    first = Stage("a", ["script.py", "--out-dir", str(tmp_path / "a"), "--iterations", str(iterations)], tmp_path / "a",
                  resume=lambda: ["script.py", "--resume"] if (tmp_path / "a" / "last.pt").exists() else None)
    second = Stage("b", ["other.py", "--from", str(tmp_path / "a")], tmp_path / "b", depends=["a"])
    return [first, second]


def finish(ledger, stage):
    stage.folder.mkdir(exist_ok=True)
    ledger.start(stage)
    ledger.add_time(stage, 1.5, finished=True)


def test_statuses_follow_the_ledger_and_the_folders(tmp_path):
    ledger = Ledger(tmp_path / "stages.json")
    a, b = make_stages(tmp_path)
    assert check_plan([a, b], ledger) == {"a": "todo", "b": "todo"}
    a.folder.mkdir()
    ledger.start(a)  # started, interrupted before any checkpoint: run again from scratch
    assert check_plan([a, b], Ledger(tmp_path / "stages.json")) == {"a": "todo", "b": "todo"}
    (a.folder / "last.pt").write_text("x")  # a checkpoint to continue from
    assert check_plan([a, b], Ledger(tmp_path / "stages.json"))["a"] == "resume"
    ledger.add_time(a, 2.0, finished=True)
    finish(ledger, b)
    reloaded = Ledger(tmp_path / "stages.json")
    assert check_plan([a, b], reloaded) == {"a": "done", "b": "done"}
    assert reloaded.seconds("a") == 2.0 and reloaded.seconds("b") == 1.5


def test_another_device_or_progress_flag_does_not_make_a_stage_stale(tmp_path):
    ledger = Ledger(tmp_path / "stages.json")
    a, b = make_stages(tmp_path)
    finish(ledger, a)
    finish(ledger, b)
    a.command += ["--device", "cuda", "--no-progress", "--overwrite"]
    assert check_plan([a, b], ledger) == {"a": "done", "b": "done"}
    assert experiment_args(a.command) == a.command[:5]


def test_changed_option_and_remade_input_are_stale(tmp_path):
    ledger = Ledger(tmp_path / "stages.json")
    a, b = make_stages(tmp_path)
    finish(ledger, a)
    finish(ledger, b)
    changed = make_stages(tmp_path, iterations=6)
    with pytest.raises(ConfigError) as error:
        check_plan(changed, ledger)
    assert "a (" in str(error.value) and "--iterations 4 -> 6" in str(error.value)
    assert "b (" in str(error.value) and "made again" in str(error.value)  # b was made from the old a
    # a deleted folder is made again, and what was made from it is then stale
    for path in a.folder.iterdir():
        path.unlink()
    a.folder.rmdir()
    with pytest.raises(ConfigError, match=r"b \(.*made from an earlier a"):
        check_plan([a, b], ledger)


def test_describe_change():
    assert describe_change(["t.py", "--x", "1", "--y"], ["t.py", "--x", "2", "--z", "3"]) == \
        "--x 1 -> 2, --z 3 added, --y removed"


@pytest.mark.slow
def test_a_signal_reaches_the_running_stage_once_and_its_status_is_returned(tmp_path):
    """SIGTERM to the runner's whole process group: the stage (in its own session) gets it once, from
    the runner, finishes, and its exit status (143) is the runner's; the ledger keeps it unfinished."""
    script = tmp_path / "stage.py"
    marks = tmp_path / "marks"
    script.write_text(
        "import signal, sys, time\n"
        f"marks = open({str(marks)!r}, 'a')\n"
        "def handle(signum, frame):\n"
        "    marks.write('signal\\n'); marks.flush()\n"
        "    time.sleep(0.5); sys.exit(128 + signum)\n"
        "signal.signal(signal.SIGTERM, handle)\n"
        "marks.write('started\\n'); marks.flush()\n"
        "time.sleep(60)\n")
    runner = tmp_path / "runner.py"
    runner.write_text(
        "import sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from pathlib import Path\n"
        "from protocol.ledger import Ledger, Stage, execute\n"
        f"stage = Stage('s', [{str(script)!r}], Path({str(tmp_path / 'out')!r}))\n"
        f"ledger = Ledger(Path({str(tmp_path / 'stages.json')!r}))\n"
        "sys.exit(execute([stage], ledger, {'s': 'todo'}, Path('.')))\n")
    process = subprocess.Popen([sys.executable, str(runner)], start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (marks.exists() and "started" in marks.read_text()):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    assert marks.read_text().count("signal") == 1
    assert "Traceback" not in stderr and "rerun the same command" in stderr
    assert Ledger(tmp_path / "stages.json").stages["s"]["finished"] is None


def reading_stage(tmp_path, config_file, data_files):
    """A stage whose resolved configuration is the YAML file's contents and which reads ``data_files``."""
    import yaml

    def reads():
        return yaml.safe_load(config_file.read_text()), {p.name: p for p in data_files}
    return Stage("train", ["train.py", "--config", str(config_file)], tmp_path / "run", reads=reads)


def test_an_edited_config_or_a_changed_file_makes_a_finished_stage_stale(tmp_path):
    """The command names the config by path: only its contents tell that it changed. A file that
    is copied (new modification time, same bytes) is no change; one byte of an image is."""
    config = tmp_path / "busi.yaml"
    config.write_text("iterations: 20000\nlr: 0.01\n")
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    for k, path in enumerate(images):
        path.write_bytes(bytes([k]) * 100)
    ledger = Ledger(tmp_path / "stages.json")
    finish(ledger, reading_stage(tmp_path, config, images))
    assert check_plan([reading_stage(tmp_path, config, images)], Ledger(tmp_path / "stages.json")) == {"train": "done"}

    os.utime(images[0], (1e9, 1e9))  # touched, copied: same bytes
    assert check_plan([reading_stage(tmp_path, config, images)], Ledger(tmp_path / "stages.json")) == {"train": "done"}

    config.write_text("iterations: 5\nlr: 0.5\n")
    with pytest.raises(ConfigError) as error:
        check_plan([reading_stage(tmp_path, config, images)], Ledger(tmp_path / "stages.json"))
    assert "train (" in str(error.value) and "config iterations 20000 -> 5; config lr 0.01 -> 0.5" in str(error.value)

    config.write_text("iterations: 20000\nlr: 0.01\n")
    images[1].write_bytes(bytes([1]) * 99 + b"x")  # same size, new content
    with pytest.raises(ConfigError, match=r"train \(.*: what it read has changed: file b.png changed\n"):
        check_plan([reading_stage(tmp_path, config, images)], Ledger(tmp_path / "stages.json"))
    images[1].unlink()
    with pytest.raises(ConfigError, match=r"file b.png removed"):
        check_plan([reading_stage(tmp_path, config, images)], Ledger(tmp_path / "stages.json"))
    extra = tmp_path / "c.png"
    extra.write_bytes(b"c")
    with pytest.raises(ConfigError, match=r"file c.png added"):
        check_plan([reading_stage(tmp_path, config, [images[0], extra])], Ledger(tmp_path / "stages.json"))
    # a stage that stopped before any checkpoint made nothing: it runs again with what is there now
    unfinished = Ledger(tmp_path / "stages.json")
    unfinished.stages["train"]["finished"] = None
    assert check_plan([reading_stage(tmp_path, config, [images[0], extra])], unfinished) == {"train": "todo"}
    # the ledger keeps one copy of each file list, shared by the stages that read it
    assert len(json.loads((tmp_path / "stages.json").read_text())["file_sets"]) == 1


def test_an_option_added_since_at_its_default_and_an_output_flag_added_since_keep_the_ledger(tmp_path):
    """A stage recorded before an option existed stays done while the option is at its default (and is
    stale once it is not); a predict stage recorded before --trained-ids is made again, not refused."""
    trained = Stage("t", ["train.py", "--out-dir", str(tmp_path / "t")], tmp_path / "t",
                    reads=lambda: ({"lr": 0.01}, {}), defaults={"lr": 0.01, "pretrain_share": 0.25})
    predicted = Stage("p", ["predict.py", "--output-dir", str(tmp_path / "p")], tmp_path / "p", depends=["t"])
    ledger = Ledger(tmp_path / "stages.json")
    finish(ledger, trained)
    finish(ledger, predicted)
    trained.reads = lambda: ({"lr": 0.01, "pretrain_share": 0.25}, {})  # the option added since, at its default
    predicted.command = predicted.command + ["--trained-ids", "train1.txt"]
    assert check_plan([trained, predicted], Ledger(tmp_path / "stages.json")) == {"t": "done", "p": "todo"}
    trained.reads = lambda: ({"lr": 0.01, "pretrain_share": 0.5}, {})  # ... and not at its default
    with pytest.raises(ConfigError, match="pretrain_share"):
        check_plan([trained], Ledger(tmp_path / "stages.json"))
