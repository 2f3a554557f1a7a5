import pytest

from clfsys.config import Config, load_config, parse_override
from clfsys.errors import ConfigError


def test_defaults_and_yaml_with_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  arch: mlp\n  units: [300, 100]\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["train.lr=1e-3", "train.epochs=3", "data.limit=null"])
    assert cfg.model.arch == "mlp" and cfg.model.units == [300, 100]
    assert cfg.train.lr == pytest.approx(0.001)  # "1e-3" is a string to YAML 1.1: accepted
    assert cfg.train.epochs == 3 and cfg.data.limit is None
    assert cfg.data.dataset == "fashion_mnist"


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "train.lr must be > 0, got -1"),
    ("train.lr=abc", "train.lr must be a number, got 'abc'"),
    ("train.epochs=2.5", "train.epochs must be an integer, got 2.5"),
    ("train.early_stopping=maybe", "train.early_stopping must be true or false"),
    ("train.optimizer=rmsprop", "train.optimizer must be one of"),
    ("train.foo=1", "unknown config key 'train.foo'"),
    ("bogus.key=1", "unknown config key 'bogus'"),
    ("model.filters=[0, 5]", "model.filters must be a non-empty list of positive integers"),
    ("model.units=[5]", "model.units is not a parameter of arch 'cnn' (it takes dense, "),
    ("model.arch=vgg", "model.arch must be one of ['cnn', 'cnn_bn', "),
    ("model.units=7", "model.units must be a list"),
    ("data.val_fraction=1.5", "data.val_fraction must be in (0, 1), got 1.5"),
    ("data.dataset=folder", "data.path is required for dataset 'folder'"),
    ("train.lr_plateau_patience=0", "train.lr_plateau_patience must be >= 1, got 0"),
    ("train.lr_decay=step", "train.lr_decay must be one of ['none', 'cosine'], got 'step'"),
    ("tune.warm_start.continue_top=2", "tune.warm_start.continue_top needs "
                                       "tune.warm_start.path (--warm-start), got 2"),
    ("tune.startup_trials=0", "tune.startup_trials must be >= 1, got 0"),
    ("lr=0.1", "must be dotted"),
    ("train.lr", "--set expects key=value"),
])
def test_errors_name_the_dotted_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_the_model_config_is_complete_and_survives_a_round_trip():
    cfg = load_config(None, ["model.arch=cnn_bn", "model.dense=64"])
    assert (cfg.model.filters, cfg.model.dense, cfg.model.units) == ([32, 32], 64, None)
    assert Config.replace(cfg) == cfg and cfg.replace(**{"train.lr": 0.01}).model == cfg.model
    # Another arch takes its own defaults, except what the overrides set.
    mlp = cfg.replace(**{"model.arch": "mlp", "model.dropout": 0.1})
    assert (mlp.model.units, mlp.model.dropout, mlp.model.filters) == ([350], 0.1, None)


def test_cosine_decay_and_the_plateau_schedule_exclude_each_other():
    assert load_config(None, ["train.lr_decay=cosine"]).train.lr_decay == "cosine"
    with pytest.raises(ConfigError, match=r"train.lr_decay .*exclude each other"):
        load_config(None, ["train.lr_decay=cosine", "train.lr_plateau_patience=2"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "list.yaml"
    wrong.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(wrong)


def test_round_trip_and_replace():
    cfg = load_config(None, ["model.arch=cnn_bn", "model.filters=[16, 32]"])
    again = Config.replace(cfg, **{"train.lr": 0.05})
    assert again.train.lr == 0.05 and again.model.filters == [16, 32]
    assert load_config(None, []).to_dict() == Config().to_dict()


def test_parse_override_reads_yaml_values():
    assert parse_override("model.units=[1, 2]") == ("model.units", [1, 2])
    assert parse_override("data.path=/a/b=c") == ("data.path", "/a/b=c")
    assert parse_override("data.limit=") == ("data.limit", None)


@pytest.mark.parametrize("num_samples, startup", [(3, 2), (9, 3), (12, 4), (100, 10)])
def test_tpe_starts_at_random_for_a_third_of_the_samples_between_2_and_10(num_samples, startup):
    cfg = load_config(None, [f"tune.num_samples={num_samples}"])
    assert cfg.tune.startup_trials is None and cfg.tune.tpe_startup == startup
    assert load_config(None, ["tune.startup_trials=7"]).tune.tpe_startup == 7

