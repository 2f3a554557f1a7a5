import numpy as np
import pytest
from conftest import CLASSES, SHARED, needs_fashion_mnist, write_csv, write_folder

from clfsys import data, dataset
from clfsys.config import DataConfig
from clfsys.errors import ConfigError, DataError


def test_stratified_split_keeps_class_proportions():
    y = np.repeat(np.arange(4), [100, 50, 20, 2])
    kept, held = dataset.stratified_split(y, 0.1, seed=3)
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == len(y)
    assert list(np.bincount(y[held])) == [10, 5, 2, 1]
    again = dataset.stratified_split(y, 0.1, seed=3)
    assert np.array_equal(held, again[1])
    assert not np.array_equal(held, dataset.stratified_split(y, 0.1, seed=4)[1])


def test_folder_dataset_recursive_rgb_and_grayscale(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=10, nested=True)
    (root / "left" / "notes.txt").write_text("not an input")
    cfg = DataConfig(dataset="folder", path=str(root), image_size=[16, 12], val_fraction=0.2,
                     test_fraction=0.2)
    ds = data.load(cfg)
    assert ds.class_names == CLASSES
    assert ds.input_shape == (16, 12, 3) and ds.x_train.dtype == np.uint8
    assert len(ds.x_train) + len(ds.x_val) + len(ds.x_test) == 30
    assert sorted(np.bincount(ds.y_test)) == [2, 2, 2]  # stratified test split
    gray = data.load(DataConfig(dataset="folder", path=str(root), color_mode="grayscale",
                                image_size=[8, 8]))
    assert gray.input_shape == (8, 8, 1) and gray.color_mode == "grayscale"


def test_folder_with_separate_test_folder(tmp_path):
    train = write_folder(tmp_path / "train", per_class=6)
    test = write_folder(tmp_path / "test", per_class=2, classes=["left", "top"], seed=1)
    ds = data.load(DataConfig(dataset="folder", path=str(train), test_path=str(test),
                              image_size=[10, 10]))
    assert len(ds.x_test) == 4 and set(ds.y_test) == {0, 2}  # class index from training order
    bad = write_folder(tmp_path / "bad", per_class=1, classes=["left", "wasps"])
    with pytest.raises(DataError, match="'wasps' is not a training class"):
        data.load(DataConfig(dataset="folder", path=str(train), test_path=str(bad)))


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        data.load(DataConfig(dataset="folder", path=str(tmp_path / "none")))
    one = write_folder(tmp_path / "one", per_class=3, classes=["only"])
    with pytest.raises(DataError, match="at least 2 class subfolders"):
        data.load(DataConfig(dataset="folder", path=str(one)))
    root = write_folder(tmp_path / "imgs", per_class=3)
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder has no images: .*empty"):
        data.load(DataConfig(dataset="folder", path=str(root)))


def test_corrupt_image_stops_with_its_name_or_is_skipped_and_counted(tmp_path):
    root = write_folder(tmp_path / "imgs", per_class=5)
    broken = root / "right" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"broken\.png: cannot decode image"):
        data.load(DataConfig(dataset="folder", path=str(root), image_size=[8, 8]))
    ds = data.load(DataConfig(dataset="folder", path=str(root), image_size=[8, 8],
                              skip_corrupt=True))
    assert ds.skipped == [(str(broken), "truncated")]
    assert len(ds.x_train) + len(ds.x_val) + len(ds.x_test) == 15


def test_csv_dataset(tmp_path):
    train = write_csv(tmp_path / "train.csv", rows=30)
    test = write_csv(tmp_path / "test.csv", rows=9, seed=1)
    ds = data.load(DataConfig(dataset="csv", path=str(train), test_path=str(test),
                              class_names=["a", "b", "c"]))
    assert ds.input_shape == (8, 8, 1) and ds.class_names == ["a", "b", "c"]
    assert len(ds.x_train) + len(ds.x_val) == 30 and len(ds.x_test) == 9
    no_test = data.load(DataConfig(dataset="csv", path=str(train)))
    assert no_test.class_names == ["0", "1", "2"] and len(no_test.x_test) == 6


def test_csv_errors(tmp_path):
    odd = tmp_path / "odd.csv"
    odd.write_text("label,p1,p2,p3\n0,1,2,3\n1,4,5,6\n")
    with pytest.raises(DataError, match=r"odd\.csv: 3 pixel columns do not form a square"):
        data.load(DataConfig(dataset="csv", path=str(odd)))
    text = tmp_path / "text.csv"
    text.write_text("label,p1,p2,p3,p4\n0,1,x,3,4\n1,4,5,6,7\n")
    with pytest.raises(DataError, match="column 'p2' is not numeric"):
        data.load(DataConfig(dataset="csv", path=str(text)))
    good = write_csv(tmp_path / "good.csv", rows=12)
    with pytest.raises(ConfigError, match="data.class_names has 2 names"):
        data.load(DataConfig(dataset="csv", path=str(good), class_names=["a", "b"]))
    with pytest.raises(DataError, match="CSV file not found"):
        data.load(DataConfig(dataset="csv", path=str(tmp_path / "nope.csv")))


