"""Ray's non-public APIs that clfsys relies on (clfsys/raykit.py and the TrialDirs callback),
checked without starting Ray: each assertion names the API, so a Ray upgrade that changes one
fails here first, not in a search."""

import inspect

from clfsys import raykit


def test_function_trainables_take_mixins_as_base_classes():
    from ray.tune.trainable import Trainable
    from ray.tune.trainable.function_trainable import wrap_function

    def trial(config):
        pass

    wrapped = wrap_function(raykit.restore_only_whole(trial, lambda checkpoint: True))
    mixin = trial.__mixins__[0]
    assert issubclass(wrapped, mixin), "ray.tune wrap_function no longer honours __mixins__"
    assert wrapped.__mro__.index(mixin) < wrapped.__mro__.index(Trainable), \
        "a __mixins__ class no longer comes before Trainable: its restore would not run first"
    assert list(inspect.signature(Trainable.restore).parameters) == ["self", "checkpoint_path"], \
        "Trainable.restore(checkpoint_path) changed"


def test_a_restore_is_given_a_training_result_with_checkpoint_and_metrics():
    from ray.train._internal.session import _TrainingResult
    from ray.tune.execution.tune_controller import TuneController

    fields = set(inspect.signature(_TrainingResult).parameters)
    assert {"checkpoint", "metrics"} <= fields, "_TrainingResult(checkpoint, metrics) changed"
    source = inspect.getsource(TuneController._schedule_trial_restore)
    assert "args = (checkpoint_result,)" in source, \
        "TuneController no longer passes the trial's _TrainingResult to Trainable.restore"


def test_the_trial_context_reaches_its_storage():
    from ray.train._internal.storage import StorageContext
    from ray.tune.context import TuneContext

    assert hasattr(TuneContext, "get_storage"), "ray.tune.get_context().get_storage() is gone"
    init = set(inspect.signature(StorageContext).parameters)
    assert "current_checkpoint_index" in init, "StorageContext.current_checkpoint_index is gone"
    for name in ("storage_filesystem", "trial_fs_path"):
        assert name in inspect.getsource(StorageContext), f"StorageContext.{name} is gone"
    assert "self.current_checkpoint_index += 1" in inspect.getsource(
        StorageContext._update_checkpoint_index), \
        "StorageContext no longer numbers the next checkpoint current_checkpoint_index + 1"


def test_a_trial_can_be_given_its_directory_early():
    from ray.tune.experiment import Trial

    assert callable(Trial.init_local_path), "Trial.init_local_path() is gone"
    assert "relative_logdir" in inspect.getsource(Trial.init_local_path), \
        "Trial.init_local_path no longer names the trial's folder from relative_logdir"


def test_a_result_grid_reaches_its_trials_and_their_failures():
    from ray.tune import ResultGrid
    from ray.tune.experiment import Trial
    from ray.tune.experiment.trial import _TrainingRunMetadata

    assert "_experiment_analysis" in inspect.getsource(ResultGrid.__init__), \
        "ResultGrid._experiment_analysis is gone"
    assert "num_failures" in inspect.getsource(_TrainingRunMetadata), \
        "Trial.run_metadata.num_failures is gone"
    assert isinstance(Trial.pickled_error_file, property), "Trial.pickled_error_file is gone"
    assert "cloudpickle.dump(exc" in inspect.getsource(Trial.handle_error), \
        "Tune no longer pickles a trial's last exception"


def test_per_node_free_resources_tunes_view_and_the_haproxy_binary_are_reachable():
    from ray._private import state
    from ray.serve._private import haproxy
    from ray.tune.execution.tune_controller import TuneController

    assert callable(getattr(state, "available_resources_per_node", None)), \
        "ray._private.state.available_resources_per_node is gone"
    source = inspect.getsource(TuneController.__init__)
    assert "self._resource_updater = " in source, "TuneController._resource_updater is gone"
    updater = source.split("self._resource_updater = ")[1].split("(")[0].strip()
    from ray.tune.execution import tune_controller

    kind = getattr(tune_controller, updater)
    for name in ("get_num_cpus", "get_num_gpus"):
        assert callable(getattr(kind, name, None)), f"{updater}.{name} is gone"
    assert callable(getattr(haproxy, "_resolve_haproxy_binary", None)), \
        "ray.serve._private.haproxy._resolve_haproxy_binary is gone"
    found = raykit.haproxy_binary()
    assert found is None or found.endswith("haproxy")


def test_a_deferred_ingress_app_is_public():
    """clfsys.serve builds its app at replica start through `__serve_build_asgi_app__`, which
    `serve.ingress()` documents for a class given no app: public, so not in raykit."""
    from ray import serve

    assert "__serve_build_asgi_app__" in (serve.ingress.__doc__ or ""), \
        "serve.ingress no longer documents __serve_build_asgi_app__"
