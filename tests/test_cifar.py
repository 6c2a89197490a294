"""CIFAR-10 from its binary batch files (small files written here), validated like the IDX loader;
the offline stand-in mnist5k-32; and ``refnet train --data cifar10 --data-dir`` on a ResNet."""

import gzip
import json

import numpy as np
import pytest

from refnet import data
from refnet.cli import main
from refnet.network import load_network

FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def write_cifar(folder, n_per_file=6, seed=0):
    """Six small batch files in ``folder``; returns the (X, y) written to each."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for f in FILES:
        X = rng.integers(0, 256, (n_per_file, 3, 32, 32))
        y = rng.integers(0, 10, n_per_file)
        data.write_cifar_batch(folder / f, X, y)
        out[f] = (X, y)
    return out


def test_records_are_read_as_nchw_images(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.integers(0, 256, (3, 3, 32, 32))
    y = np.array([9, 0, 4])
    data.write_cifar_batch(tmp_path / "b.bin", X, y)
    raw = (tmp_path / "b.bin").read_bytes()
    assert len(raw) == 3 * 3073 and raw[0] == 9 and raw[3073] == 0
    assert raw[1] == X[0, 0, 0, 0] and raw[1 + 1024] == X[0, 1, 0, 0] and raw[1 + 33] == X[0, 0, 1, 1]  # R, G planes
    Xr, yr = data.read_cifar_batch(tmp_path / "b.bin")
    np.testing.assert_array_equal(Xr.reshape(3, 3, 32, 32), X)
    np.testing.assert_array_equal(yr, y)
    assert Xr.dtype == np.uint8 and yr.dtype == np.int64
    with gzip.open(tmp_path / "b.bin.gz", "wb") as f:
        f.write(raw)
    np.testing.assert_array_equal(data.read_cifar_batch(tmp_path / "b.bin.gz")[0], Xr)


def test_load_splits_preprocessing_and_layout(tmp_path):
    written = write_cifar(tmp_path / "c")
    Xtr, ytr = data.load("cifar10", split="train", data_dir=tmp_path / "c", flatten=False, preprocess=False, cache=False)
    Xte, yte = data.load("CIFAR10", split="test", data_dir=tmp_path / "c", flatten=False, preprocess=False)
    assert Xtr.shape == (30, 3, 32, 32) and Xte.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(Xtr, np.concatenate([written[f][0] for f in FILES[:5]]))
    np.testing.assert_array_equal(ytr, np.concatenate([written[f][1] for f in FILES[:5]]))
    np.testing.assert_array_equal(Xte, written["test_batch.bin"][0])
    np.testing.assert_array_equal(yte, written["test_batch.bin"][1])
    Xs, _ = data.load("cifar10", data_dir=tmp_path / "c")  # standardised by the training split's scalars
    assert Xs.shape == (30, 3072) and abs(Xs.mean()) < 1e-12 and abs(Xs.std() - 1) < 1e-12
    # the official archive's folder name as a subfolder
    write_cifar(tmp_path / "d" / "cifar-10-batches-bin", seed=2)
    assert data.load("cifar10", split="all", data_dir=tmp_path / "d")[0].shape == (36, 3072)
    assert data.info("cifar10").in_shape(flatten=False) == (3, 32, 32)
    assert data.check_data_dir("cifar10", tmp_path / "c")[0].name == "data_batch_1.bin"


def test_bad_files_are_named(tmp_path):
    write_cifar(tmp_path / "c")
    bad = tmp_path / "c" / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"data_batch_3\.bin: wrong size .* 18433 bytes is not a positive multiple of 3073"):
        data.load("cifar10", data_dir=tmp_path / "c", cache=False)
    rec = bytearray((tmp_path / "c" / "data_batch_1.bin").read_bytes())
    rec[3073] = 10  # the second record's label
    (tmp_path / "c" / "data_batch_3.bin").write_bytes(bytes(rec))
    with pytest.raises(ValueError, match=r"data_batch_3\.bin: labels out of range: expected 0..9, found 10 in record 1"):
        data.load("cifar10", data_dir=tmp_path / "c", cache=False)
    (tmp_path / "c" / "data_batch_3.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="0 bytes"):
        data.read_cifar_batch(tmp_path / "c" / "data_batch_3.bin")
    (tmp_path / "c" / "data_batch_3.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing .*data_batch_3\.bin"):
        data.load("cifar10", data_dir=tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").write_bytes(b"pickled")
    with pytest.raises(FileNotFoundError, match="python version"):
        data.check_data_dir("cifar10", tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no folder was given"):
        data.load("cifar10", data_dir=None)
    with pytest.raises(ValueError, match="X must be"):
        data.write_cifar_batch(tmp_path / "x.bin", np.zeros((2, 3, 28, 28)), np.zeros(2))


def test_mnist5k_32_is_mnist5k_padded():
    X, y = data.load("mnist5k", flatten=False, preprocess=False)
    Xp, yp = data.load("mnist5k-32", flatten=False, preprocess=False)
    assert Xp.shape == (4000, 1, 32, 32)
    np.testing.assert_array_equal(Xp[:, :, 2:30, 2:30], X)
    assert not Xp[:, :, :2].any() and not Xp[:, :, :, 30:].any()
    np.testing.assert_array_equal(yp, y)
    assert data.info("mnist5k_32").n_test == 1000


def test_cli_trains_a_resnet_on_cifar_files(tmp_path, capsys):
    write_cifar(tmp_path / "c", n_per_file=4)
    out = tmp_path / "run"
    argv = ["train", "--data", "cifar10", "--data-dir", str(tmp_path / "c"), "--arch", "resnet-8-w0.125",
            "--init", "delta_orthogonal", "--steps", "2", "--batch-size", "8", "--out", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "BatchNorm2d[relu]" in stdout and "Add[relu]" in stdout and "SubsamplePad" in stdout
    hist = json.loads((out / "history.json").read_text())
    assert hist["status"] == "completed" and hist["n_train"] == 20 and hist["n_test"] == 4
    net = load_network(out / "net.npz")
    assert net.in_shape == (3, 32, 32) and not net.is_chain
    assert any(not np.array_equal(b["running_var"], np.ones_like(b["running_var"])) for b in net.buffers if b)
