"""Real training runs on generated folders, the bundle round trip and the Predictor."""

import json
import math
import shutil

import keras
import numpy as np
import pytest
from conftest import folder_config, write_folder

from clfsys import bundle
from clfsys.data import load
from clfsys.errors import BundleError
from clfsys.predict import Predictor
from clfsys.train import evaluate, train

pytestmark = pytest.mark.slow


def test_training_learns_and_writes_checkpoint_and_logs(image_folder, tmp_path):
    cfg = folder_config(image_folder, **{"train.epochs": 10})
    result = train(cfg, work_dir=tmp_path / "work")
    assert result.epochs_run == len(result.history["loss"]) <= 10
    assert 1 <= result.best_epoch <= result.epochs_run
    assert_holds_the_best_epochs_weights(result)
    assert (tmp_path / "work" / "checkpoints" / "best.weights.h5").is_file()
    assert list((tmp_path / "work" / "logs").rglob("events.out.tfevents*"))
    ds = result.dataset
    metrics = evaluate(result.model, ds.x_test, ds.y_test, ds.class_names)
    assert metrics["accuracy"] > 0.6  # three classes: chance is 0.33
    cm = np.asarray(metrics["confusion_matrix"])
    assert cm.sum() == len(ds.y_test) and np.trace(cm) / cm.sum() == metrics["accuracy"]


def test_early_stopping_restores_the_best_epoch(image_folder):
    # A huge learning rate makes validation loss get worse: training stops after `patience`.
    cfg = folder_config(image_folder, **{"train.epochs": 30, "train.patience": 1,
                                         "train.optimizer": "sgd", "train.lr": 0.5})
    result = train(cfg)
    assert result.stopped_early and result.epochs_run < 30
    losses = result.history["val_loss"]
    assert result.best_epoch < result.epochs_run and losses[-1] > min(losses)
    assert_holds_the_best_epochs_weights(result)


