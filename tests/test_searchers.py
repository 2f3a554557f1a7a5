"""RungTPE, Ray's OptunaSearch with Optuna's TPE, driven the way Tune drives a searcher under
PromotingASHA: suggest, then one result per epoch; trials wait at rungs for a long time before
anything completes. Real Optuna, real Tune search-space conversion, no training."""

from __future__ import annotations

import numpy as np
from optuna.samplers import TPESampler
from optuna.trial import TrialState
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from clfsys.searchers import RungTPE

SPACE = {"train.lr": tune.uniform(0.0, 1.0)}
STARTUP = 6
WAITING = 20


def searcher(stock: bool = False, **kwargs):
    made = (OptunaSearch(sampler=TPESampler(seed=7, n_startup_trials=STARTUP)) if stock else
            RungTPE(seed=7, startup_trials=STARTUP, max_epochs=9, **kwargs))
    made.set_search_properties("val_accuracy", "max", SPACE)
    return made


def choose(made, world, n_waiting: int = WAITING, n_more: int = 6) -> list[float]:
    """`n_waiting` trials reach the first rung (epoch 1) and wait there; then `n_more` are
    chosen. In `world`, a trial's rung value is world(lr)."""
    for i in range(n_waiting):
        lr = made.suggest(f"t{i}")["train.lr"]
        made.on_trial_result(f"t{i}", {"epoch": 1, "training_iteration": 1,
                                       "val_accuracy": world(lr), "best_val_accuracy": world(lr)})
    return [made.suggest(f"n{i}")["train.lr"] for i in range(n_more)]


def test_tpe_chooses_from_the_results_of_trials_waiting_at_a_rung(capfd):
    """Two worlds differ only in the rung results of trials that are still waiting (none has
    completed): where a high lr did best at the rung, TPE's next choices are higher than where a
    low lr did. Ray's own OptunaSearch, given the same calls, chooses the same in both worlds:
    Optuna's TPE does not look at running trials."""
    high = choose(searcher(), lambda lr: lr)
    low = choose(searcher(), lambda lr: 1 - lr)
    assert np.mean(high) > np.mean(low) + 0.2, (high, low)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("optuna:")]
    assert lines[WAITING] == ("optuna: trial n0 chosen by TPE from 0 completed, 0 stopped early, "
                              f"{WAITING} under way"), lines
    assert "chosen by random start-up from 0 completed" in lines[0]
    stock = [choose(searcher(stock=True), world) for world in (lambda lr: lr, lambda lr: 1 - lr)]
    assert stock[0] == stock[1]


def test_a_trial_stopped_at_a_rung_is_pruned_and_one_that_trained_out_completes():
    made = searcher()
    for name in "abcde":
        made.suggest(name)
    for epoch in (1, 1, 2, 3):  # a trial restored from its checkpoint reports epoch 1 again
        made.on_trial_result("a", {"epoch": epoch, "best_val_accuracy": 0.5 + epoch / 10})
    made.on_trial_result("b", {"epoch": 9, "best_val_accuracy": 0.91})
    made.on_trial_result("c", {"epoch": 4, "best_val_accuracy": 0.88})
    made.on_trial_complete("a", {"epoch": 3, "best_val_accuracy": 0.8})  # ASHA stopped it
    made.on_trial_complete("b", {"epoch": 9, "best_val_accuracy": 0.91})
    made.on_trial_complete("c", {"epoch": 4, "best_val_accuracy": 0.88, "keras_stopped": True})
    made.on_trial_complete("d", None, error=True)
    made.on_trial_complete("e", None)  # the time budget ended it before it started
    trials = {t.number: t for t in made._ot_study.get_trials(deepcopy=False)}
    a, b, c, d, e = (trials[i] for i in range(5))
    assert (a.state, a.value, a.intermediate_values) == (
        TrialState.PRUNED, 0.8, {1: 0.6, 2: 0.7, 3: 0.8})
    assert (b.state, b.value) == (TrialState.COMPLETE, 0.91)
    assert (c.state, c.value) == (TrialState.COMPLETE, 0.88)  # early stopping: trained out
    assert d.state == TrialState.FAIL and e.state == TrialState.PRUNED and e.value is None


def test_it_chooses_only_when_the_scheduler_wants_one_and_keeps_that_across_a_restore(tmp_path):
    wanted = {"now": False}

    def ready():
        return wanted["now"]

    made = searcher(ready=ready)
    assert made.suggest("a") is None  # Tune asks again on its next step
    wanted["now"] = True
    first = made.suggest("a")
    made.on_trial_result("a", {"epoch": 1, "best_val_accuracy": 0.7})
    made.save(str(tmp_path / "searcher.pkl"))
    again = searcher(ready=ready)
    again.restore(str(tmp_path / "searcher.pkl"))
    assert again._ready is ready
    assert [t.params for t in again._ot_study.get_trials()] == [first]
    wanted["now"] = False
    assert again.suggest("b") is None


def test_earlier_trials_are_told_once_and_no_configuration_is_sampled_twice(capfd):
    """A warm start's earlier trials go into the study before the first choice, completed or
    pruned at their last epoch. In a space of 3 configurations of which 2 were tried earlier,
    the random sampler gives the third, and then says the space is exhausted; a trial that
    continues an earlier one comes first, with that one's checkpoint."""
    from clfsys.space import CONTINUE_KEY
    from clfsys.warm_start import Earlier

    def earlier(lr, completed):
        return Earlier(trial_id=f"e{lr}", sample={"train.lr": lr}, value=0.5 + lr,
                       epochs=9 if completed else 1, completed=completed,
                       checkpoint=f"s3://b/search/trial_e{lr}/checkpoint_000001")

    tried = [earlier(0.1, True), earlier(0.2, False)]
    made = RungTPE(seed=0, startup_trials=STARTUP, max_epochs=9, model_based=False,
                   earlier=tried, continued=tried[:1])
    made.set_search_properties("val_accuracy", "max", {"train.lr": tune.choice([0.1, 0.2, 0.3])})
    first = made.suggest("a")
    assert first == {"train.lr": 0.1, CONTINUE_KEY: tried[0].checkpoint}
    assert made.suggest("b") == {"train.lr": 0.3}
    assert made.suggest("c") == "FINISHED"
    told = made._ot_study.get_trials(deepcopy=False)[:2]
    assert [(t.state, t.value, t.intermediate_values) for t in told] == [
        (TrialState.COMPLETE, 0.6, {9: 0.6}), (TrialState.PRUNED, 0.7, {1: 0.7})]
    assert len(made._ot_study.get_trials()) == 4  # told twice would be 6
    assert [line for line in capfd.readouterr().err.splitlines() if line.startswith("random:")] \
        == ["random: told 2 earlier trials",
            "random: trial a continues earlier trial e0.1 from epoch 9 (val_accuracy 0.6000)",
            "random: trial b chosen by random from 1 completed, 1 stopped early, 0 under way",
            "random: no configuration of the space is left untried (3 tried): no more trials"]


def test_the_same_seed_samples_the_same_start_up_configurations():
    other = RungTPE(seed=8, startup_trials=STARTUP, max_epochs=9)
    other.set_search_properties("val_accuracy", "max", SPACE)
    runs = [[made.suggest(f"t{i}")["train.lr"] for i in range(3)]
            for made in (searcher(), searcher(), other)]
    assert runs[0] == runs[1] and len(set(runs[0]) & set(runs[2])) == 0, runs