def test_limit_caps_the_training_pool(tmp_path):
    csv = write_csv(tmp_path / "d.csv", rows=60)
    ds = data.load(DataConfig(dataset="csv", path=str(csv), limit=20, val_fraction=0.25))
    assert len(ds.x_train) + len(ds.x_val) == 20


def test_safe_folder_names():
    assert data.safe_folder_names(["T-shirt/top", "Ankle boot", "..", "a b", "a/b"]) == [
        "T-shirt_top", "Ankle_boot", "class_2", "a_b", "a_b_4"]


@needs_fashion_mnist()
def test_fashion_mnist_through_the_keras_loader():
    ds = data.load(DataConfig(dataset="fashion_mnist", limit=1000))
    assert ds.input_shape == (28, 28, 1) and ds.class_names[0] == "T-shirt/top"
    assert len(ds.x_train) + len(ds.x_val) == 1000 and len(ds.x_test) == 10000


@needs_fashion_mnist()
def test_export_images_writes_safe_class_folders(tmp_path):
    from PIL import Image

    out = tmp_path / "export"
    assert data.export_images(DataConfig(), "test", out, limit=50) == 50
    folders = sorted(p.name for p in out.iterdir())
    assert "T-shirt_top" in folders and "Ankle_boot" in folders
    files = sorted(out.rglob("*.png"))
    assert len(files) == 50
    import keras

    _, (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    first = out / data.safe_folder_names(data.FASHION_MNIST_CLASSES)[y_test[0]] / "test_00000.png"
    assert np.array_equal(np.asarray(Image.open(first)), x_test[0])
    with pytest.raises(DataError, match="output folder is not empty"):
        data.export_images(DataConfig(), "test", out, limit=5)


@pytest.mark.skipif(not (SHARED / "hymenoptera").is_dir(), reason="../shared not present")
def test_hymenoptera_photos_load():
    root = SHARED / "hymenoptera"
    ds = data.load(DataConfig(dataset="folder", path=str(root / "train"),
                              test_path=str(root / "val"), image_size=[32, 32]))
    assert ds.class_names == ["ants", "bees"]
    assert len(ds.x_train) + len(ds.x_val) == 244 and len(ds.x_test) == 153


def test_stratified_sample_is_exact_proportional_and_seeded():
    y = np.repeat(np.arange(3), [60, 30, 10])
    picked = dataset.stratified_sample(y, 20, seed=1)
    assert len(picked) == 20 and len(np.unique(picked)) == 20
    assert list(np.bincount(y[picked])) == [12, 6, 2]
    assert np.array_equal(picked, dataset.stratified_sample(y, 20, seed=1))
    assert not np.array_equal(picked, dataset.stratified_sample(y, 20, seed=2))
    assert list(np.bincount(y[dataset.stratified_sample(y, 4, seed=0)])) == [2, 1, 1]
    assert list(np.bincount(y[dataset.stratified_sample(y, 7, seed=0)])) == [4, 2, 1]
    assert len(dataset.stratified_sample(y, 500, seed=0)) == 100


def test_limit_on_a_folder_is_stratified_and_decodes_only_the_sample(tmp_path, decodes):
    root = tmp_path / "imgs"
    write_folder(root, per_class=30, classes=["left"], size=8)
    write_folder(root, per_class=10, classes=["right"], size=8, seed=1)
    cfg = DataConfig(dataset="folder", path=str(root), image_size=[8, 8], limit=8,
                     test_fraction=0.25, val_fraction=0.25)
    ds = data.load(cfg)
    pool = np.concatenate([ds.y_train, ds.y_val])
    assert list(np.bincount(pool)) == [6, 2]  # the first 8 files would all be "left"
    assert list(np.bincount(ds.y_test)) == [8, 2]
    assert len(decodes) == len(set(decodes)) == 8 + 10
    assert data.load(cfg).x_train.tobytes() == ds.x_train.tobytes()  # seeded


def test_test_only_decodes_only_the_test_split(tmp_path, decodes):
    root = write_folder(tmp_path / "imgs", per_class=10, size=8)
    cfg = DataConfig(dataset="folder", path=str(root), image_size=[8, 8], test_fraction=0.2)
    full = data.load(cfg)
    decodes.clear()
    test = data.load(cfg, test_only=True)
    assert len(decodes) == len(test.x_test) == len(full.x_test) == 6
    assert np.array_equal(test.x_test, full.x_test) and np.array_equal(test.y_test, full.y_test)
    assert len(test.x_train) == len(test.x_val) == 0 and test.input_shape == (8, 8, 3)
