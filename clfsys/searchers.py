"""The search algorithms that choose each trial's configuration (Ray Tune Searchers).

`random` is Tune's seeded BasicVariantGenerator. `optuna` is `RungTPE`: Ray's OptunaSearch with
Optuna's TPE, told what ASHA knows. Stock OptunaSearch learns little under ASHA:
- PromotingASHA pauses trials at rungs and decides them later, so most trials are still
  running, for Optuna, while new configurations are chosen, and TPE ignores running trials;
- Tune asks for every configuration at once when new trials are parked rather than pending,
  so under PromotingASHA all of them were sampled before any trial had a result;
- a trial that ASHA stopped at epoch 3 was told as COMPLETE, its value compared with those of
  trials that trained for 27 epochs.

RungTPE therefore
- reports each epoch's best validation accuracy to Optuna (the value ASHA ranks on);
- for TPE's choice, counts a trial waiting at a rung as pruned there, and ends a trial stopped
  before tune.max_epochs (by ASHA or the time budget) as PRUNED, not COMPLETE: TPE ranks pruned
  trials by how far they got, then by their value there (ASHA's own order), after every trial
  that completed;
- is asked for a configuration only when the scheduler has none waiting (`ready`), so each
  choice knows every rung result recorded up to the moment a worker takes the previous one;
- never gives a configuration already tried, in this search or an earlier one.

A warm start (clfsys/warm_start.py) tells RungTPE the earlier search's trials before its first
choice and gives it the earlier trials to continue; `random` then runs as RungTPE too, with
Optuna's random sampler, so that it knows what not to repeat.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.samplers import TPESampler
from optuna.trial import TrialState, create_trial
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from clfsys.config import Config
from clfsys.space import CONTINUE_KEY, overrides

RANK_METRIC = "best_val_accuracy"
DRAWS = 100  # draws of a choice before the space counts as exhausted


def make_searcher(cfg: Config, ready: Callable[[], bool] | None = None, warm=None,
                  continued: Sequence[Any] = ()):
    """The search algorithm, with tune.max_concurrent_trials applied (Tune ignores its own
    max_concurrent_trials when given a BasicVariantGenerator, so the limit lives here). Under
    PromotingASHA the scheduler applies the limit instead: a searcher's limit counts trials
    paused at a rung as running. `ready` says whether the scheduler wants a new configuration
    now (see RungTPE). `warm` (a warm_start.WarmStart) gives the earlier search's trials: then
    `random` is RungTPE with Optuna's random sampler, which never repeats one of them;
    `continued` are those of them to continue (warm_start.best)."""
    limit = 0 if cfg.tune.scheduler == "asha" else cfg.tune.max_concurrent_trials
    if cfg.tune.searcher == "optuna" or warm is not None:
        from ray.tune.search import ConcurrencyLimiter

        searcher = RungTPE(
            seed=cfg.tune.seed, startup_trials=cfg.tune.tpe_startup,
            max_epochs=cfg.tune.max_epochs, ready=ready,
            model_based=cfg.tune.searcher == "optuna",
            earlier=warm.inside if warm else (),
            continued=continued)
        return ConcurrencyLimiter(searcher, max_concurrent=limit) if limit else searcher
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=limit or 0)


def _config_key(params: dict[str, Any]) -> str:
    """What makes two samples the same configuration: the overrides they give a trial."""
    return json.dumps(overrides(params), sort_keys=True, default=str)


class RungTPE(OptunaSearch):
    """OptunaSearch whose TPE learns from rung results (see the module docstring). With
    `model_based=False` it samples at random instead (Optuna's RandomSampler), still never
    repeating a configuration. `earlier` trials (warm_start.Earlier) are told to the study
    before the first choice; `continued` ones are the first configurations given, each with the
    location of the checkpoint its trial goes on from (space.CONTINUE_KEY)."""

    def __init__(self, *, seed: int, startup_trials: int, max_epochs: int,
                 ready: Callable[[], bool] | None = None, model_based: bool = True,
                 earlier: Sequence[Any] = (), continued: Sequence[Any] = ()):
        super().__init__(sampler=self._make_sampler(model_based, seed, startup_trials))
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per study made: noise
        self._seed, self._startup, self._max_epochs = seed, startup_trials, max_epochs
        self._ready, self._model_based = ready, model_based
        self._name = "optuna" if model_based else "random"  # the tune.searcher, in its lines
        self._earlier, self._continued = list(earlier), list(continued)
        self._told = False
        self._seen = {_config_key(e.sample) for e in self._earlier}
        self._epochs: dict[str, int] = {}  # trial id -> the last epoch told to Optuna
        self._chosen = 0

    @staticmethod
    def _make_sampler(model_based: bool, seed: int, startup_trials: int):
        if model_based:
            return TPESampler(seed=seed, n_startup_trials=startup_trials)
        return optuna.samplers.RandomSampler(seed=seed)

    def suggest(self, trial_id: str) -> dict | str | None:
        if self._ready is not None and not self._ready():
            return None  # Tune asks again on its next step
        if trial_id in self._ot_trials or not self._space or callable(self._space):
            return super().suggest(trial_id)
        self._tell_earlier()
        if self._continued:
            earlier = self._continued.pop(0)
            self._ot_study.enqueue_trial(earlier.sample, skip_if_exists=False)
            print(f"{self._name}: trial {trial_id} continues earlier trial {earlier.trial_id} from "
                  f"epoch {earlier.epochs} (val_accuracy {earlier.value:.4f})", file=sys.stderr)
            return {**super().suggest(trial_id), CONTINUE_KEY: earlier.checkpoint}
        params, known = self._choose()
        if params is None:
            print(f"{self._name}: no configuration of the space is left untried ({len(self._seen)} "
                  "tried): no more trials", file=sys.stderr)
            return Searcher.FINISHED
        self._ot_study.enqueue_trial(params, skip_if_exists=False)
        how = ("random" if not self._model_based else
               "TPE" if sum(known.values()) >= self._startup else "random start-up")
        print(f"{self._name}: trial {trial_id} chosen by {how} from "
              f"{', '.join(f'{n} {kind}' for kind, n in known.items())}", file=sys.stderr)
        return super().suggest(trial_id)

    def _tell_earlier(self) -> None:
        """Tell the study every earlier trial inside the space, once (the study, and this flag,
        are saved with the searcher's state)."""
        if self._told:
            return
        self._told = True
        for e in self._earlier:
            self._ot_study.add_trial(create_trial(
                state=TrialState.COMPLETE if e.completed else TrialState.PRUNED,
                value=e.value, params=e.sample, intermediate_values={e.epochs: e.value},
                distributions={name: self._space[name] for name in e.sample}))
        if self._earlier:
            print(f"{self._name}: told {len(self._earlier)} earlier trials", file=sys.stderr)

    def _choice_seed(self) -> int:
        """The seed of this choice's sampler: a function of the search's seed and the choice's
        number (seed + number would give neighbouring seeds the same draws, shifted by one)."""
        return int(np.random.SeedSequence((self._seed, self._chosen)).generate_state(1)[0])

    def _choose(self) -> tuple[dict[str, Any] | None, dict[str, int]]:
        """The sampler's choice over what is known now, with every trial under way counted as
        pruned at its last epoch, and what it knew; None when every draw repeats a configuration
        already tried. A study of its own, rebuilt for each choice (the trials stay running in
        the searcher's study); its seed changes with each choice."""
        view = optuna.create_study(
            direction=self._ot_study.direction,
            sampler=self._make_sampler(self._model_based, self._choice_seed(), self._startup))
        known = {"completed": 0, "stopped early": 0, "under way": 0}
        for trial in self._ot_study.get_trials(deepcopy=False):
            if trial.state == TrialState.COMPLETE:
                known["completed"] += 1
            elif trial.state == TrialState.PRUNED:
                known["stopped early"] += 1
            elif trial.state == TrialState.RUNNING and trial.intermediate_values:
                known["under way"] += 1
                last = max(trial.intermediate_values)
                trial = create_trial(
                    state=TrialState.PRUNED, value=trial.intermediate_values[last],
                    params=trial.params, distributions=trial.distributions,
                    intermediate_values=trial.intermediate_values)
            else:
                continue
            view.add_trial(trial)
        self._chosen += 1
        for _ in range(DRAWS):
            params = view.ask(self._space).params
            key = _config_key(params)
            if key not in self._seen:
                self._seen.add(key)
                return params, known
        return None, known

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        epoch, value = result.get("epoch"), result.get(RANK_METRIC)
        trial = self._ot_trials.get(trial_id)
        if (trial is None or trial_id in self._completed_trials or value is None
                or not epoch or epoch <= self._epochs.get(trial_id, 0)):
            return  # a restored trial reports its last epoch again
        self._epochs[trial_id] = epoch
        trial.report(float(value), int(epoch))

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        trial = self._ot_trials.get(trial_id)
        if trial is None or trial_id in self._completed_trials:
            return
        result = result or {}
        value = result.get(RANK_METRIC)
        if error:
            state, value = TrialState.FAIL, None
        elif value is None or (result.get("epoch", 0) < self._max_epochs
                               and not result.get("keras_stopped")):
            state, value = TrialState.PRUNED, None  # Optuna takes its last epoch's value
        else:
            state = TrialState.COMPLETE
        self._ot_study.tell(trial, value, state=state)
        self._completed_trials.add(trial_id)

    # `ready` belongs to this run's scheduler: never saved with the searcher's state, and
    # kept when Tune restores that state into a resumed search's searcher.
    def save(self, checkpoint_path: str) -> None:
        ready, self._ready = self._ready, None
        try:
            super().save(checkpoint_path)
        finally:
            self._ready = ready

    def restore(self, checkpoint_path: str) -> None:
        ready = self._ready
        super().restore(checkpoint_path)
        self._ready = ready
