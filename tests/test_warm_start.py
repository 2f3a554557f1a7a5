"""An earlier search's trials placed in a new space (clfsys/warm_start.py): no Ray, no training;
the trials table is written the way results.py writes it (lists as JSON cells, a NaN where a
trial's architecture does not take a parameter)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from clfsys.config import Config
from clfsys.errors import DataError
from clfsys.space import parse_space
from clfsys.warm_start import best, load, place

SPACE = yaml.safe_load("""
train.lr: {loguniform: [0.001, 0.01]}
train.batch_size: 64
model.arch:
  cnn: {model.filters: {choice: [[8], [16]]}}
  mlp: {model.units: {choice: [[32], [64]]}}
""")


def row(trial_id, arch="cnn", lr=0.005, value=0.8, epochs=3, stopped_by="max_epochs", **more):
    params = {"param.train.lr": lr, "param.train.batch_size": 64, "param.model.arch": arch,
              "param.model.filters": json.dumps([8]) if arch == "cnn" else float("nan"),
              "param.model.units": json.dumps([32]) if arch == "mlp" else float("nan")}
    params.update({f"param.{k}": v for k, v in more.items()})
    return {"trial_id": trial_id, **params, "best_val_accuracy": value, "epochs_run": epochs,
            "stopped_by": stopped_by, "checkpoint": f"/runs/a/ray/search/trial_{trial_id}/"
                                                    "checkpoint_000002"}


def placed(r):
    return place(r, parse_space(SPACE), Config())


def test_a_trial_inside_the_space_becomes_a_sample_of_its_own_architecture():
    sample, why = placed(row("a", arch="mlp", lr=0.002))
    assert why == "" and sample == {"train.lr": 0.002, "model.arch": "mlp",
                                    "mlp:model.units": 'json:[32]'}


@pytest.mark.parametrize("changes, why", [
    ({"lr": 0.05}, "train.lr=0.05 is outside loguniform [0.001, 0.01]"),
    ({"arch": "cnn_bn"}, "model.arch='cnn_bn' is outside choice ['cnn', 'mlp']"),
    ({"batch_size": 128}, "train.batch_size=128 is outside fixed [64]"),
    ({"model.filters": json.dumps([32])}, "model.filters=[32] is outside choice [[8], [16]]"),
    ({"train.optimizer": "sgd"}, "train.optimizer='sgd', but the new search uses 'adam'"),
])
def test_a_trial_outside_is_named_with_the_key_that_puts_it_there(changes, why):
    r = row("a", lr=changes.pop("lr", 0.005), arch=changes.pop("arch", "cnn"))
    if "batch_size" in changes:
        r["param.train.batch_size"] = changes.pop("batch_size")
    r.update({f"param.{k}": v for k, v in changes.items()})
    assert placed(r) == (None, why)


def test_a_key_the_earlier_trial_did_not_set_took_the_configs_value():
    r = row("a")
    del r["param.train.batch_size"]  # the earlier space did not fix it: the config's 32 ran
    assert placed(r) == (None, "train.batch_size=32 is outside fixed [64]")
    del r["param.train.lr"]  # the config's lr, 0.001, lies in the new range
    space = {**SPACE, "train.batch_size": 32}
    assert place(r, parse_space(space), Config())[0]["train.lr"] == 0.001


def test_load_counts_every_earlier_trial_and_best_ranks_those_with_a_checkpoint(tmp_path, capsys):
    rows = [row("a", value=0.81, epochs=1, stopped_by="asha"), row("b", value=0.85),
            row("c", value=0.85, epochs=9), row("d", lr=0.5), row("e", value=None, epochs=0)]
    rows[1]["checkpoint"] = None
    (tmp_path / "prev").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "prev" / "trials.parquet")
    warm = load(str(tmp_path / "prev"), parse_space(SPACE), Config())
    assert [e.trial_id for e in warm.inside] == ["a", "b", "c"]
    assert warm.outside == {"d": "train.lr=0.5 is outside loguniform [0.001, 0.01]",
                            "e": "it has no result"}
    a = warm.inside[0]
    assert (a.completed, a.epochs, a.value) == (False, 1, 0.81)
    assert [e.trial_id for e in best(warm, 2)] == ["c", "a"]  # b has no checkpoint
    assert warm.summary(continued=1) == {"from": str(tmp_path / "prev"), "earlier_trials": 5,
                                         "used": 3, "outside_space": 2, "continued": 1}
    assert "5 earlier trials" in capsys.readouterr().err


def test_a_folder_without_a_trials_table_is_refused_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"tune.warm_start.path: cannot read .*trials.parquet"):
        load(str(tmp_path), parse_space(SPACE), Config())
    (tmp_path / "trials.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="is not a trials table"):
        load(str(tmp_path), parse_space(SPACE), Config())
