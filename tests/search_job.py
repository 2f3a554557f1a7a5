"""A search as its own driver process, for the tests that kill it and resume it.

    python search_job.py CONFIG OUT EPOCH_LOG [--resume] [--fail-once]

Every trial records each epoch it begins under EPOCH_LOG (one object per epoch, so a local path
or a URI: a worker node cannot see the driver's disk), so a test can tell a trial that went on
from where it was from one that started again or went back. The callbacks are defined here, in
__main__, so that Ray ships them to the workers by value.
"""

import sys
import uuid

import keras
from ray import tune

from clfsys import storage
from clfsys.config import load_config
from clfsys.search import run_search


class EpochLog(keras.callbacks.Callback):
    def __init__(self, log: str):
        super().__init__()
        self.log = log

    def on_epoch_begin(self, epoch, logs=None):
        trial = tune.get_context().get_trial_id()
        storage.write_text(storage.join(self.log, f"{trial}.{epoch + 1}.{uuid.uuid4().hex}"),
                           "")


class FailOnce(keras.callbacks.Callback):
    """Fails each trial once, after its second epoch's checkpoint, unless it was restored."""

    def on_train_begin(self, logs=None):
        self.restored = tune.get_checkpoint() is not None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1 and not self.restored:
            raise RuntimeError("injected failure after epoch 2")


def epochs_begun(log: str) -> dict[str, list[int]]:
    """Trial id -> the epochs (1-based) it began, sorted, repeats included."""
    found: dict[str, list[int]] = {}
    for path in storage.list_files(log):
        trial, epoch, _ = path.rsplit("/", 1)[1].split(".")
        found.setdefault(trial, []).append(int(epoch))
    return {trial: sorted(epochs) for trial, epochs in found.items()}


def went_on(before: list[int], after: list[int], last: int) -> bool:
    """Whether a trial that had begun the epochs `before` when its driver was killed, and the
    epochs `after` by the end of the resumed search, went on from where it was and ended at
    epoch `last`. A trial begins epoch k only once Tune has received epoch k-1's checkpoint, so
    after the last epoch k begun before the kill, the resumed trial begins k again (the epoch
    the kill cut short) or k+1 (it was checkpointed just before), then each later epoch once."""
    new = list(after)
    for epoch in before:
        new.remove(epoch)
    begun = max(before, default=1)
    start = new[0] if new else last + 1
    return new == list(range(start, last + 1)) and start in (begun, begun + 1)


if __name__ == "__main__":
    config, out, log = sys.argv[1:4]
    callbacks = [EpochLog(log)] + ([FailOnce()] if "--fail-once" in sys.argv else [])
    print(run_search(load_config(config), out, resume="--resume" in sys.argv,
                     callbacks=callbacks))
