"""PromotingASHA against a scripted stand-in for Tune's controller: no training, no Ray.

`Controller` does what Tune does with a scheduler, and nothing more: it adds trials (calling
on_trial_add, then reading their status), starts PENDING trials by itself first come first
served while CPUs last, asks choose_trial_to_run for more, feeds one epoch result per running
trial per step and acts on the answer. Each trial reports a fixed, scripted value, so the rung
decisions are known exactly.
"""

from __future__ import annotations

import json

import pytest
from ray.tune.execution.placement_groups import PlacementGroupFactory
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from clfsys.scheduler import PromotingASHA, asha_stops

PAUSED, PENDING, RUNNING = Trial.PAUSED, Trial.PENDING, Trial.RUNNING
TERMINATED, ERROR = Trial.TERMINATED, Trial.ERROR


class FakeTrial:
    def __init__(self, index: int, value: float, fail_at_pause: bool = False):
        self.trial_id = f"t{index:02d}"
        self.value = value
        self.fail_at_pause = fail_at_pause
        self.status = PENDING
        self.last_result: dict = {}
        self.placement_group_factory = PlacementGroupFactory([{"CPU": 1}])

    def set_status(self, status: str) -> None:
        self.status = status

    def update_resources(self, resources: dict) -> None:
        assert self.status != RUNNING
        self.placement_group_factory = PlacementGroupFactory([resources])

    @property
    def cpus(self) -> float:
        return self.placement_group_factory.required_resources["CPU"]

    @property
    def epoch(self) -> int:
        return self.last_result.get("epoch", 0)


class Resources:
    def __init__(self, cpus: int):
        self.cpus = cpus

    def get_num_cpus(self) -> int:
        return self.cpus

    def get_num_gpus(self) -> int:
        return 0


class Controller:
    def __init__(self, scheduler: PromotingASHA, cpus: int, max_t: int):
        self.scheduler, self.cpus, self.max_t = scheduler, cpus, max_t
        self._resource_updater = Resources(cpus)
        self.trials: list[FakeTrial] = []
        self.starts: list[tuple[str, int]] = []  # (trial, epochs done when it started)
        self.grown_starts: list[tuple[str, int, float, int]] = []  # (..., CPUs, others running)
        self.most_running = 0
        self.most_cpus = 0.0
        self.to_ask: list[float] = []  # values of the trials a learning searcher gives in turn
        self.added_after: list[int] = []  # for each of those: how many trials had started
        scheduler.set_search_properties(None, None)

    # what the scheduler may call
    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        self.scheduler.on_trial_remove(self, trial)
        trial.status = TERMINATED

    # Tune's side
    def add(self, trial: FakeTrial) -> None:
        self.trials.append(trial)
        self.scheduler.on_trial_add(self, trial)

    def running(self) -> list[FakeTrial]:
        return [t for t in self.trials if t.status == RUNNING]

    def used(self) -> float:
        return sum(t.cpus for t in self.running())

    def node_room(self) -> dict[str, float]:
        return {"node-1": self.cpus - self.used()}

    def _start_pending(self) -> None:
        for trial in self.trials:
            if trial.status == PENDING and self.used() + trial.cpus <= self.cpus:
                self.starts.append((trial.trial_id, trial.epoch))
                if trial.cpus > 1:
                    self.grown_starts.append((trial.trial_id, trial.epoch, trial.cpus,
                                              len(self.running())))
                trial.status = RUNNING

    def _ask(self) -> None:
        """A searcher that learns from results (RungTPE) gives a configuration only when the
        scheduler wants one."""
        if self.to_ask and self.scheduler.wants_configuration():
            self.added_after.append(len({t for t, _ in self.starts}))
            self.add(FakeTrial(len(self.trials), self.to_ask.pop(0)))

    def step(self) -> None:
        """Tune's steps until the next epoch ends: ask the searcher, start what the scheduler
        chooses, again and again (they take milliseconds; an epoch takes seconds)."""
        self._start_pending()
        self._ask()
        while (trial := self.scheduler.choose_trial_to_run(self)) is not None:
            assert trial.status in (PAUSED, PENDING), trial.trial_id
            if trial.status == PENDING and self.used() + trial.cpus > self.cpus:
                break  # Tune stages it; it starts when a CPU frees up
            trial.status = PENDING
            self._start_pending()
            self._ask()
        self.most_running = max(self.most_running, len(self.running()))
        self.most_cpus = max(self.most_cpus, self.used())
        for trial in self.running():
            result = {"epoch": trial.epoch + 1, "best_val_accuracy": trial.value,
                      "node_id": "node-1"}
            trial.last_result = result
            action = self.scheduler.on_trial_result(self, trial, result)
            if action == TrialScheduler.PAUSE and trial.fail_at_pause:
                trial.status = ERROR  # the checkpoint before pausing failed
                self.scheduler.on_trial_error(self, trial)
            elif action == TrialScheduler.PAUSE:
                trial.status = PAUSED
            elif result["epoch"] >= self.max_t:
                trial.status = TERMINATED
                self.scheduler.on_trial_complete(self, trial, result)

    def run(self, steps: int = 500) -> None:
        for _ in range(steps):
            if not self.to_ask and all(t.status in (TERMINATED, ERROR) for t in self.trials):
                return
            self.step()
        pytest.fail(f"the search did not finish in {steps} steps: "
                    f"{[(t.trial_id, t.status) for t in self.trials]}")

    def epochs(self) -> dict[str, int]:
        return {t.trial_id: t.epoch for t in self.trials}