def test_cosine_decay_follows_the_epoch_across_a_pause(image_folder):
    cfg = folder_config(image_folder, **{"train.epochs": 6, "train.lr_decay": "cosine"})
    # Half a cosine over the 6 epochs, from train.lr (0.005) down to 1% of it.
    expected = [0.005 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * e / 6))) for e in range(6)]
    whole = train(cfg)
    assert whole.history["learning_rate"] == pytest.approx(expected, rel=1e-5)
    # Paused after epoch 3 (as at an ASHA rung), resumed from the model: the curve goes on.
    class PauseAfterEpoch3(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = epoch == 2

    first = train(cfg, callbacks=[PauseAfterEpoch3()])
    assert first.history["learning_rate"] == pytest.approx(expected[:3], rel=1e-5)
    resumed = train(cfg, dataset=first.dataset, model=first.model, initial_epoch=3)
    assert resumed.history["learning_rate"] == pytest.approx(expected[3:], rel=1e-5)


def test_a_deadline_fits_the_cosine_decay_to_the_epochs_left(image_folder):
    """With a deadline that has passed, every epoch is the last one that fits: from the second
    epoch on (the first is the one that measures an epoch's time) the decay goes to its end,
    and stays there across a pause; with a distant deadline, the curve is the plain one."""
    import time

    cfg = folder_config(image_folder, **{"train.epochs": 6, "train.lr_decay": "cosine"})
    plain = [0.005 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * e / 6))) for e in range(6)]
    distant = train(cfg, deadline=time.time() + 3600)
    assert distant.history["learning_rate"] == pytest.approx(plain, rel=1e-5)

    class PauseAfterEpoch3(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = epoch == 2

    state: dict = {}
    first = train(cfg, dataset=distant.dataset, callbacks=[PauseAfterEpoch3()],
                  callback_state=state, deadline=time.time() - 1)
    floor = 0.005 * 0.01
    assert first.history["learning_rate"] == pytest.approx([plain[0], plain[1], floor],
                                                           rel=1e-5)
    assert state["CosineDecay"] == {"progress": 1.0, "phase": [0, 6]}
    resumed = train(cfg, dataset=first.dataset, model=first.model, initial_epoch=3,
                    callback_state=state)  # no deadline now: the decay has ended all the same
    assert resumed.history["learning_rate"] == pytest.approx([floor] * 3, rel=1e-5)


def test_a_resumed_run_does_not_depend_on_the_random_state_at_load(image_folder, tmp_path):
    """Keras saves no layer's random state: a Dropout layer loaded from model.keras draws a new
    seed from Python's global `random`, which each fresh process seeds from the OS. Two resumes
    of one checkpoint, with `random` in two different states at load (as in two processes: two
    runs of one seeded search), train to the same weights."""
    import random

    from clfsys.train import load_to_resume

    cfg = folder_config(image_folder, **{"model.dropout": 0.5, "model.dense_dropout": 0.5,
                                         "train.epochs": 1})
    first = train(cfg)
    first.model.save(tmp_path / "model.keras")
    runs = []
    for state in (1, 2):
        random.seed(state)
        model = load_to_resume(tmp_path / "model.keras", cfg, epoch=1)
        runs.append(train(cfg.replace(**{"train.epochs": 3}), dataset=first.dataset,
                          model=model, initial_epoch=1))
    assert runs[0].history["loss"] == runs[1].history["loss"]
    for a, b in zip(runs[0].model.get_weights(), runs[1].model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def assert_holds_the_best_epochs_weights(result) -> None:
    """Score the returned model on the validation split ourselves: its loss must be the best
    epoch's, i.e. the weights were restored (not just the epoch number computed)."""
    ds = result.dataset
    loss = result.model.evaluate(ds.x_val, ds.y_val, verbose=0, return_dict=True)["loss"]
    losses = result.history["val_loss"]
    assert loss == pytest.approx(min(losses), rel=1e-3, abs=1e-4), (loss, losses)
    # best_epoch names the epoch whose weights the model holds, by their measured loss.
    held = [epoch for epoch, value in enumerate(losses, start=1)
            if value == pytest.approx(loss, rel=1e-3, abs=1e-4)]
    assert result.best_epoch in held, (result.best_epoch, held, losses)


def test_bundle_round_trip_and_saved_model(trained_bundle):
    import tensorflow as tf

    found = bundle.load(trained_bundle)
    meta = found.metadata
    assert meta["class_names"] == ["left", "right", "top"]
    assert meta["input_shape"] == [20, 20, 3] and meta["color_mode"] == "rgb"
    assert meta["config"]["model"]["arch"] == "cnn" and meta["config"]["model"]["kernel_size"] == 3
    assert {"tensorflow", "keras", "clfsys"} <= set(meta["versions"])
    assert 0 <= meta["metrics"]["test_accuracy"] <= 1
    for plot in ("learning_curves", "confusion_matrix", "samples"):
        assert (trained_bundle / "plots" / f"{plot}.png").stat().st_size > 5000
    assert json.loads((trained_bundle / "history.json").read_text())["loss"]

    cfg_data = meta["config"]["data"]
    ds = load(bundle_data_config(cfg_data))
    model = found.load_model()
    direct = np.asarray(model.predict(ds.x_test, verbose=0))
    served = tf.saved_model.load(str(trained_bundle / "saved_model"))
    exported = np.asarray(served.serve(tf.constant(ds.x_test)))
    np.testing.assert_allclose(exported, direct, rtol=1e-5, atol=1e-6)
    predictor = Predictor(trained_bundle)
    np.testing.assert_allclose(predictor.probabilities(ds.x_test), direct, rtol=1e-5, atol=1e-6)
    assert meta["metrics"]["test_accuracy"] == pytest.approx(
        float((direct.argmax(1) == ds.y_test).mean()))


def bundle_data_config(raw):
    from clfsys.config import from_dict

    return from_dict({"data": raw}).data


def test_predictor_outputs(trained_bundle):
    predictor = Predictor(trained_bundle, top_k=2)
    from conftest import pattern_image

    rng = np.random.default_rng(5)
    batch = np.stack([pattern_image(label, 20, rng) for label in (0, 1, 2, 0)])
    out = predictor.predict(batch)
    assert list(out["label"]) == [predictor.class_names[i] for i in out["label_index"]]
    assert out["top_k_index"].shape == (4, 2)
    assert np.all(out["top_k_score"][:, 0] >= out["top_k_score"][:, 1])
    assert np.allclose(out["confidence"], out["top_k_score"][:, 0])
    assert list(out["label"]).count("left") >= 1
    assert np.allclose(out["probabilities"].sum(axis=1), 1, atol=1e-5)
    rows = predictor.rows(batch)
    assert [r["label_index"] for r in rows] == list(out["label_index"])
    assert rows[0]["top_k"][0]["label"] == out["label"][0] and len(rows[0]["top_k"]) == 2
    assert rows[0]["top_k"][0]["score"] == pytest.approx(out["confidence"][0])
    assert rows[0]["probabilities"][out["label_index"][0]] == pytest.approx(out["confidence"][0])
    assert predictor.predict(batch[:0])["label_index"].shape == (0,)
    with pytest.raises(ValueError, match="expected images of shape"):
        predictor.predict(np.zeros((1, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="expected uint8"):
        predictor.predict(batch.astype(np.float32))


def test_predictor_decode_path_matches_training_pixels(trained_bundle, tmp_path):
    predictor = Predictor(trained_bundle)
    root = write_folder(tmp_path / "one", per_class=1, size=20)
    file = next(root.rglob("*.png"))
    from clfsys.images import decode

    assert np.array_equal(predictor.decode(file.read_bytes()),
                          decode(file.read_bytes(), (20, 20), "rgb"))


def test_bundle_errors(trained_bundle, tmp_path):
    with pytest.raises(BundleError, match="model bundle not found"):
        bundle.load(tmp_path / "nothing")
    with pytest.raises(BundleError, match="not a clfsys model bundle"):
        bundle.load(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metadata.json").write_text('{"format": "something-else"}')
    with pytest.raises(BundleError, match="not a clfsys model bundle"):
        bundle.load(foreign)
    broken = tmp_path / "broken"
    shutil.copytree(trained_bundle, broken)
    (broken / "model.keras").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(BundleError, match="cannot load the model"):
        bundle.load(broken).load_model()
    with pytest.raises(BundleError, match="model.keras: file does not match"):
        bundle.load(broken).check_file()
    bundle.load(trained_bundle).check_file()
    tampered = tmp_path / "tampered"
    shutil.copytree(trained_bundle, tampered)
    meta = json.loads((tampered / "metadata.json").read_text())
    meta["model_id"] = "0" * 16
    (tampered / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="do not match metadata model_id"):
        bundle.load(tampered).load_model()


def test_the_bundle_records_resize_and_its_consumers_follow_it(image_folder, tmp_path):
    from PIL import Image

    from clfsys import images
    from clfsys.label import decode_batch
    from clfsys.train import publish

    result = train(folder_config(image_folder, **{"data.resize": "pad", "train.epochs": 1}))
    out = tmp_path / "bundle"
    publish(result, out)
    found = bundle.load(out)
    assert found.resize == found.metadata["resize"] == "pad"
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((10, 40, 3), 200, dtype=np.uint8)).save(wide)
    data = wide.read_bytes()
    padded = images.decode(data, (20, 20), "rgb", resize="pad")
    assert padded[0].max() == 0 and padded[10].min() == 200  # black border, image in the middle
    assert np.array_equal(Predictor(found).decode(data), padded)  # serving
    labelled = decode_batch({"path": np.array([str(wide)])}, found.image_size,
                            found.color_mode, 10**6, found.resize)  # labelling
    assert np.array_equal(labelled["image"][0], padded)
    # The resize mode is part of the model's identity: stretching would change its inputs.
    meta = json.loads((out / "metadata.json").read_text())
    (out / "metadata.json").write_text(json.dumps({**meta, "resize": "stretch"}))
    with pytest.raises(BundleError, match="do not match metadata model_id"):
        bundle.load(out).load_model()
    (out / "metadata.json").write_text(json.dumps({**meta, "resize": "squash"}))
    with pytest.raises(BundleError, match="field 'resize' must be one of"):
        bundle.load(out)
