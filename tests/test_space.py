import pytest
import yaml

from clfsys.config import load_config
from clfsys.errors import ConfigError
from clfsys.space import check_space, overrides, parse_space, trial_config

SPACE = yaml.safe_load("""
train.lr: {loguniform: [1.0e-4, 3.0e-3]}
train.batch_size: {choice: [64, 128]}
model.augment: false
model.arch:
  mlp:
    model.units: {choice: [[512, 256], [256]]}
    model.dropout: {uniform: [0.0, 0.3]}
  cnn_bn:
    model.filters: {choice: [[32, 64], [64, 128]]}
    model.dropout: {uniform: [0.1, 0.4]}
  cnn:
""")


def test_parse_flattens_conditionals_and_encodes_lists():
    params = {p.name: p for p in parse_space(SPACE)}
    assert set(params) == {"train.lr", "train.batch_size", "model.augment", "model.arch",
                           "mlp:model.units", "mlp:model.dropout", "cnn_bn:model.filters",
                           "cnn_bn:model.dropout"}
    assert params["model.arch"].args == ("mlp", "cnn_bn", "cnn")
    assert params["train.lr"].kind == "loguniform" and params["train.lr"].args == (1e-4, 3e-3)
    assert params["model.augment"].kind == "fixed"
    assert params["mlp:model.units"].args == ("json:[512, 256]", "json:[256]")


def test_overrides_keep_only_the_sampled_architectures_parameters():
    sample = {"model.arch": "cnn_bn", "train.lr": 0.001, "mlp:model.units": "json:[256]",
              "mlp:model.dropout": 0.2, "cnn_bn:model.filters": "json:[64, 128]",
              "cnn_bn:model.dropout": 0.3}
    assert overrides(sample) == {"model.arch": "cnn_bn", "train.lr": 0.001,
                                 "model.filters": [64, 128], "model.dropout": 0.3}


def test_trial_config_drops_base_parameters_of_another_architecture():
    base = load_config(None, ["model.arch=cnn", "model.filters=[16]", "model.dense=50"])
    cfg = trial_config(base, {"model.arch": "mlp", "mlp:model.units": "json:[64]"})
    assert cfg.model.arch == "mlp" and cfg.model.units == [64] and cfg.model.filters is None
    same = trial_config(base, {"train.lr": 0.01})
    assert same.model.filters == [16] and same.train.lr == 0.01
    # The base's parameters belong to its arch: another CNN takes its own defaults.
    other = trial_config(base, {"model.arch": "cnn_bn", "cnn_bn:model.dense": 64})
    assert (other.model.filters, other.model.dense, other.model.dropout) == ([32, 32], 64, 0.25)


def test_check_space_accepts_the_example_and_names_bad_keys():
    base = load_config(None, [])
    check_space(base, parse_space(SPACE))
    with pytest.raises(ConfigError, match="unknown config key 'train.learning_rate'"):
        check_space(base, parse_space({"train.learning_rate": {"choice": [0.1]}}))
    with pytest.raises(ConfigError, match="model.arch=mlp.*model.filters is not a parameter"):
        check_space(base, parse_space({"model.arch": {"mlp": {"model.filters": [8]}}}))
    with pytest.raises(ConfigError, match="train.lr must be > 0"):
        check_space(base, parse_space({"train.lr": {"uniform": [-1, 0.1]}}))


@pytest.mark.parametrize("space, message", [
    ({"train.lr": {"loguniform": [0, 1]}}, "tune.space.train.lr.loguniform needs low > 0"),
    ({"train.lr": {"uniform": [1, 0.1]}}, "must be [low, high] with low < high"),
    ({"train.lr": {"normal": [0, 1]}}, "tune.space.train.lr must be a value or one of"),
    ({"train.batch_size": {"choice": []}}, "tune.space.train.batch_size.choice must be a non"),
    ({"model.arch": {"mlp": [1, 2]}}, "tune.space.model.arch.mlp must map config keys"),
])
def test_space_errors_name_the_key(space, message):
    with pytest.raises(ConfigError) as err:
        parse_space(space)
    assert message in str(err.value)
