"""Damaged and malformed files: every loader gives a ValueError that names the path.

Loaders: networks (:func:`refnet.load_network`), training histories (:func:`refnet.load_history`),
IDX data files (:func:`refnet.data.read_idx`) and the framework-neutral audit file
(:func:`refnet.audit.compare_npz`). Damage: truncation at every 10% of a saved file, every single
flipped byte of a saved network (the zip CRC-32 and the ``.npy`` headers catch it, or the byte
did not matter and the network loads unchanged), empty files, wrong formats (a ``.npy`` for an
``.npz``, JSON for ``.npz``, a config without ``layers`` or with an unknown key, unknown layer
types and arguments). Seen failing before the loaders were fixed: BadZipFile, EOFError,
KeyError, TypeError and JSONDecodeError escaped without the path.
"""

from __future__ import annotations

import gzip
import json
import zipfile

import numpy as np
import pytest

import refnet as rn
from refnet import data
from refnet.network import load_network
from refnet.training import History, load_history

TENTHS = [i / 10 for i in range(10)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small pruned network and its file's bytes."""
    net = rn.mlp([4, 3, 2], seed=0)
    net = net.with_masks([{"W": np.arange(12).reshape(3, 4) % 3 > 0}, None])
    path = tmp_path_factory.mktemp("saved") / "net.npz"
    net.save(path)
    return net, path.read_bytes()


def _same_net(a, b) -> bool:
    return (a.layers == b.layers and a.in_shape == b.in_shape and a.dtype == b.dtype
            and all(np.array_equal(p[k], q[k], equal_nan=True) for p, q in zip(a.params, b.params) for k in p)
            and all(np.array_equal(p[k], q[k]) for p, q in zip(a.masks, b.masks) for k in p))


def _expect_path_error(loader, path):
    with pytest.raises(ValueError) as info:
        loader(path)
    assert str(path) in str(info.value), str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", TENTHS)
def test_truncated_network_file(tmp_path, saved, fraction):
    _, blob = saved
    path = tmp_path / "net.npz"
    path.write_bytes(blob[: int(len(blob) * fraction)])
    _expect_path_error(load_network, path)


def test_every_flipped_byte_is_caught_or_harmless(tmp_path, saved):
    net, blob = saved
    path = tmp_path / "net.npz"
    caught = harmless = 0
    for i in range(len(blob)):
        damaged = bytearray(blob)
        damaged[i] ^= 0xFF
        path.write_bytes(bytes(damaged))
        try:
            back = load_network(path)
        except ValueError as exc:
            assert str(path) in str(exc), (i, str(exc))
            caught += 1
        else:  # a byte no reader uses (a zip timestamp, a version field): the same network
            assert _same_net(back, net), f"flipping byte {i} of {len(blob)} changed the network silently"
            harmless += 1
    assert caught > 0.8 * len(blob), (caught, harmless)


def test_empty_and_wrong_format_network_files(tmp_path, saved):
    net, blob = saved
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    assert "empty" in _expect_path_error(load_network, empty)
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(3))
    assert ".npy" in _expect_path_error(load_network, npy)
    js = tmp_path / "history.json"
    js.write_text('{"format": "refnet.History"}')
    assert "not a .npz" in _expect_path_error(load_network, js)
    other_zip = tmp_path / "other.npz"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("readme.txt", "hello")
    _expect_path_error(load_network, other_zip)
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    assert "folder" in _expect_path_error(load_network, folder)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_network(tmp_path / "missing.npz")


def _resave(tmp_path, net, name, edit_config=None, edit_arrays=None):
    cfg = net.to_config()
    if edit_config:
        edit_config(cfg)
    arrays = {"config": np.array(json.dumps(cfg))}
    for i, (p, m) in enumerate(zip(net.params, net.masks)):
        for k in p:
            arrays[f"param/{i}/{k}"] = p[k]
            arrays[f"mask/{i}/{k}"] = m[k]
    if edit_arrays:
        edit_arrays(arrays)
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("what,edit_config,edit_arrays,words", [
    ("no layers", lambda c: c.pop("layers"), None, "layers"),
    ("unknown key", lambda c: c.update(colour="blue"), None, "unknown keys ['colour']"),
    ("layers not a list", lambda c: c.update(layers={"a": 1}), None, "layers"),
    ("empty layers", lambda c: c.update(layers=[]), None, "layers"),
    ("unknown layer type", lambda c: c["layers"][0].update(type="Dense3D"), None, "'layers'[0]"),
    ("unknown layer argument", lambda c: c["layers"][0].update(colour=1), None, "'layers'[0]"),
    ("bad in_shape", lambda c: c.update(in_shape=[4.5]), None, "in_shape"),
    ("bad dtype", lambda c: c.update(dtype="int8"), None, "dtype"),
    ("wrong version", lambda c: c.update(version=99), None, "version"),
    ("config not an object", lambda c: c.clear(), None, "format"),
    ("float mask", None, lambda a: a.update({"mask/0/W": a["mask/0/W"].astype(float)}), "mask/0/W"),
    ("extra array", None, lambda a: a.update(extra=np.zeros(2)), "extra"),
    ("config array", None, lambda a: a.update(config=np.zeros(3)), "config"),
    ("param dtype", None, lambda a: a.update({"param/0/W": a["param/0/W"].astype(np.float32)}), "dtype"),
])
def test_malformed_network_configs(tmp_path, saved, what, edit_config, edit_arrays, words):
    net, _ = saved
    path = _resave(tmp_path, net, "bad.npz", edit_config, edit_arrays)
    msg = _expect_path_error(load_network, path)
    assert words in msg, msg


