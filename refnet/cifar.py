"""CIFAR-10 from its binary batch files (the "binary version"; never the pickled "python version").

Each file is ``n`` records of 3,073 bytes: 1 label byte, then the 1,024 red, 1,024 green and 1,024
blue pixel bytes of a 32 x 32 image in row-major order, which is exactly the NCHW layout
``(3, 32, 32)``. :func:`refnet.data.load` reads them as the dataset ``"cifar10"`` (with its caches
and preprocessing); the readers here validate like the IDX reader (a ValueError naming the file
and what is wrong).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from ._io import atomic_write

__all__ = ["CIFAR_RECORD", "CIFAR_TEST_FILES", "CIFAR_TRAIN_FILES", "cifar_paths", "raw_cifar", "read_cifar_batch",
           "write_cifar_batch"]


CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_FILES = ("test_batch.bin",)
CIFAR_RECORD = 1 + 3 * 32 * 32  # 1 label byte + 3072 pixel bytes


def cifar_paths(data_dir) -> list[Path]:
    """The six batch files, from ``data_dir`` (default ``$REFNET_DATA_DIR``) or its subfolder
    ``cifar10/`` or ``cifar-10-batches-bin/`` (the folder the official archive unpacks to)."""
    files = ", ".join(CIFAR_TRAIN_FILES + CIFAR_TEST_FILES)
    if data_dir is None:
        data_dir = os.environ.get("REFNET_DATA_DIR") or None
    if data_dir is None:
        raise FileNotFoundError(
            "dataset 'cifar10' is read from its local binary batch files and no folder was given: pass "
            f"data_dir=... to refnet.data.load (--data-dir) or set REFNET_DATA_DIR. The folder must hold {files} "
            "(the 'binary version' of CIFAR-10; refnet never downloads and never reads the pickled version)"
        )
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a str or os.PathLike, got {type(data_dir).__name__} {data_dir!r}")
    root = Path(os.fspath(data_dir)).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder for 'cifar10' not found: {root}. Put {files} in it; refnet never downloads.")
    folder = root
    for sub in ("cifar10", "cifar-10-batches-bin"):
        if (root / sub).is_dir():
            folder = root / sub
            break
    paths = []
    for base in CIFAR_TRAIN_FILES + CIFAR_TEST_FILES:
        for candidate in (folder / base, folder / (base + ".gz")):
            if candidate.is_file():
                paths.append(candidate)
                break
        else:
            hint = " (found the pickled 'python version' files: refnet reads only the binary version)" if (
                folder / base.replace(".bin", "")).exists() else ""
            raise FileNotFoundError(
                f"'cifar10': missing {folder / base}{hint}. Put the binary batch files {files} directly in "
                f"{folder} (or in its subfolder cifar10/ or cifar-10-batches-bin/); refnet never downloads."
            )
    return paths


def read_cifar_batch(path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch file: ``(X, y)`` with ``X`` ``(n, 3072)`` uint8 (the NCHW
    order of ``(3, 32, 32)`` images) and ``y`` ``(n,)`` int64 labels.

    The file is ``n`` records of 3,073 bytes (1 label byte, then 1,024 red, 1,024 green and 1,024
    blue pixel bytes, row-major); raw or ``.gz``. ValueError naming the path for a size that is
    not a positive multiple of 3,073 bytes or a label above 9; FileNotFoundError if it is missing.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a CIFAR-10 batch file")
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch file not found: {path}")
    try:
        buf = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: not a readable gzip file ({exc})") from exc
    if len(buf) == 0 or len(buf) % CIFAR_RECORD:
        raise ValueError(
            f"{path}: wrong size for a CIFAR-10 binary batch file: {len(buf)} bytes is not a positive multiple of "
            f"{CIFAR_RECORD} (1 label byte + 3072 pixel bytes per record); is it the pickled 'python version' "
            "(not supported) or a truncated file?"
        )
    rec = np.frombuffer(buf, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    y = rec[:, 0].astype(np.int64)
    if y.max() > 9:
        bad = int(np.argmax(y > 9))
        raise ValueError(f"{path}: labels out of range: expected 0..9, found {int(y[bad])} in record {bad}")
    return np.array(rec[:, 1:]), y


def write_cifar_batch(path, X, y) -> None:
    """Write ``(X, y)`` as a CIFAR-10 binary batch file (atomically): ``X`` ``(n, 3072)`` or
    ``(n, 3, 32, 32)`` integers in 0..255, ``y`` ``(n,)`` labels in 0..9 (for tests and small
    files; :func:`read_cifar_batch` reads it back)."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim not in (2, 4) or X.shape[0] == 0 or X[0].size != 3072:
        raise ValueError(f"X must be (n, 3072) or (n, 3, 32, 32) with n >= 1, got shape {X.shape}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"y must have shape ({X.shape[0]},), got {y.shape}")
    if X.min() < 0 or X.max() > 255 or y.min() < 0 or y.max() > 9:
        raise ValueError("X must hold values in 0..255 and y labels in 0..9")
    rec = np.concatenate([y.astype(np.uint8)[:, None], X.reshape(X.shape[0], -1).astype(np.uint8)], axis=1)
    atomic_write(Path(os.fspath(path)), lambda f: f.write(rec.tobytes()))


def raw_cifar(paths: list[Path]):
    """``(X_train, y_train, X_test, y_test)`` from the six files of :func:`cifar_paths`."""
    parts = [read_cifar_batch(p) for p in paths]
    Xtr = np.concatenate([X for X, _ in parts[:5]])
    ytr = np.concatenate([y for _, y in parts[:5]])
    return Xtr, ytr, parts[5][0], parts[5][1]
