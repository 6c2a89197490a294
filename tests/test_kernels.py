"""refnet.kernels: every kernel of every available engine against the NumPy oracle, and the
engine selection rules.

Shapes come from hypothesis: empty batches, 1 x 1, rectangular, non-contiguous (stepped slices,
transposed views) and Fortran-ordered operands, all-zero and all-one masks, float32 and float64.
Tolerances are bounds, not guesses: a product's error is compared with ``tol * (|x| |mask*W|^T)``
(the worst case of rounding), ``tol`` = 1e-12 for float64 and 1e-5 for float32; singular values
to 1e-13 (float64) / 1e-5 (float32) of each matrix's largest one.
CuPy tests skip themselves without CuPy or without a GPU.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refnet import kernels
from refnet.kernels import _structure, _threads, _tuning, numpy_engine

import fake_cupy

HAVE_NUMBA = "numba" in kernels.available_engines()
CPU_ENGINES = ["numpy"] + (["numba"] if HAVE_NUMBA else [])
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


@pytest.fixture(autouse=True)
def _clean_engine_state(monkeypatch):
    """No test sees another's engine choice; the pool paths run even on one core."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.set_engine(None)
    if HAVE_NUMBA:
        from refnet.kernels import numba_engine

        monkeypatch.setattr(numba_engine, "_workers", lambda: 3)  # exercise the chunked pool
        monkeypatch.setattr(_tuning, "SVD_MIN_SIDE", 1)
        # the dense path's blocks on the small hypothesis matrices too (several blocks each)
        monkeypatch.setattr(numba_engine, "MIN_SPARSE_SIZE", 0)
        monkeypatch.setattr(numba_engine, "DENSE_BLOCK_ROWS", 7)
        monkeypatch.setattr(numba_engine, "DENSE_BLOCK_ROWS_T", 5)
    yield
    kernels.set_engine(None)


# -------------------------------------------------------------------------------------------
# operand strategies
# -------------------------------------------------------------------------------------------

LAYOUTS = ["C", "F", "strided", "transposed"]


def _layout(a: np.ndarray, layout: str) -> np.ndarray:
    """The same values as ``a`` in another memory layout."""
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "strided":  # every other row and column of a bigger array
        big = np.zeros((2 * a.shape[0] + 1, 2 * a.shape[1] + 1), dtype=a.dtype)
        big[1::2, 1::2] = a
        return big[1::2, 1::2]
    if layout == "transposed":  # a transposed view of a C array
        return np.ascontiguousarray(a.T).T
    return np.ascontiguousarray(a)


def _mask(rng, shape, kind):
    if kind == "none":
        return None
    if kind == "zeros":
        return np.zeros(shape, dtype=bool)
    if kind == "ones":
        return np.ones(shape, dtype=bool)
    if kind == "float01":  # 0/1 as floats: the sparse paths take it
        return (rng.random(shape) < 0.3).astype(np.float64)
    if kind == "weighted":  # a soft mask: only the dense paths apply
        return rng.random(shape) * (rng.random(shape) < 0.5)
    return rng.random(shape) >= float(kind)  # a sparsity


MASK_KINDS = st.sampled_from(["none", "zeros", "ones", "0.5", "0.9", "0.99", "float01", "weighted"])


@st.composite
def matmul_cases(draw):
    B = draw(st.sampled_from([0, 1, 2, 5, 17]))
    n_out = draw(st.integers(1, 24))
    n_in = draw(st.integers(1, 24))
    dtype = np.dtype(draw(st.sampled_from([np.float64, np.float32])))
    layouts = (draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(LAYOUTS)))
    kind = draw(MASK_KINDS)
    seed = draw(st.integers(0, 2**31 - 1))
    return B, n_out, n_in, dtype, layouts, kind, seed


def _close(got, ref, bound, tol, what):
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != {ref.dtype}"
    err = np.abs(np.asarray(got, dtype=np.float64) - ref)
    ok = err <= tol * bound + np.finfo(ref.dtype).tiny
    assert ok.all(), f"{what}: max error {err.max():.3g} above {tol:g} x bound (max ratio {(err / np.maximum(bound, 1e-300)).max():.3g})"


