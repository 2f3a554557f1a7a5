"""The search's trial schedulers and all their bookkeeping (Ray Tune TrialSchedulers).

`PromotingASHA` is ASHA with promotions: Li et al., "A System for Massively Parallel
Hyperparameter Tuning" (MLSys 2020), Algorithm 2. Rungs sit at grace_period * reduction_factor**k
epochs, below max_epochs. A trial that reaches a rung is paused there (Tune keeps its
checkpoint). Whenever a worker is free, a paused trial is promoted (resumed) when it ranks in the
top 1/reduction_factor of every result recorded at its rung, best rung first; only then does a
new configuration start. When nothing is left to start and nothing runs, the lowest rung holding
paused trials is decided for good: its best go on (at least one), the rest stop.

Ray's AsyncHyperBandScheduler decides instead at the moment a trial reaches a rung, against the
trials that got there before it: the first few at each rung have nothing to beat and go on, so
with a dozen trials and two workers most trials run far. Promotions spend a predictable budget:
about n * grace + n/rf * (next rung - grace) + ... epochs for n configurations.

Three things Tune would otherwise decide behind the scheduler's back:
- Tune starts every PENDING trial by itself, first come first served, so a new configuration
  could take the worker a due promotion should get. New trials are therefore parked as PAUSED
  when they are added, and only `choose_trial_to_run` starts them. Tune then asks the searcher
  for every configuration at once (parked trials are not pending); a searcher that learns from
  results asks `wants_configuration` first, and gets one in turn (clfsys/searchers.py).
- Tune's and the searchers' concurrency limits count paused trials as live, so a limit of 2 would
  decide each rung among 2 trials. The limit (`max_concurrent`) is applied here instead, to
  trials that run or are about to.
- Tune does not save a scheduler's state. The rung records live in a JSON file beside the
  search's outputs, written on every change and read back when a search resumes.

The last trial standing gets the node. Near the end of a search one trial often runs alone
(the top rung, or the last promotion) on the CPUs of one trial while the rest of its node idles.
When a CPU-only trial is the only one running and nothing else could start before its next rung
(no new configuration, no due promotion), it is paused after its epoch and restarted from that
checkpoint with every CPU free on its node (`node_room`); the trial sizes TensorFlow's threads
to what it holds. Any trial that starts alongside others starts with its base resources again.

`RecordingASHA` is Ray's own asynchronous ASHA, noting which trials it stopped early in the same
file, so trials.csv can say `stopped_by: asha` for both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from clfsys import raykit, storage

STATE_FILE = "asha_state.json"


def load_state(location: str) -> dict[str, Any]:
    """The scheduler state saved at `location` (a STATE_FILE location); {} if there is none."""
    try:
        return json.loads(storage.read_text(location))
    except storage.StorageError as exc:
        if exc.not_found:
            return {}
        raise


def asha_stops(location: str) -> dict[str, int]:
    """Trial id -> the epoch at which ASHA stopped it, from the state at `location`."""
    return {k: int(v) for k, v in load_state(location).get("stopped", {}).items()}


class Rungs:
    """PromotingASHA's records: the rungs (epochs), each rung's results, who was promoted from
    it, who waits at it, who was stopped or failed; written to `state_file` on every change and
    read back when a search resumes."""

    def __init__(self, *, grace_period: int, reduction_factor: int, max_t: int, mode: str,
                 state_file: str):
        self.rf, self.mode, self.state_file = reduction_factor, mode, state_file
        self.rungs: list[int] = []
        milestone = grace_period
        while milestone < max_t:
            self.rungs.append(milestone)
            milestone *= reduction_factor
        self.recorded: dict[int, dict[str, float]] = {r: {} for r in self.rungs}
        self.promoted: dict[int, list[str]] = {r: [] for r in self.rungs}
        self.paused_at: dict[str, int] = {}  # trial id -> rung, while it waits there
        self.stopped: dict[str, int] = {}  # trial id -> rung at which it was stopped
        self.failed: set[str] = set()  # errored for good: never promoted

    def load(self) -> None:
        saved = load_state(self.state_file)
        if saved:
            if saved["rungs"] != self.rungs:
                raise ValueError(f"{self.state_file} holds rungs {saved['rungs']}, this search "
                                 f"has {self.rungs}")
            self.recorded = {r: dict(saved["recorded"][str(r)]) for r in self.rungs}
            self.promoted = {r: list(saved["promoted"][str(r)]) for r in self.rungs}
            self.paused_at = {k: int(v) for k, v in saved["paused_at"].items()}
            self.stopped = {k: int(v) for k, v in saved["stopped"].items()}
            self.failed = set(saved["failed"])

    def save(self) -> None:
        storage.write_text(self.state_file, json.dumps({
            "rungs": self.rungs, "recorded": self.recorded, "promoted": self.promoted,
            "paused_at": self.paused_at, "stopped": self.stopped,
            "failed": sorted(self.failed)}, indent=1))

    def record(self, rung: int, trial_id: str, value: float) -> None:
        """A trial reached `rung` with `value`: it waits there."""
        self.recorded[rung][trial_id] = value
        self.paused_at[trial_id] = rung
        self.save()

    def leave(self, trial_id: str, failed: bool = False) -> None:
        """The trial no longer waits at a rung (it completed, errored or was removed)."""
        waited = self.paused_at.pop(trial_id, None) is not None
        if failed:
            self.failed.add(trial_id)
        if waited or failed:
            self.save()

    def promote(self, rung: int, trial_id: str) -> None:
        self.promoted[rung].append(trial_id)
        del self.paused_at[trial_id]
        self.save()

    def stop(self, rung: int, trial_id: str) -> None:
        del self.paused_at[trial_id]
        self.stopped[trial_id] = rung
        self.save()

    def ranked(self, rung: int) -> list[str]:
        """Trial ids recorded at `rung`, best first (ties: the first recorded first)."""
        values = self.recorded[rung]
        return sorted(values, key=values.__getitem__, reverse=self.mode == "max")

    def waiting(self, rung: int, trials: dict[str, Trial]) -> list[str]:
        """Paused trials waiting at `rung`, best first."""
        return [t for t in self.ranked(rung) if self.paused_at.get(t) == rung
                and t in trials and trials[t].status == Trial.PAUSED]

    def due(self, rung: int, trials: dict[str, Trial]) -> str | None:
        """A trial waiting at `rung` that ranks in the top 1/rf of the results recorded there
        while promotions are left; a trial that errored takes no place in the top."""
        allowed = len(self.recorded[rung]) // self.rf
        if len(self.promoted[rung]) >= allowed:
            return None
        top = [t for t in self.ranked(rung) if t not in self.failed][:allowed]
        waiting = set(self.waiting(rung, trials))
        return next((t for t in top if t in waiting), None)

    def slots(self, rung: int) -> int:
        """Promotions left at `rung` when it is decided for good (at least one in all)."""
        return max(0, max(1, len(self.recorded[rung]) // self.rf) - len(self.promoted[rung]))


class PromotingASHA(FIFOScheduler):
    """ASHA that pauses trials at rungs and promotes the top 1/reduction_factor (the records
    are a `Rungs`); it also grows the last trial standing."""

    def __init__(self, *, metric: str, mode: str, time_attr: str, max_t: int,
                 grace_period: int, reduction_factor: int, state_file: str,
                 max_concurrent: int | None = None,
                 node_room: Callable[[], dict[str, float]] | None = None):
        super().__init__()
        self.max_t = max_t
        self.node_room = node_room  # node id -> CPUs free there; None: never grow a trial
        self.grown: dict[str, float] = {}  # trial id -> CPUs, for a trial paused to grow
        self.base_cpus = math.inf  # every trial's own CPUs (the search gives all the same)
        self.rank_metric, self.time_attr = metric, time_attr
        self.max_concurrent = max_concurrent
        self.records = Rungs(grace_period=grace_period, reduction_factor=reduction_factor,
                             max_t=max_t, mode=mode, state_file=state_file)
        self.rungs = self.records.rungs
        self.fresh: set[str] = set()  # trials added and never started

    # The records this class and the tests read; Rungs' methods change them.
    recorded = property(lambda self: self.records.recorded)
    promoted = property(lambda self: self.records.promoted)
    paused_at = property(lambda self: self.records.paused_at)

    def set_search_properties(self, metric, mode, **spec) -> bool:
        # Tune calls this before it adds any trial, also when a search resumes; the rung
        # records of the interrupted run are read back here.
        self.records.load()
        return True

    # --- trial events --------------------------------------------------------------------

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        # Tune reads the status after this call, so a trial parked here is never started by
        # Tune itself (see the module docstring). Trials of a resumed search come back PENDING.
        if trial.status == Trial.PENDING:
            trial.set_status(Trial.PAUSED)
            if not trial.last_result.get(self.time_attr):
                self.fresh.add(trial.trial_id)
        self.base_cpus = min(self.base_cpus, _cpus(trial))

    def on_trial_result(self, tune_controller, trial: Trial, result: dict[str, Any]) -> str:
        milestone = result.get(self.time_attr)
        value = result.get(self.rank_metric)
        if milestone not in self.recorded or value is None:
            return self._grow(tune_controller, trial, result)
        if trial.trial_id in self.recorded[milestone]:
            return TrialScheduler.CONTINUE  # resumed from this rung
        self.records.record(milestone, trial.trial_id, float(value))
        return TrialScheduler.PAUSE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict[str, Any]) -> None:
        self.fresh.discard(trial.trial_id)
        self.records.leave(trial.trial_id)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self.fresh.discard(trial.trial_id)
        self.records.leave(trial.trial_id, failed=True)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self.fresh.discard(trial.trial_id)
        self.records.leave(trial.trial_id)

    def wants_configuration(self) -> bool:
        """Whether a searcher should choose a new configuration now: none is waiting to start.
        A searcher that learns from results (RungTPE) then chooses each one as late as it
        can while one is always ready for the next free worker."""
        return not self.fresh

    # --- what runs next ------------------------------------------------------------------

    def _capacity(self, tune_controller, trials: list[Trial]) -> int:
        """How many trials may run at once: max_concurrent, or as many as the cluster's CPUs
        and GPUs hold now (at least one, so an autoscaler sees demand)."""
        if self.max_concurrent:
            return self.max_concurrent
        need = trials[0].placement_group_factory.required_resources if trials else {}
        have = raykit.tune_cluster_resources(tune_controller)
        fits = [math.floor(have[k] / need[k] + 1e-9) for k in have if need.get(k)]
        return max(1, min(fits, default=1))

    def _grow(self, tune_controller, trial: Trial, result: dict[str, Any]) -> str:
        """PAUSE a trial that runs alone so that it restarts with its node's free CPUs, when
        nothing else could start before its next rung and at least 2 epochs are left there."""
        epoch = result.get(self.time_attr) or 0
        next_stop = min([r for r in self.rungs if r > epoch] + [self.max_t])
        resources = trial.placement_group_factory.required_resources
        if (self.node_room is None or resources.get("GPU") or next_stop - epoch < 2
                or result.get("done") or "node_id" not in result):
            return TrialScheduler.CONTINUE
        listed = tune_controller.get_trials()
        trials = {t.trial_id: t for t in listed}
        others = [t for t in listed if t is not trial and (
            t.status in (Trial.RUNNING, Trial.PENDING)
            or (t.status == Trial.PAUSED and t.trial_id not in self.paused_at))]
        if others or any(self.records.due(rung, trials) for rung in self.rungs):
            return TrialScheduler.CONTINUE
        room = self.node_room()
        here = _cpus(trial) + room.get(result["node_id"], 0.0)
        cpus = float(math.floor(max([here, *room.values()])))
        if cpus <= _cpus(trial):
            return TrialScheduler.CONTINUE
        self.grown[trial.trial_id] = cpus
        return TrialScheduler.PAUSE

    def _resize(self, trial: Trial) -> Trial:
        """A trial about to start: with the CPUs it was paused to grow into, else its base."""
        cpus = self.grown.pop(trial.trial_id, self.base_cpus)
        if cpus != _cpus(trial):
            resources = dict(trial.placement_group_factory.required_resources)
            trial.update_resources({**resources, "CPU": cpus})
        return trial

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        trial = self._choose(tune_controller)
        return None if trial is None else self._resize(trial)

    def _choose(self, tune_controller) -> Trial | None:
        listed = tune_controller.get_trials()
        trials = {t.trial_id: t for t in listed}
        busy = sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in listed)
        parked = [t for t in listed if t.status == Trial.PAUSED and t.trial_id not in
                  self.paused_at]
        for trial in parked:
            if trial.trial_id in self.records.stopped:  # resumed: stopped before the kill
                tune_controller.stop_trial(trial)
                return None
        if busy >= self._capacity(tune_controller, listed):
            return None
        # 1. A trial with progress that is not waiting at a rung: promoted along with others
        #    when a rung was decided, or interrupted mid-run. It goes on.
        for trial in parked:
            if trial.last_result.get(self.time_attr):
                return trial
        # 2. Due promotions, best rung first.
        for rung in reversed(self.rungs):
            trial_id = self.records.due(rung, trials)
            if trial_id is not None:
                self.records.promote(rung, trial_id)
                return trials[trial_id]
        # 3. A new configuration, in the order the searcher gave them.
        if parked:
            trial = min(parked, key=lambda t: t.trial_id)
            self.fresh.discard(trial.trial_id)
            return trial
        if busy:
            return None
        # 4. Nothing to start and nothing running: decide the lowest rung with waiting trials.
        for rung in self.rungs:
            waiting = self.records.waiting(rung, trials)
            if not waiting:
                continue
            slots = self.records.slots(rung)
            for trial_id in waiting[slots:]:
                self.records.stop(rung, trial_id)
                tune_controller.stop_trial(trials[trial_id])
            for trial_id in waiting[:slots]:
                self.records.promote(rung, trial_id)
            if slots:
                return trials[waiting[0]]
        return None

    def debug_string(self) -> str:
        rungs = ", ".join(f"{r}: {len(self.recorded[r])} in, {len(self.promoted[r])} on"
                          for r in self.rungs)
        return f"ASHA with promotions (rungs at epochs {rungs})"


def _cpus(trial: Trial) -> float:
    return float(trial.placement_group_factory.required_resources.get("CPU", 0.0))


class RecordingASHA(AsyncHyperBandScheduler):
    """Ray's asynchronous ASHA, recording in `state_file` which trials it stopped before
    max_t (for trials.csv)."""

    def __init__(self, *, state_file: str, time_attr: str, max_t: int, **kwargs):
        super().__init__(time_attr=time_attr, max_t=max_t, **kwargs)
        self.state_file, self.epoch_attr, self.max_epochs = state_file, time_attr, max_t

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        epoch = result.get(self.epoch_attr, self.max_epochs)
        if action == TrialScheduler.STOP and epoch < self.max_epochs:
            state = load_state(self.state_file)
            state.setdefault("stopped", {})[trial.trial_id] = epoch
            storage.write_text(self.state_file, json.dumps(state, indent=1))
        return action


class TrialDirs(Callback):
    """Gives every trial its directory by the end of the step that added it.

    Tune names a trial's directory when it asks for the trial's actor. A trial that never gets
    one (PromotingASHA parks new trials until it chooses them; FIFO asks for a limited number of
    actors at a time) has none when a time budget ends the search, and Tune's own closing
    progress report then raises on it ("Should not access trial_driver_staging_path without
    setting trial_dir_name"), losing the whole search.
    """

    def on_step_end(self, iteration: int, trials: list[Trial], **info) -> None:
        for trial in trials:
            raykit.name_trial_dir(trial)
