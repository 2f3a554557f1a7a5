"""ASHA with promotions, as a Ray Tune trial scheduler.

Li et al., "A System for Massively Parallel Hyperparameter Tuning" (MLSys 2020), Algorithm 2.
Rungs sit at grace_period * reduction_factor**k epochs, below max_epochs. A trial that reaches a
rung is paused there (Tune keeps its checkpoint). Whenever a worker is free, a paused trial is
promoted (resumed) when it ranks in the top 1/reduction_factor of every result recorded at its
rung, best rung first; otherwise a new configuration starts. When nothing is left to start and
nothing runs, the lowest rung holding paused trials is decided for good: its best go on (at least
one), the rest stop.

Ray's AsyncHyperBandScheduler decides instead at the moment a trial reaches a rung, against the
trials that got there before it: the first few at each rung have nothing to beat and go on, so
with a dozen trials and two workers most trials run far. Promotions spend a predictable budget:
about n * grace + n/rf * (next rung - grace) + ... epochs for n configurations.
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from clfsys.results import record_asha_stop


class PromotingASHA(FIFOScheduler):
    """ASHA that pauses trials at rungs and promotes the top 1/reduction_factor."""

    def __init__(self, *, metric: str, mode: str, time_attr: str, max_t: int,
                 grace_period: int, reduction_factor: int, stopped_log: str):
        super().__init__()
        self.rank_metric, self.rank_mode, self.time_attr = metric, mode, time_attr
        self.rf = reduction_factor
        self.rungs: list[int] = []
        milestone = grace_period
        while milestone < max_t:
            self.rungs.append(milestone)
            milestone *= reduction_factor
        self.recorded: dict[int, dict[str, float]] = {r: {} for r in self.rungs}
        self.promoted: dict[int, set[str]] = {r: set() for r in self.rungs}
        self.paused_at: dict[str, int] = {}  # trial id -> rung, while it waits there
        self.stopped_log = stopped_log

    # --- results -------------------------------------------------------------------------

    def on_trial_result(self, tune_controller, trial: Trial, result: dict[str, Any]) -> str:
        milestone = result.get(self.time_attr)
        value = result.get(self.rank_metric)
        if milestone not in self.recorded or value is None:
            return TrialScheduler.CONTINUE
        if trial.trial_id in self.recorded[milestone]:
            return TrialScheduler.CONTINUE  # resumed from this rung
        self.recorded[milestone][trial.trial_id] = float(value)
        self.paused_at[trial.trial_id] = milestone
        return TrialScheduler.PAUSE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict[str, Any]) -> None:
        self.paused_at.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self.paused_at.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self.paused_at.pop(trial.trial_id, None)

    # --- what runs next ------------------------------------------------------------------

    def _ranked(self, rung: int) -> list[str]:
        """Trial ids recorded at `rung`, best first."""
        values = self.recorded[rung]
        return sorted(values, key=values.__getitem__, reverse=self.rank_mode == "max")

    def _waiting(self, rung: int, trials: dict[str, Trial]) -> list[str]:
        """Paused trials waiting at `rung` (promotion takes them out of paused_at), best
        first."""
        return [t for t in self._ranked(rung) if self.paused_at.get(t) == rung
                and t in trials and trials[t].status == Trial.PAUSED]

    def _promote(self, rung: int, trial: Trial) -> Trial:
        self.promoted[rung].add(trial.trial_id)
        del self.paused_at[trial.trial_id]
        return trial

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        trials = {t.trial_id: t for t in tune_controller.get_trials()}
        for trial in trials.values():
            # Paused but not waiting at a rung: promoted along with others when a rung was
            # decided, or restored from an interrupted search. It goes on.
            if trial.status == Trial.PAUSED and trial.trial_id not in self.paused_at:
                return trial
        for rung in reversed(self.rungs):
            allowed = len(self.recorded[rung]) // self.rf
            top = set(self._ranked(rung)[:allowed])
            for trial_id in self._waiting(rung, trials):
                if len(self.promoted[rung]) < allowed and trial_id in top:
                    return self._promote(rung, trials[trial_id])
        for trial in trials.values():
            if trial.status == Trial.PENDING:
                return trial
        if any(t.status == Trial.RUNNING for t in trials.values()):
            return None
        # Nothing to start and nothing running: decide the lowest rung with waiting trials.
        for rung in self.rungs:
            waiting = self._waiting(rung, trials)
            if not waiting:
                continue
            slots = max(0, max(1, len(self.recorded[rung]) // self.rf)
                        - len(self.promoted[rung]))
            for trial_id in waiting[slots:]:
                self._stop(tune_controller, trials[trial_id], rung)
            for trial_id in waiting[:slots]:
                self._promote(rung, trials[trial_id])
            if slots:
                return trials[waiting[0]]
        return None

    def _stop(self, tune_controller, trial: Trial, rung: int) -> None:
        del self.paused_at[trial.trial_id]
        record_asha_stop(self.stopped_log, trial.trial_id, rung)
        tune_controller.stop_trial(trial)

    def debug_string(self) -> str:
        rungs = ", ".join(f"{r}: {len(self.recorded[r])} in, {len(self.promoted[r])} on"
                          for r in self.rungs)
        return f"ASHA with promotions (rungs at epochs {rungs})"