def test_nan_at_pruned_entries_round_trips_and_kept_nan_is_refused(tmp_path, saved):
    net, _ = saved
    net = net.copy()
    net.params[0]["W"][~net.masks[0]["W"]] = np.nan  # pruned: contributes exactly zero
    net.save(tmp_path / "ok.npz")
    back = load_network(tmp_path / "ok.npz")
    assert _same_net(back, net) and np.isfinite(back.forward(np.ones((2, 4)))).all()
    net.params[0]["W"][net.masks[0]["W"]] = np.inf  # kept: refused, naming the file and the layer
    path = _resave(tmp_path, net, "kept.npz")
    assert "params[0]['W']" in _expect_path_error(load_network, path)


# --------------------------------------------------------------------------------------------
# histories
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def history_blob(tmp_path_factory):
    X = np.random.default_rng(0).standard_normal((40, 4))
    y = np.arange(40) % 2
    path = tmp_path_factory.mktemp("hist") / "h.json"
    rn.train(rn.mlp([4, 3, 2], seed=0), X, y, steps=6, batch_size=10, eval_every=2, history_path=path, progress=False)
    return path.read_bytes()


@pytest.mark.parametrize("fraction", TENTHS)
def test_truncated_history(tmp_path, history_blob, fraction):
    path = tmp_path / "h.json"
    path.write_bytes(history_blob[: int(len(history_blob) * fraction)])
    _expect_path_error(load_history, path)


def test_flipped_bytes_in_a_history_give_a_history_or_a_path_error(tmp_path, history_blob):
    path = tmp_path / "h.json"
    for i in range(0, len(history_blob), 7):
        damaged = bytearray(history_blob)
        damaged[i] ^= 0x5A
        path.write_bytes(bytes(damaged))
        try:
            assert isinstance(load_history(path), History)  # a changed digit is still a history
        except ValueError as exc:
            assert str(path) in str(exc), (i, str(exc))


@pytest.mark.parametrize("text,words", [
    ("", "empty"),
    ("[1, 2]", "refnet.History"),
    ('{"format": "refnet.History", "version": 1, "steps": 3}', "steps"),
    ('{"format": "refnet.History", "version": 1, "steps": [1, 2], "train_loss": [0.5]}', "one entry per evaluation"),
    ('{"format": "refnet.History", "version": 1, "colour": 1}', "unknown keys"),
    ('{"format": "refnet.History", "version": 1, "status": "exploded"}', "status"),
    ("\udcff", "UTF-8"),
])
def test_malformed_histories(tmp_path, text, words):
    path = tmp_path / "h.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    msg = _expect_path_error(load_history, path)
    assert words in msg, msg


def test_a_network_file_is_not_a_history(tmp_path, saved):
    path = tmp_path / "net.npz"
    path.write_bytes(saved[1])
    _expect_path_error(load_history, path)


# --------------------------------------------------------------------------------------------
# IDX data files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("fraction", TENTHS)
def test_truncated_idx(tmp_path, gz, fraction):
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    data.write_idx(path, np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3))
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * fraction)])
    _expect_path_error(data.read_idx, path)


def test_idx_header_damage_and_wrong_formats(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    data.write_idx(path, np.arange(7, dtype=np.uint8))
    blob = path.read_bytes()
    for i in range(8):  # every byte of the magic number and of the one size
        damaged = bytearray(blob)
        damaged[i] ^= 0xFF
        path.write_bytes(bytes(damaged))
        _expect_path_error(data.read_idx, path)
    path.write_bytes(b"")
    _expect_path_error(data.read_idx, path)
    path.write_bytes(b"\x00\x00\x08\x04" + (2**32 - 1).to_bytes(4, "big") * 4)  # a header asking for 2^128 bytes
    assert "header" in _expect_path_error(data.read_idx, path)
    gz = tmp_path / "x-idx1-ubyte.gz"
    gz.write_bytes(gzip.compress(blob)[:-6])  # a broken gzip stream
    _expect_path_error(data.read_idx, gz)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    _expect_path_error(data.read_idx, folder)


# --------------------------------------------------------------------------------------------
# audit inputs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audit_blob(tmp_path_factory):
    from refnet import audit

    net = rn.mlp([4, 3, 2], seed=0)
    x = np.random.default_rng(0).standard_normal((5, 4))
    y = np.arange(5) % 2
    path = tmp_path_factory.mktemp("audit") / "a.npz"
    audit.write_npz(path, net, x, y, logits=net.forward(x))
    return path.read_bytes()


def _compare(path):
    from refnet import audit

    return audit.compare_npz(path)


@pytest.mark.parametrize("fraction", TENTHS)
def test_truncated_audit_file(tmp_path, audit_blob, fraction):
    path = tmp_path / "a.npz"
    path.write_bytes(audit_blob[: int(len(audit_blob) * fraction)])
    _expect_path_error(_compare, path)


def test_audit_file_wrong_formats(tmp_path, audit_blob):
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(3))
    _expect_path_error(_compare, npy)
    with np.load(_write(tmp_path / "good.npz", audit_blob)) as f:
        arrays = {k: f[k] for k in f.files}
    bad = dict(arrays, arch=np.array('{"layers": [{"type": "Dense", "n_in": 4}], "in_shape": [4]}'))
    np.savez(tmp_path / "layer.npz", **bad)
    _expect_path_error(_compare, tmp_path / "layer.npz")
    bad = dict(arrays, sparsity=np.array("lots"))
    np.savez(tmp_path / "sparsity.npz", **bad)
    _expect_path_error(_compare, tmp_path / "sparsity.npz")
    bad = dict(arrays)
    bad["param/0/W"] = np.full_like(arrays["param/0/W"], np.nan)
    np.savez(tmp_path / "nan.npz", **bad)
    _expect_path_error(_compare, tmp_path / "nan.npz")


def _write(path, blob):
    path.write_bytes(blob)
    return path
