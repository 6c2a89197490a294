"""Side-by-side benchmarks: refnet against NumPy/SciPy/PyTorch/JAX in one run, reported as ratios.

Run ``python -m benchmarks`` (all) or ``python -m benchmarks engine``. Quote one-thread figures:
``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1``.
"""