# -------------------------------------------------------------------------------------------
# masked matmul
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", CPU_ENGINES)
@settings(max_examples=60)
@given(case=matmul_cases(), method=st.sampled_from(["auto", "dense", "csr"]))
def test_masked_matmul_matches_oracle(engine, case, method):
    B, n_out, n_in, dtype, layouts, kind, seed = case
    rng = np.random.default_rng(seed)
    W = _layout(rng.standard_normal((n_out, n_in)).astype(dtype), layouts[0])
    x = _layout(rng.standard_normal((B, n_in)).astype(dtype), layouts[1]) if B else np.zeros((0, n_in), dtype)
    g = _layout(rng.standard_normal((B, n_out)).astype(dtype), layouts[2]) if B else np.zeros((0, n_out), dtype)
    mask = _mask(rng, (n_out, n_in), kind)
    if mask is not None:
        mask = _layout(mask, layouts[2])
    if method == "csr" and kind == "weighted" and mask.size and np.any((mask != 0) & (mask != 1)):
        with pytest.raises(ValueError, match="0/1"):
            kernels.masked_matmul(x, W, mask, engine=engine, method="csr")
        return
    tol = TOL[dtype]
    We = W if mask is None else W * mask
    aWe = np.abs(We).astype(np.float64)

    ref = numpy_engine.masked_matmul(x, W, mask)  # the oracle, (B, n_out)
    got = kernels.masked_matmul(x, W, mask, engine=engine, method=method)
    _close(got, ref, np.abs(x) @ aWe.T, tol, f"masked_matmul[{engine},{method}]")

    ref_t = numpy_engine.masked_matmul_t(g, W, mask)  # (B, n_in)
    got_t = kernels.masked_matmul_t(g, W, mask, engine=engine, method=method)
    _close(got_t, ref_t, np.abs(g) @ aWe, tol, f"masked_matmul_t[{engine},{method}]")


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("sparsity", [0.8, 0.97])  # both forward variants: W read in the kernel / gathered first
def test_numba_csr_larger_and_mixed_dtypes(dtype, sparsity):
    rng = np.random.default_rng(7)
    W = rng.standard_normal((150, 230)).astype(dtype)
    mask = rng.random(W.shape) >= sparsity
    x = rng.standard_normal((33, 230))  # float64 input with a float32 W: promoted like NumPy
    g = rng.standard_normal((33, 150)).astype(dtype)
    tol = TOL[np.result_type(x, W)]
    got = kernels.masked_matmul(x, W, mask, engine="numba", method="csr")
    _close(got, numpy_engine.masked_matmul(x, W, mask), np.abs(x) @ np.abs(W * mask).T.astype(np.float64), tol, "fwd")
    got = kernels.masked_matmul_t(g, W, mask, engine="numba", method="csr")
    _close(got, numpy_engine.masked_matmul_t(g, W, mask), np.abs(g) @ np.abs(W * mask).astype(np.float64), TOL[np.dtype(dtype)], "bwd")


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("sparsity", [0.8, 0.97])
def test_numba_serial_twins_and_parallel_kernels_match_the_oracle(threads, sparsity, monkeypatch):
    """threads=1 runs the serial twins of the parallel kernels (what the automatic engine
    uses); threads=2 the parallel ones on two Numba threads. Row lengths 0..9 cover every
    remainder of the four-entries-per-pass loop; B = 19 the transposition's remainder rows."""
    import numba

    from refnet.kernels import numba_engine

    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        rng = np.random.default_rng(21)
        W = rng.standard_normal((96, 80))
        mask = rng.random(W.shape) >= sparsity
        mask[:10] = False
        for i in range(10):  # rows with 0..9 kept entries
            mask[i, rng.choice(80, i, replace=False)] = True
        x = rng.standard_normal((19, 80))
        g = rng.standard_normal((19, 96))
        for method in ("csr", "dense"):
            kw = {"method": method, "threads": threads}
            _close(numba_engine.masked_matmul(x, W, mask, **kw), x @ (W * mask).T, np.abs(x) @ np.abs(W * mask).T, TOL[np.dtype(np.float64)], "fwd")
            _close(numba_engine.masked_matmul_t(g, W, mask, **kw), g @ (W * mask), np.abs(g) @ np.abs(W * mask), TOL[np.dtype(np.float64)], "bwd")
        kw = {"method": "csr", "threads": threads}
        for V in (W, W.T.copy()):  # tall and wide
            M = mask if V is W else mask.T.copy()
            got, res = numba_engine.isometry_step(V, M, 0.05, **kw)
            want, res_want = numpy_engine.isometry_step(V, M, 0.05)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * np.abs(want).max())
            assert res == pytest.approx(res_want, rel=1e-13)
    finally:
        numba.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be None or an int >= 1"):
        numba_engine.masked_matmul(x, W, mask, method="csr", threads=0)


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("shape", [(700, 9), (9, 700), (130, 90)])  # several blocks of rows / of columns
def test_numba_dense_path_blocks_mixed_dtypes_and_weighted_masks(shape, monkeypatch):
    """The dense path forms mask * W block by block: the blocks must tile the output exactly,
    a weighted mask must multiply, and float32 weights meet a float64 input as in NumPy."""
    from refnet.kernels import _tuning, numba_engine

    monkeypatch.setattr(numba_engine, "DENSE_BLOCK_ROWS", 64)  # many blocks on small matrices
    monkeypatch.setattr(numba_engine, "DENSE_BLOCK_ROWS_T", 64)
    rng = np.random.default_rng(8)
    W = rng.standard_normal(shape)
    x = rng.standard_normal((13, shape[1]))
    g = rng.standard_normal((13, shape[0]))
    for mask in (rng.random(shape) >= 0.5, rng.random(shape) * (rng.random(shape) >= 0.5)):
        for Wd in (W, W.astype(np.float32)):
            want_f, want_b = x @ (Wd * mask).T, g @ (Wd * mask)
            got_f = numba_engine.masked_matmul(x, Wd, mask, method="dense")
            got_b = numba_engine.masked_matmul_t(g, Wd, mask, method="dense")
            assert got_f.dtype == want_f.dtype and got_b.dtype == want_b.dtype
            np.testing.assert_allclose(got_f, want_f, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(got_b, want_b, rtol=1e-12, atol=1e-12)
    assert _tuning.DENSE_BLOCK_ROWS == 512  # the module constant was patched in the engine only


_SPECIAL = st.sampled_from([0.0, -0.0, 1.0, 2.5, np.inf, -1.0, np.nan, 1e-300, 5e-324])


@settings(max_examples=120, deadline=None)
@given(
    st.sampled_from([np.float64, np.float32]),
    st.integers(2, 300),
    st.sampled_from(["abs", "ties", "special"]),
    st.integers(0, 2**32 - 1),
    st.data(),
)
def test_kth_largest_matches_partition(dtype, n, kind, seed, data):
    """Every engine equals np.partition bit for bit: ties, zeros, subnormals and +inf take the
    radix select; negatives, -0.0 and NaN the oracle's rules."""
    rng = np.random.default_rng(seed)
    if kind == "abs":  # scores over many orders of magnitude, like |g w|
        s = np.abs(rng.standard_normal(n)) * rng.random(n) ** 6
    elif kind == "ties":
        s = rng.integers(0, 4, n) * 0.25
    else:
        s = np.array(data.draw(st.lists(_SPECIAL, min_size=n, max_size=n)))
    s = s.astype(dtype)
    k = data.draw(st.integers(1, n))
    want = np.partition(s, n - k)[n - k]
    for engine in CPU_ENGINES:
        got = kernels.kth_largest(s, k, engine=engine)
        assert got.dtype == s.dtype
        assert (np.isnan(got) and np.isnan(want)) or (got == want and np.signbit(got) == np.signbit(want)), (engine, got, want)


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
def test_kth_largest_radix_path_on_large_scores_and_errors():
    from refnet.kernels import numba_engine

    rng = np.random.default_rng(4)
    s = np.abs(rng.standard_normal(129_400)) * rng.random(129_400) ** 4
    assert kernels.resolve_engine("kth_largest", s) == "numba"
    for k in (1, 2, 12_940, 129_399, 129_400):
        assert numba_engine.kth_largest(s, k) == np.partition(s, s.size - k)[s.size - k]
    with pytest.raises(ValueError, match="k must be an int in"):
        kernels.kth_largest(s, 0)
    with pytest.raises(ValueError, match="s must be a 1-D array"):
        kernels.kth_largest(s.reshape(2, -1), 1)


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_sparse_paths_read_current_weights(engine):
    """The mask's structure is cached, the weights are not: W changing in place between calls
    (every training step) must show in the next product."""
    rng = np.random.default_rng(1)
    W = rng.standard_normal((40, 30))
    mask = rng.random(W.shape) >= 0.9
    x = rng.standard_normal((4, 30))
    kernels.masked_matmul(x, W, mask, engine=engine, method="csr")
    W *= -2.0
    W[0, :] += 1.0
    np.testing.assert_allclose(kernels.masked_matmul(x, W, mask, engine=engine, method="csr"), x @ (W * mask).T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(kernels.masked_matmul_t(x[:, :1] @ np.ones((1, 40)), W, mask, engine=engine, method="csr"), (x[:, :1] @ np.ones((1, 40))) @ (W * mask), rtol=1e-12, atol=1e-12)


def test_structure_cache_is_per_mask_object():
    rng = np.random.default_rng(2)
    mask = rng.random((20, 10)) >= 0.5
    s1 = _structure.mask_structure(mask)
    assert _structure.mask_structure(mask) is s1  # cached
    other = mask.copy()
    assert _structure.mask_structure(other) is not s1  # a new object, a new structure
    np.testing.assert_array_equal(s1.indices, np.nonzero(mask)[1])
    assert s1.nnz == mask.sum() and s1.indptr[-1] == s1.nnz
    cptr, cidx, perm, iperm = s1.csc()
    rows, cols = np.nonzero(mask.T)
    np.testing.assert_array_equal(cidx, cols)  # rows of each column, ascending
    np.testing.assert_array_equal(s1.indices[perm], np.repeat(np.arange(10), np.diff(cptr)))
    np.testing.assert_array_equal(perm[iperm], np.arange(s1.nnz))
    kernels.clear_cache()
    assert _structure.mask_structure(mask) is not s1
    assert _structure.mask_density(mask) == pytest.approx(mask.mean())


# -------------------------------------------------------------------------------------------
# batched singular values and products
# -------------------------------------------------------------------------------------------


@st.composite
def stacks(draw):
    batch = draw(st.sampled_from([(), (0,), (1,), (3,), (2, 3), (7,)]))
    m = draw(st.integers(1, 12))
    n = draw(st.integers(1, 12))
    dtype = np.dtype(draw(st.sampled_from([np.float64, np.float32])))
    layout = draw(st.sampled_from(["C", "F", "strided", "transposed"]))
    return batch, m, n, dtype, layout, draw(st.integers(0, 2**31 - 1))


def _stack_layout(a, layout):
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "strided":
        big = np.zeros(a.shape[:-2] + (2 * a.shape[-2], 3 * a.shape[-1]), dtype=a.dtype)
        big[..., ::2, ::3] = a
        return big[..., ::2, ::3]
    if layout == "transposed":
        return np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    return a


@pytest.mark.parametrize("engine", CPU_ENGINES)
@settings(max_examples=60)
@given(case=stacks())
def test_batched_svdvals_matches_oracle(engine, case):
    batch, m, n, dtype, layout, seed = case
    rng = np.random.default_rng(seed)
    A = rng.standard_normal(batch + (m, n)).astype(dtype)
    if A.size and rng.random() < 0.3:
        A[..., :, 0] = 0  # rank-deficient: exact zeros among the singular values
    A = _stack_layout(A, layout)
    ref = numpy_engine.batched_svdvals(A)
    got = kernels.batched_svdvals(A, engine=engine)
    assert got.shape == batch + (min(m, n),) and got.dtype == ref.dtype
    if A.size:
        tol = 1e-13 if dtype == np.float64 else 1e-5
        largest = ref.max(axis=-1, keepdims=True)
        assert (np.abs(got - ref) <= tol * largest).all()
        assert (np.diff(got, axis=-1) <= 0).all()  # descending


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_batched_svdvals_big_stack_and_errors(engine):
    rng = np.random.default_rng(3)
    A = rng.standard_normal((40, 30, 20))
    ref = np.linalg.svd(A, compute_uv=False)
    got = kernels.batched_svdvals(A, engine=engine)
    assert np.abs(got - ref).max() <= 1e-13 * ref.max(axis=-1).min()
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        kernels.batched_svdvals(np.ones(3), engine=engine)


def _check_svd(A, parts, full_matrices, tol):
    """``parts = (U, S, Vh)`` is an SVD of the stack ``A``: shapes, S equal to the oracle's and
    descending, ``U diag(S) Vh = A`` and orthonormal ``U``, ``Vh``, each to ``tol`` (of the
    largest singular value for the first two). Any decomposition passing this is an SVD of A
    (the singular vectors themselves are unique only up to sign and rotation)."""
    U, S, Vh = (np.asarray(p) for p in parts)
    *batch, m, n = A.shape
    k = min(m, n)
    mu, nv = (m, n) if full_matrices else (k, k)
    assert (U.shape, S.shape, Vh.shape) == ((*batch, m, mu), (*batch, k), (*batch, nv, n))
    ref = numpy_engine.batched_svdvals(A)
    assert U.dtype == Vh.dtype == A.dtype and S.dtype == ref.dtype
    if A.size == 0:
        return
    largest = ref.max(axis=-1, keepdims=True)
    assert (np.abs(S - ref) <= tol * largest).all()
    assert (np.diff(S, axis=-1) <= 0).all()
    A64, U64, Vh64 = A.astype(np.float64), U.astype(np.float64), Vh.astype(np.float64)
    rebuilt = (U64[..., :, :k] * S[..., None, :]) @ Vh64[..., :k, :]
    assert (np.abs(rebuilt - A64) <= 10 * tol * largest[..., None]).all()
    for Q in (np.swapaxes(U64, -1, -2) @ U64, Vh64 @ np.swapaxes(Vh64, -1, -2)):
        assert np.abs(Q - np.eye(Q.shape[-1])).max() <= 10 * tol


@pytest.mark.parametrize("engine", CPU_ENGINES)
@settings(max_examples=60)
@given(case=stacks(), full_matrices=st.booleans())
def test_batched_svd_is_an_svd(engine, case, full_matrices):
    batch, m, n, dtype, layout, seed = case
    rng = np.random.default_rng(seed)
    A = rng.standard_normal(batch + (m, n)).astype(dtype)
    if A.size and rng.random() < 0.3:
        A[..., :, 0] = 0  # rank-deficient: the null-space vectors are any orthonormal completion
    A = _stack_layout(A, layout)
    parts = kernels.batched_svd(A, full_matrices=full_matrices, engine=engine)
    _check_svd(A, parts, full_matrices, 1e-13 if dtype == np.float64 else 1e-5)


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_batched_svd_big_stack_and_errors(engine):
    A = np.random.default_rng(3).standard_normal((40, 30, 20))
    for full_matrices in (False, True):
        _check_svd(A, kernels.batched_svd(A, full_matrices=full_matrices, engine=engine), full_matrices, 1e-13)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        kernels.batched_svd(np.ones(3), engine=engine)
    with pytest.raises(TypeError, match="full_matrices must be a bool"):
        kernels.batched_svd(A, full_matrices="yes", engine=engine)


@pytest.mark.parametrize("engine", CPU_ENGINES)
@settings(max_examples=30)
@given(case=stacks(), k=st.integers(1, 9))
def test_batched_matmul_and_chain(engine, case, k):
    batch, m, n, dtype, layout, seed = case
    rng = np.random.default_rng(seed)
    A = _stack_layout(rng.standard_normal(batch + (m, n)).astype(dtype), layout)
    Bm = rng.standard_normal(batch + (n, k)).astype(dtype)
    tol = TOL[dtype]
    _close(kernels.batched_matmul(A, Bm, engine=engine), np.matmul(A, Bm), np.abs(A) @ np.abs(Bm), tol, "batched_matmul")
    shared = rng.standard_normal((n, k)).astype(dtype)
    _close(kernels.batched_matmul(A, shared, engine=engine), np.matmul(A, shared), np.abs(A) @ np.abs(shared), tol, "shared")
    J1 = rng.standard_normal(batch + (k, m)).astype(dtype)
    chain = kernels.batched_matmul_chain([A, J1], engine=engine)  # J1 @ A
    _close(chain, J1 @ A, np.abs(J1) @ np.abs(A), tol, "chain")


# -------------------------------------------------------------------------------------------
# approximate isometry
# -------------------------------------------------------------------------------------------


def _dense_isometry_oracle(V, mask, lr, squared):
    """Float64 dense formulas, written out independently of the engines."""
    V = V.astype(np.float64)
    m = np.ones_like(V) if mask is None else mask.astype(np.float64)
    U = m * V
    tall = U.shape[0] >= U.shape[1]
    A = (U.T @ U if tall else U @ U.T) - np.eye(min(U.shape))
    r = np.sqrt((A**2).sum())
    c = 4.0 if squared else (2.0 / r if r > 0 else 0.0)
    grad = m * (c * (U @ A if tall else A @ U))
    aU = np.abs(U)
    aA = (aU.T @ aU if tall else aU @ aU.T) + np.eye(min(U.shape))
    bound = m * c * (aU @ aA if tall else aA @ aU)  # bound on |grad| terms
    return V - lr * grad, r, lr * bound, np.sqrt((aA**2).sum())


@pytest.mark.parametrize("engine", CPU_ENGINES)
@settings(max_examples=60)
@given(
    n_out=st.integers(1, 20),
    n_in=st.integers(1, 20),
    dtype=st.sampled_from([np.float64, np.float32]),
    layout=st.sampled_from(LAYOUTS),
    kind=MASK_KINDS,
    squared=st.booleans(),
    method=st.sampled_from(["auto", "dense", "csr"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_isometry_step_matches_oracle(engine, n_out, n_in, dtype, layout, kind, squared, method, seed):
    rng = np.random.default_rng(seed)
    V = _layout((rng.standard_normal((n_out, n_in)) / np.sqrt(max(n_out, n_in))).astype(dtype), layout)
    mask = _mask(rng, V.shape, kind)
    lr = 0.05
    if method == "csr" and kind == "weighted" and mask.size and np.any((mask != 0) & (mask != 1)):
        with pytest.raises(ValueError, match="0/1"):
            kernels.isometry_step(V, mask, lr, squared, engine=engine, method=method)
        return
    tol = TOL[np.dtype(dtype)]
    ref_V, ref_r, step_bound, r_bound = _dense_isometry_oracle(V, mask, lr, squared)
    oracle_V, oracle_r = numpy_engine.isometry_step(V, mask, lr, squared)
    got_V, got_r = kernels.isometry_step(V, mask, lr, squared, engine=engine, method=method)
    assert got_V.shape == V.shape and got_V.dtype == oracle_V.dtype
    assert isinstance(got_r, float)
    assert abs(got_r - ref_r) <= tol * r_bound + 1e-300
    assert abs(oracle_r - ref_r) <= tol * r_bound + 1e-300
    # the step against its rounding bound; without squaring, the error of 1/||A|| scales it too
    amplify = 1.0 if squared or ref_r == 0 else 1.0 + r_bound / ref_r
    bound = tol * step_bound * amplify + 2 * np.finfo(dtype).eps * (np.abs(V) + step_bound)
    for name, out in (("oracle", oracle_V), (engine, got_V)):
        err = np.abs(out.astype(np.float64) - ref_V)
        assert (err <= bound).all(), f"{name}: max error {err.max():.3g}, max error/bound {(err / bound).max():.3g}"
    if mask is not None:  # pruned weights keep their exact values
        keep = mask == 0
        np.testing.assert_array_equal(got_V[keep], V[keep])


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_isometry_step_descends_and_matches_1e12(engine):
    """100 x 120 (wide) and 120 x 100 (tall), 90% sparse: the sparse kernels equal the dense
    oracle to 1e-12 and the residual goes down over a few steps."""
    rng = np.random.default_rng(4)
    for shape in ((100, 120), (120, 100)):
        V = rng.standard_normal(shape) / np.sqrt(10)
        mask = rng.random(shape) >= 0.9
        Vd, Vs = V, V
        rs = []
        for _ in range(5):
            Vd, rd = numpy_engine.isometry_step(Vd, mask, 0.1)
            Vs, r = kernels.isometry_step(Vs, mask, 0.1, engine=engine, method="csr")
            rs.append(r)
            assert abs(r - rd) <= 1e-12 * rd
            assert np.abs(Vs - Vd).max() <= 1e-12 * np.abs(Vd).max()
        assert rs[-1] < rs[0]


# -------------------------------------------------------------------------------------------
# engine selection
# -------------------------------------------------------------------------------------------


def _sparse_case(sparsity=0.95, n=128, batch=64):
    rng = np.random.default_rng(5)
    W = rng.standard_normal((n, n))
    return rng.standard_normal((batch, n)), W, rng.random((n, n)) >= sparsity


def test_engine_names_and_errors(monkeypatch):
    assert kernels.get_engine() == "auto"
    assert "numpy" in kernels.available_engines()
    x, W, mask = _sparse_case()
    with pytest.raises(ValueError, match="engine must be one of"):
        kernels.masked_matmul(x, W, mask, engine="torch")
    with pytest.raises(ValueError, match="name must be one of"):
        kernels.set_engine("jax")
    monkeypatch.setenv(kernels.ENV_VAR, "fortran")
    with pytest.raises(ValueError, match="REFNET_ENGINE"):
        kernels.masked_matmul(x, W, mask)
    with pytest.raises(ValueError, match="method must be one of"):
        kernels.masked_matmul(x, W, mask, engine="numpy", method="coo")
    with pytest.raises(ValueError, match=r"x must have shape \(B, n_in\)"):
        kernels.masked_matmul(x[:, :3], W, mask, engine="numpy")
    with pytest.raises(ValueError, match="mask must have W's shape"):
        kernels.masked_matmul(x, W, mask[:3], engine="numpy")


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
def test_selection_order_argument_setting_env_auto(monkeypatch):
    x, W, mask = _sparse_case(sparsity=0.95)
    dense_mask = np.ones_like(mask)
    r = kernels.resolve_engine
    # automatic: Numba for a large enough masked product (CSR or blocked dense inside), NumPy
    # without a mask, for a small weight or for too little work
    assert r("masked_matmul", x, W, mask) == "numba"
    assert r("masked_matmul", x, W, dense_mask) == "numba"
    assert r("masked_matmul", x[:, :8], W[:8, :8], mask[:8, :8]) == "numpy"
    assert r("masked_matmul", x[:2], W, mask) == "numpy"  # too little work
    assert r("masked_matmul_t", x, W, mask) == "numba"
    assert r("masked_matmul", x, W, None) == "numpy"
    # environment variable beats auto
    monkeypatch.setenv(kernels.ENV_VAR, "numpy")
    assert r("masked_matmul", x, W, mask) == "numpy"
    assert kernels.get_engine() == "numpy"
    # set_engine beats the environment variable
    kernels.set_engine("numba")
    assert r("masked_matmul", x, W, dense_mask) == "numba"
    assert kernels.get_engine() == "numba"
    # the argument beats set_engine
    assert r("masked_matmul", x, W, mask, engine="numpy") == "numpy"
    # use_engine nests and restores, also after an exception
    with kernels.use_engine("numpy"):
        assert r("masked_matmul", x, W, mask) == "numpy"
        with pytest.raises(RuntimeError):
            with kernels.use_engine("numba"):
                raise RuntimeError
        assert kernels.get_engine() == "numpy"
    assert kernels.get_engine() == "numba"
    kernels.set_engine("auto")
    assert kernels.get_engine() == "numpy"  # the environment variable again
    monkeypatch.delenv(kernels.ENV_VAR)
    assert kernels.get_engine() == "auto"


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
def test_selection_actually_dispatches(monkeypatch):
    """The resolved engine is the one that runs (spy on the engine modules)."""
    from refnet.kernels import numba_engine

    calls = []
    for mod, name in ((numpy_engine, "numpy"), (numba_engine, "numba")):
        real = mod.masked_matmul
        monkeypatch.setattr(mod, "masked_matmul", lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    x, W, mask = _sparse_case()
    monkeypatch.setenv(kernels.ENV_VAR, "numba")
    kernels.masked_matmul(x, W, mask)
    kernels.set_engine("numpy")
    kernels.masked_matmul(x, W, mask)
    kernels.masked_matmul(x, W, mask, engine="numba")
    assert calls == ["numba", "numpy", "numba"]


def test_auto_choices_for_other_kernels(monkeypatch):
    x, W, mask = _sparse_case(sparsity=0.95)
    A = np.zeros((10, 20, 20))
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    assert kernels.resolve_engine("batched_svdvals", A) == "numpy"  # one thread: nothing to gain
    assert kernels.resolve_engine("batched_svdvals", np.zeros((1, 20, 20))) == "numpy"
    wide = np.zeros((10, 10, 784))  # one thread still gains: a batched QR first
    assert kernels.resolve_engine("batched_svdvals", wide) == ("numba" if HAVE_NUMBA else "numpy")
    assert kernels.resolve_engine("batched_svd", wide) == "numpy"
    assert kernels.resolve_engine("batched_matmul", A, A) == "numpy"  # one thread
    expect = "numba" if HAVE_NUMBA else "numpy"
    assert kernels.resolve_engine("isometry_step", W, mask) == expect
    assert kernels.resolve_engine("isometry_step", W, np.ones_like(mask)) == "numpy"
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    if _threads.usable_cores() >= 2:
        assert kernels.resolve_engine("batched_svdvals", A) == expect
        big = np.zeros((100, 100, 100))
        assert kernels.resolve_engine("batched_matmul", big, big) == expect
        assert kernels.resolve_engine("batched_matmul", A[:, :4, :4], A[:, :4, :4]) == "numpy"  # too small


def test_missing_cupy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError, even where installed
    monkeypatch.delitem(sys.modules, "refnet.kernels.cupy_engine", raising=False)
    monkeypatch.setattr(kernels, "_loaded", {"numpy": kernels.numpy_engine})  # as in a fresh process
    x, W, mask = _sparse_case()
    with pytest.raises(ImportError, match=r"pip install refnet\[gpu\]"):
        kernels.set_engine("cupy")
    assert kernels.get_engine() == "auto"  # a failed set_engine changes nothing
    with pytest.raises(ImportError, match=r"pip install refnet\[gpu\]"):
        kernels.masked_matmul(x, W, mask, engine="cupy")
    monkeypatch.setenv(kernels.ENV_VAR, "cupy")
    with pytest.raises(ImportError, match=r"pip install refnet\[gpu\]"):
        kernels.batched_svdvals(np.ones((2, 3, 3)))


def test_missing_numba_names_it_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.delitem(sys.modules, "refnet.kernels.numba_engine", raising=False)
    monkeypatch.setattr(kernels, "_loaded", {"numpy": kernels.numpy_engine})  # as in a fresh process
    monkeypatch.setattr(kernels, "_numba_found", False)
    x, W, mask = _sparse_case()
    with pytest.raises(ImportError, match="pip install numba"):
        kernels.masked_matmul(x, W, mask, engine="numba")
    assert kernels.resolve_engine("masked_matmul", x, W, mask) == "numpy"
    np.testing.assert_allclose(kernels.masked_matmul(x, W, mask), x @ (W * mask).T, rtol=1e-12)


class _FakeCupyArray:
    """Looks like a CuPy array to the dispatcher (type module 'cupy...'), without CuPy."""

    __module__ = "cupy._core.core"
    shape = (3, 3)
    ndim = 2


def test_cupy_data_pick_the_cupy_engine_without_importing_it():
    fake = _FakeCupyArray()
    assert kernels.resolve_engine("batched_svdvals", fake) == "cupy"
    with pytest.raises(TypeError, match="CuPy arrays"):
        kernels.resolve_engine("batched_svdvals", fake, engine="numpy")
    kernels.set_engine("numpy")
    with pytest.raises(TypeError, match="CuPy arrays"):
        kernels.resolve_engine("batched_svdvals", fake)


def test_import_is_lazy():
    """Importing refnet (and running NumPy-engine kernels) imports neither Numba nor CuPy."""
    code = (
        "import sys, numpy as np, refnet; from refnet import kernels;"
        "kernels.masked_matmul(np.ones((2, 3)), np.ones((4, 3)), np.ones((4, 3), bool));"
        "kernels.batched_svdvals(np.ones((3, 3)));"
        "print('numba' in sys.modules, 'cupy' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != kernels.ENV_VAR}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "False"]


# -------------------------------------------------------------------------------------------
# CuPy (GPU only)
# -------------------------------------------------------------------------------------------


def _gpu():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no GPU")
    except Exception as exc:  # CUDA driver missing or broken
        pytest.skip(f"no usable GPU: {exc}")
    return cp


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", ["dense", "csr"])
def test_cupy_engine_matches_oracle(dtype, method):
    _check_cupy_engine(_gpu(), dtype, method)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", ["dense", "csr"])
def test_cupy_engine_logic_on_a_numpy_stand_in(monkeypatch, dtype, method):
    """The same checks with CuPy replaced by a NumPy stand-in (tests/fake_cupy.py): the engine's
    own code runs everywhere; CuPy's and the GPU's part only in the test above."""
    _check_cupy_engine(fake_cupy.install(monkeypatch), dtype, method)


def test_every_engine_provides_every_kernel(monkeypatch):
    """The dispatcher calls ``getattr(engine, kernel)``: each engine module (CuPy's through the
    stand-in) must define every kernel of ``ENGINE_KERNELS``, and the package exports them."""
    fake_cupy.install(monkeypatch)
    for name in kernels.ENGINES:
        if name == "numba" and not HAVE_NUMBA:
            continue
        module = kernels._load(name)
        missing = [k for k in numpy_engine.ENGINE_KERNELS if not callable(getattr(module, k, None))]
        assert not missing, (name, missing)
        assert set(numpy_engine.ENGINE_KERNELS) <= set(module.__all__)
    assert all(callable(getattr(kernels, k)) for k in numpy_engine.ENGINE_KERNELS)
    assert set(numpy_engine.ENGINE_KERNELS) <= set(kernels.__all__)


def test_cupy_svd_of_a_stack_falls_back_to_one_call_per_matrix(monkeypatch):
    """On a CuPy whose ``linalg.svd`` takes no stacks, the engine decomposes matrix by matrix."""
    cp = fake_cupy.install(monkeypatch)
    real, calls = cp.linalg.svd, []

    def no_stacks(a, **kw):
        calls.append(a.ndim)
        if a.ndim > 2:
            raise NotImplementedError("stacked SVD")
        return real(a, **kw)

    monkeypatch.setattr(cp.linalg, "svd", no_stacks)
    A = np.random.default_rng(4).standard_normal((2, 3, 7, 5))
    got = kernels.batched_svdvals(cp.asarray(A))
    np.testing.assert_allclose(cp.asnumpy(got), np.linalg.svd(A, compute_uv=False), rtol=0, atol=1e-12)
    for full_matrices in (False, True):
        _check_svd(A, [cp.asnumpy(p) for p in kernels.batched_svd(cp.asarray(A), full_matrices=full_matrices)], full_matrices, 1e-13)
    assert calls == 3 * ([4] + [2] * 6)  # each: the refused stack, then its six matrices


def test_the_cupy_stand_in_refuses_host_arrays(monkeypatch):
    """The stand-in is as strict as CuPy about mixing host and device arrays (else the test
    above could not catch an operand the engine forgot to move)."""
    cp = fake_cupy.install(monkeypatch)
    d, h = cp.asarray(np.ones((2, 2))), np.ones((2, 2))
    for op in (lambda: d * h, lambda: h @ d, lambda: d - h):
        with pytest.raises(TypeError, match="NumPy array"):
            op()
    assert isinstance(d * 2.0, cp.ndarray) and isinstance(d[0, 0], cp.ndarray) and d[0, 0].get() == 1.0
    assert kernels.resolve_engine("masked_matmul", d, d, d) == "cupy"
    assert isinstance(kernels.masked_matmul(d, d, d), cp.ndarray)  # device in, device out
    assert type(kernels.masked_matmul(h, h, h, engine="cupy")) is np.ndarray  # host in, host out


@pytest.mark.parametrize("sparse", [False, True])
def test_approximate_isometry_runs_on_the_cupy_engine_stand_in(monkeypatch, sparse):
    """The library's own path through the cupy engine (NumPy weights in, NumPy weights out):
    8 steps equal the NumPy engine's to 1e-13 on tall, square and wide layers, 85% pruned."""
    import refnet as rn
    from refnet.isometry import approximate_isometry

    fake_cupy.install(monkeypatch)
    rng = np.random.default_rng(11)
    net = rn.mlp([20, 30, 30, 12], activation="tanh", init="orthogonal", seed=4)
    net = net.with_masks([{"W": rng.random(p["W"].shape) < 0.15} for p in net.params])
    got, rep = approximate_isometry(net, steps=8, tol=0, engine="cupy", sparse=sparse, return_report=True)
    want, rep_np = approximate_isometry(net, steps=8, tol=0, engine="numpy", sparse=sparse, return_report=True)
    for p, q in zip(got.params, want.params):
        assert type(p["W"]) is np.ndarray
        np.testing.assert_allclose(p["W"], q["W"], rtol=0, atol=1e-13)
    np.testing.assert_allclose([r["residual_after"] for r in rep["layers"]], [r["residual_after"] for r in rep_np["layers"]], rtol=1e-12)


def _check_cupy_engine(cp, dtype, method):
    """Every cupy-engine kernel against the oracle, on host and on device inputs."""
    rng = np.random.default_rng(6)
    tol = TOL[np.dtype(dtype)]
    for B, n_out, n_in, sparsity in ((0, 5, 4, 0.5), (1, 1, 1, 0.0), (7, 30, 50, 0.9), (9, 64, 33, 1.0)):
        W = rng.standard_normal((n_out, n_in)).astype(dtype)
        mask = rng.random(W.shape) >= sparsity
        x = rng.standard_normal((B, n_in)).astype(dtype)
        g = rng.standard_normal((B, n_out)).astype(dtype)
        aWe = np.abs(W * mask).astype(np.float64)
        for on_device in (False, True):
            conv = cp.asarray if on_device else (lambda a: a)
            got = kernels.masked_matmul(conv(x), conv(W), conv(mask), engine="cupy", method=method)
            got = cp.asnumpy(got) if on_device else got
            _close(got, numpy_engine.masked_matmul(x, W, mask), np.abs(x) @ aWe.T, tol, "cupy fwd")
            got = kernels.masked_matmul_t(conv(g), conv(W), conv(mask), engine="cupy", method=method)
            got = cp.asnumpy(got) if on_device else got
            _close(got, numpy_engine.masked_matmul_t(g, W, mask), np.abs(g) @ aWe, tol, "cupy bwd")
        V = (rng.standard_normal((n_out, n_in)) / np.sqrt(max(n_out, n_in))).astype(dtype)
        Vr, rr = numpy_engine.isometry_step(V, mask, 0.1)
        Vg, rg = kernels.isometry_step(cp.asarray(V), cp.asarray(mask), 0.1, method=method)  # auto -> cupy
        assert abs(rg - rr) <= 10 * tol * (1 + rr)
        np.testing.assert_allclose(cp.asnumpy(Vg), Vr, rtol=10 * tol, atol=10 * tol)
    A = rng.standard_normal((5, 12, 9)).astype(dtype)
    ref = np.linalg.svd(A, compute_uv=False)
    got = cp.asnumpy(kernels.batched_svdvals(cp.asarray(A)))
    assert np.abs(got - ref).max() <= (1e-13 if dtype == np.float64 else 1e-5) * 10 * ref.max()
    for full_matrices in (False, True):
        for stack in (A, A[0], A[:0]):  # a stack, one matrix, an empty stack
            dev = kernels.batched_svd(cp.asarray(stack), full_matrices=full_matrices)
            assert all(isinstance(p, cp.ndarray) for p in dev)
            _check_svd(stack, [cp.asnumpy(p) for p in dev], full_matrices, 10 * tol)
            host = kernels.batched_svd(stack, full_matrices=full_matrices, engine="cupy")
            assert all(type(p) is np.ndarray for p in host)
            _check_svd(stack, host, full_matrices, 10 * tol)
    np.testing.assert_allclose(kernels.batched_matmul(A, A.swapaxes(1, 2), engine="cupy"), A @ A.swapaxes(1, 2), rtol=10 * tol, atol=10 * tol)
    X, Y, Z = rng.standard_normal((3, 5, 6, 6)).astype(dtype)  # square, so a wrong order still fits
    np.testing.assert_allclose(kernels.batched_matmul_chain([X, Y, Z], engine="cupy"), Z @ Y @ X, rtol=10 * tol, atol=100 * tol)
    s = (np.abs(rng.standard_normal(5000)) * rng.random(5000) ** 4).astype(dtype)
    for k in (1, 500, 5000):
        assert kernels.kth_largest(s, k, engine="cupy") == np.partition(s, s.size - k)[s.size - k]
        assert float(kernels.kth_largest(cp.asarray(s), k)) == np.partition(s, s.size - k)[s.size - k]


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("shape", [(30, 10, 784), (12, 90, 9), (5, 8, 16), (2, 3, 7, 3), (4, 9, 8), (6, 1, 12), (3, 12, 1)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.complex128, np.int64])
def test_numba_svdvals_one_thread_reduces_lopsided_stacks_exactly_enough(shape, dtype, monkeypatch):
    # the one-thread path (no pool) of the Numba engine: a wide or tall stack goes through a
    # batched QR first; the values equal the oracle's to 1e-13 of the largest (float64), with
    # the oracle's dtype, for real, complex and integer stacks (planted bug seen failing:
    # decomposing the leading k x k block instead of the QR factor)
    from refnet.kernels import numba_engine

    monkeypatch.setattr(numba_engine, "_workers", lambda: 1)
    rng = np.random.default_rng(7)
    A = rng.standard_normal(shape)
    if dtype == np.complex128:
        A = A + 1j * rng.standard_normal(shape)
    A = (10 * A).astype(dtype) if dtype == np.int64 else A.astype(dtype)
    ref = numpy_engine.batched_svdvals(A)
    got = numba_engine.batched_svdvals(A)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    tol = 1e-5 if dtype == np.float32 else 1e-13
    assert (np.abs(got - ref) <= tol * ref.max(axis=-1, keepdims=True)).all()