def make(tmp_path, values, *, cpus=2, max_t=3, grace=1, rf=3, max_concurrent=None, fail=(),
         grow=False):
    scheduler = PromotingASHA(metric="best_val_accuracy", mode="max", time_attr="epoch",
                              max_t=max_t, grace_period=grace, reduction_factor=rf,
                              state_file=str(tmp_path / "asha_state.json"),
                              max_concurrent=max_concurrent)
    controller = Controller(scheduler, cpus, max_t)
    scheduler.node_room = controller.node_room if grow else None
    for i, value in enumerate(values):
        controller.add(FakeTrial(i, value, fail_at_pause=i in fail))
    return scheduler, controller


def test_due_promotions_start_before_new_configurations(tmp_path):
    # Values rise in arrival order, so every newcomer is the best of its rung so far.
    _, run = make(tmp_path, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    run.run()
    # Rung 1 (of 3 epochs, rf 3): after 4 results t03 is due (top 1 of 4) and goes before the
    # next new configuration t04; after 6, t05 (top 2 of 6).
    assert run.starts == [("t00", 0), ("t01", 0), ("t02", 0), ("t03", 0), ("t03", 1),
                          ("t04", 0), ("t05", 0), ("t05", 1)]
    assert run.epochs() == {"t00": 1, "t01": 1, "t02": 1, "t03": 3, "t04": 1, "t05": 3}
    assert asha_stops(str(tmp_path / "asha_state.json")) == {
        "t00": 1, "t01": 1, "t02": 1, "t04": 1}
    assert run.most_running == 2


def test_a_learning_searcher_gets_each_configuration_in_turn_with_the_same_decisions(tmp_path):
    """Tune asks its searcher for configurations at the start of each step; a searcher that
    learns from results (RungTPE) gives one only when wants_configuration(). Then each is added
    once the one before it has started (never two waiting unstarted), and the search makes the
    same starts and rung decisions as the one above, where all 6 were added up front."""
    _, run = make(tmp_path, [])
    run.to_ask = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    run.run()
    assert run.added_after == [0, 1, 2, 3, 4, 5]
    assert run.starts == [("t00", 0), ("t01", 0), ("t02", 0), ("t03", 0), ("t03", 1),
                          ("t04", 0), ("t05", 0), ("t05", 1)]
    assert run.epochs() == {"t00": 1, "t01": 1, "t02": 1, "t03": 3, "t04": 1, "t05": 3}


def test_a_concurrency_limit_does_not_shrink_the_rungs(tmp_path):
    # 9 trials, at most 2 at once, on 4 CPUs: every trial still reaches rung 1 and the rung
    # is decided among all 9 (top 3 go on to rung 3, of which the top 1 to max_t 9).
    values = [0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6]
    scheduler, run = make(tmp_path, values, cpus=4, max_t=9, max_concurrent=2)
    run.run()
    assert run.most_running == 2
    assert len(scheduler.recorded[1]) == 9
    assert len(scheduler.promoted[1]) == 3
    assert len(scheduler.recorded[3]) == 3 and len(scheduler.promoted[3]) == 1
    assert run.epochs()["t00"] == 9, "the best trial runs to max_t"
    assert sum(run.epochs().values()) == 9 * 1 + 3 * 2 + 1 * 6
    assert sorted(asha_stops(str(tmp_path / "asha_state.json")).values()) == [1] * 6 + [3] * 2


def test_ties_go_to_the_trial_recorded_first(tmp_path):
    _, run = make(tmp_path, [0.5] * 6)
    run.run()
    assert run.epochs() == {"t00": 3, "t01": 3, "t02": 1, "t03": 1, "t04": 1, "t05": 1}


def test_an_errored_trial_takes_no_place_among_the_promoted(tmp_path):
    # t03 is the best at rung 1 but fails as it pauses there: t02, the next best, goes on.
    scheduler, run = make(tmp_path, [0.1, 0.2, 0.3, 0.4, 0.35, 0.15], fail={3})
    run.run()
    assert run.trials[3].status == ERROR
    assert scheduler.promoted[1] == ["t02", "t04"]
    assert run.epochs() == {"t00": 1, "t01": 1, "t02": 3, "t03": 1, "t04": 3, "t05": 1}


def test_a_resumed_search_keeps_its_rung_records(tmp_path):
    values = [0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6]
    _, whole = make(tmp_path / "whole", values, max_t=9)
    whole.run()

    scheduler, run = make(tmp_path / "killed", values, max_t=9)
    for _ in range(6):
        run.step()
    waiting = dict(scheduler.paused_at)
    assert waiting, "some trials wait at a rung when the driver dies"
    # The driver dies. Tune restores every unfinished trial as PENDING with its last result,
    # and a fresh scheduler (as unpickled from the experiment) reads the state file.
    state = json.loads((tmp_path / "killed" / "asha_state.json").read_text())
    assert state["paused_at"] == waiting
    restored = PromotingASHA(metric="best_val_accuracy", mode="max", time_attr="epoch",
                             max_t=9, grace_period=1, reduction_factor=3,
                             state_file=str(tmp_path / "killed" / "asha_state.json"))
    again = Controller(restored, 2, 9)
    for trial in run.trials:
        if trial.status != TERMINATED:
            trial.status = PENDING
        again.add(trial)
    assert restored.paused_at == waiting
    again.run()
    assert again.epochs() == whole.epochs()
    assert sum(again.epochs().values()) == 9 * 1 + 3 * 2 + 1 * 6


def test_capacity_follows_the_cluster_when_no_limit_is_set(tmp_path):
    _, run = make(tmp_path, [0.1 * i for i in range(9)], cpus=3, max_t=9)
    run.run()
    assert run.most_running == 3


def test_the_last_trial_standing_restarts_with_the_free_cpus_of_its_node(tmp_path):
    _, run = make(tmp_path, [0.1, 0.2, 0.3], cpus=4, max_t=9, grow=True)
    run.run()
    # Rungs at 1 and 3: t02 goes on alone after rung 1 (1 epoch to rung 3: not worth a
    # restart), is promoted from rung 3 with its base CPU, and after epoch 4 restarts with all 4.
    assert run.starts == [("t00", 0), ("t01", 0), ("t02", 0), ("t02", 1), ("t02", 3),
                          ("t02", 4)]
    assert run.grown_starts == [("t02", 4, 4.0, 0)]
    assert run.epochs() == {"t00": 1, "t01": 1, "t02": 9}


def test_growing_never_takes_cpus_another_trial_could_use(tmp_path):
    values = [0.31, 0.12, 0.45, 0.27, 0.5, 0.08, 0.39, 0.22, 0.41]
    _, plain = make(tmp_path / "plain", values, cpus=2, max_t=9)
    plain.run()
    _, grown = make(tmp_path / "grown", values, cpus=2, max_t=9, grow=True)
    grown.run()
    assert grown.grown_starts, "the last trial was never given the idle CPU"
    assert all(others == 0 for *_, others in grown.grown_starts)
    assert grown.most_cpus == 2
    # The rung decisions, and so every trial's epochs, are the same as without growing.
    assert grown.epochs() == plain.epochs()


def test_selection_takes_the_most_accurate_trial_within_the_limits():
    from clfsys.report import pareto_front
    from clfsys.results import select

    rows = [  # best first, as trial_rows sorts them
        {"trial_id": "a", "best_val_accuracy": 0.95, "ms_per_image_b1": 9.0, "params": 900},
        {"trial_id": "b", "best_val_accuracy": 0.94, "ms_per_image_b1": 1.0, "params": 5000},
        {"trial_id": "c", "best_val_accuracy": 0.93, "ms_per_image_b1": 2.0, "params": 800},
        {"trial_id": "d", "best_val_accuracy": 0.90, "ms_per_image_b1": None, "params": 10},
    ]
    assert select(rows, {}) == (rows[0], {})
    assert select(rows, {"ms_per_image_b1": 4}) == (rows[1], {"ms_per_image_b1": 1})
    assert select(rows, {"ms_per_image_b1": 4, "params": 1000}) == (
        rows[2], {"ms_per_image_b1": 1, "params": 1})
    # An unmeasured cost never passes a limit on it.
    assert select(rows, {"ms_per_image_b1": 0.5}) == (None, {"ms_per_image_b1": 4})
    points = [(r["ms_per_image_b1"] or 99.0, r["best_val_accuracy"]) for r in rows]
    assert [rows[i]["trial_id"] for i in pareto_front(points)] == ["b", "a"]
