"""A protocol folder made before issue 27's restructuring reruns with every stage "done": the ledger
(protocol/ledger.py) compares each stage's command and resolved configuration with what it recorded,
so the plan of a fixed protocol must give, stage for stage, the commands and configurations that
commit a84991b (before protocol/ existed) gave. tests/fixtures/plan_a84991b.json is that commit's
plan, with the temporary folder and the checkout as <TMP> and <ROOT>.

A difference here is a folder of an existing --out-dir turned stale: a new config key, a changed
default, a flag added to a stage's command. Make such a change on purpose only, and say so.
(Checked once by hand as well: a demo.py --quick folder made at a84991b reran with all 18 stages
done and byte-identical results.csv and stages.json.)"""
from __future__ import annotations

import json
from pathlib import Path

from conftest import ROOT, write_dataset


# Since a84991b two changes reached the plan on purpose, and the ledger takes both without calling a stage
# stale: issue 32 added the option pretrain_share to train.py (a key a recorded configuration lacks counts
# as unchanged at its default: Stage.defaults), and issue 30 added --trained-ids to predict.py's command
# (ADDED_OUTPUT_FLAGS: such a predict stage is made again, adding the clean subset). Issue 31 added
# train_ldm.py's conditioning options and train.py's synthetic_pairs options, all at their defaults here.
def test_the_plan_of_a_fixed_protocol_is_the_one_before_the_restructuring(tmp_path):
    import reproduce
    from protocol.ledger import ADDED_OUTPUT_FLAGS, without_flags
    from protocol.plan import plan

    data = write_dataset(tmp_path / "toy", n=15, size=(40, 48))
    args = reproduce.parse_args([
        "--data-dir", str(data), "--out-dir", str(tmp_path / "out"), "--preset", "demo", "--seeds", "1", "2",
        "--arms", "supervised", "mgcc-real", "mgcc-synthetic", "cct-unet-real", "--holdout", "0.2",
        "--labeled-fraction", "0.5", "--schedule-scale", "0.01", "--train-args", "--width 4",
        "--ldm-args", "--vae-steps 4", "--sample-args", "--steps 3", "--no-progress"])
    args.nproc_per_node = 1
    expected = json.loads((Path(__file__).parent / "fixtures" / "plan_a84991b.json").read_text())
    # per stage, as the ledger compares them (issue 31 added to train_ldm.py keys that train.py stages have)
    recorded_keys = {s["name"]: set(s["config"] or ()) for s in expected}
    stages = []
    for stage in plan(args, "toy", [1], "cpu"):
        config, files = stage.reads()
        if config is not None:  # keys added since a84991b, at their defaults, as the ledger reads them
            config = {k: v for k, v in config.items()
                      if k in recorded_keys.get(stage.name, ()) or stage.defaults.get(k, object()) != v}
        stages.append({"name": stage.name, "command": without_flags(stage.command, ADDED_OUTPUT_FLAGS),
                       "depends": stage.depends, "folder": str(stage.folder), "config": config, "files": sorted(files)})
    text = json.dumps(stages, default=str).replace(str(tmp_path.resolve()), "<TMP>").replace(str(ROOT), "<ROOT>")
    now = json.loads(text)
    assert [s["name"] for s in now] == [s["name"] for s in expected]
    for old, new in zip(expected, now):
        assert new == old, old["name"]
