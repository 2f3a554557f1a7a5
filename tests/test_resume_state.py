"""Early stopping's and the LR plateau's counters survive a pause (as at an ASHA rung).

The real Keras callbacks that train() uses are driven through a scripted validation curve, the
way fit() drives them, once without a pause and once paused and resumed through a saved
model.keras and a JSON round trip of the state.
"""

import json

import keras
import numpy as np
import pytest

from clfsys.config import TrainConfig
from clfsys.train import compile_model, state_keeper, training_callbacks

# Best at epoch 1 (index), then only worse: early stopping (patience 3) stops at index 4, and
# the plateau schedule (patience 2) halves the learning rate at index 3.
CURVE = [1.0, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 1.0, 1.01, 1.02]
TC = TrainConfig(lr=0.01, patience=3, lr_plateau_patience=2, lr_plateau_factor=0.5)


def new_model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    compile_model(model, TC)
    model.fit(np.zeros((2, 2)), np.zeros(2), verbose=0)  # builds the optimizer's variables
    return model


def drive(model, first_epoch: int, last_epoch: int, state: dict | None):
    """Epochs first..last of CURVE through train()'s callbacks; returns (epoch at which training
    stopped or None, learning rate after each epoch)."""
    stateful = training_callbacks(TC)
    extra = [] if state is None else [state_keeper(stateful, state)]
    callbacks = keras.callbacks.CallbackList([*stateful, *extra], model=model)
    callbacks.on_train_begin()
    rates = []
    for epoch in range(first_epoch, last_epoch + 1):
        callbacks.on_epoch_end(epoch, {"val_loss": CURVE[epoch], "loss": CURVE[epoch]})
        rates.append(float(model.optimizer.learning_rate))
        if model.stop_training:
            return epoch, rates
    return None, rates


def test_patience_and_the_plateau_schedule_carry_on_after_a_pause(tmp_path):
    whole_stop, whole_rates = drive(new_model(), 0, 9, {})
    assert whole_stop == 4
    assert whole_rates == pytest.approx([0.01, 0.01, 0.01, 0.005, 0.005])

    # Paused after index 3 (the learning rate was just halved), resumed in a fresh process's
    # objects from what a trial checkpoint holds: model.keras and state.json.
    model, state = new_model(), {}
    assert drive(model, 0, 3, state)[0] is None
    model.save(tmp_path / "model.keras")
    saved = json.loads(json.dumps(state))
    assert saved["EarlyStopping"] == {"wait": 2, "best": 0.8, "best_epoch": 1,
                                      "stopped_epoch": 0}
    assert saved["ReduceLROnPlateau"]["wait"] == 0 and saved["ReduceLROnPlateau"]["best"] == 0.8
    resumed = keras.saving.load_model(tmp_path / "model.keras")
    assert float(resumed.optimizer.learning_rate) == pytest.approx(0.005)
    stop, rates = drive(resumed, 4, 9, saved)
    assert stop == whole_stop and rates == pytest.approx(whole_rates[4:])

    # Without the saved state, patience restarts at the pause and the run goes on too long.
    fresh_stop, _ = drive(keras.saving.load_model(tmp_path / "model.keras"), 4, 9, None)
    assert fresh_stop == 7


def test_the_best_model_checkpoint_keeps_its_best_value(tmp_path):
    stateful = training_callbacks(TC, tmp_path)
    state: dict = {}
    callbacks = keras.callbacks.CallbackList([*stateful, state_keeper(stateful, state)],
                                             model=new_model())
    callbacks.on_train_begin()
    for epoch in range(3):
        callbacks.on_epoch_end(epoch, {"val_loss": CURVE[epoch]})
    assert state["ModelCheckpoint"] == {"best": 0.8}
    assert np.isfinite(state["EarlyStopping"]["best"])
