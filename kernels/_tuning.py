"""Measured crossovers that decide dense vs sparse paths (and Numba vs NumPy in auto mode).

Measured on the development machine (2-core AMD EPYC Zen 4 VM with AVX-512, NumPy 2.4 with
scipy-openblas 0.3.31, which picks its SkylakeX kernels here; numba 0.68). Numbers and the
sweep that produced them: ``python -m benchmarks.kernels --crossover`` (the table below).
Dense is used *below* a crossover sparsity, the sparse (CSR) kernel at or above it.
"""

# One thread (OMP/OPENBLAS/NUMBA_NUM_THREADS=1), square W, median ms of
# ``python -m benchmarks.kernels --crossover``, CSR / dense (the dense path includes forming
# mask * W, as the engine must: W changes every step). The machine was shared with other jobs
# (load average ~4 on 2 cores), so single numbers are noisy to ~+-30%; the choice below holds
# for the clear majority of cases at each sparsity.
#
# forward x @ (mask*W).T        s=0.70         s=0.75         s=0.80         s=0.85        s=0.90
#   f64 N=1024 B=64          9.2 / 7.3      6.2 / 6.2      5.5 / 6.1      2.8 / 5.5     3.1 / 5.7
#   f64 N=1024 B=256        25.2 / 18.5    22.5 / 19.3    29.1 / 19.2    12.9 / 20.3   10.1 / 17.0
#   f64 N=4096 B=64         88.1 / 121.8   71.9 / 118.7   63.9 / 122.3   46.5 / 118.6  46.7 / 118.1
#   f64 N=4096 B=256       304.0 / 291.8  280.2 / 288.3  303.5 / 296.9  222.2 / 291.5 152.8 / 295.9
#   f32 N=1024 B=64          3.2 / 3.3      1.5 / 3.5      2.6 / 3.2      1.7 / 2.4     1.2 / 3.2
#   f32 N=1024 B=256        11.8 / 10.3    11.4 / 10.4     8.4 / 10.3     6.6 / 10.5    2.8 / 10.2
#   f32 N=4096 B=64         89.5 / 60.9    74.9 / 71.2    60.0 / 70.6    46.0 / 70.2   32.1 / 70.4
#   f32 N=4096 B=256       216.4 / 151.6  184.9 / 154.1  149.4 / 161.7  113.9 / 160.2  77.9 / 159.1
# backward g @ (mask*W)
#   f64 N=1024 B=64         10.4 / 5.1      9.4 / 6.0      8.1 / 5.6      3.4 / 5.8     3.8 / 5.8
#   f64 N=1024 B=256        27.1 / 17.6    15.1 / 16.5    15.6 / 17.6    12.6 / 18.1    9.9 / 17.9
#   f64 N=4096 B=64        141.4 / 113.3  116.8 / 114.8   94.9 / 111.1   72.3 / 112.7  51.6 / 110.7
#   f64 N=4096 B=256       464.8 / 289.6  380.7 / 293.4  230.2 / 279.5  268.3 / 289.6 172.9 / 284.1
#   f32 N=1024 B=64          4.1 / 3.0      3.2 / 3.1      4.5 / 2.6      1.6 / 3.0     1.5 / 2.8
#   f32 N=1024 B=256        12.6 / 10.0    13.0 / 10.1     9.7 / 10.1     9.5 / 10.1    4.7 / 10.2
#   f32 N=4096 B=64        123.3 / 71.9   102.5 / 70.7    82.9 / 63.9    63.0 / 62.1   45.4 / 67.1
#   f32 N=4096 B=256       249.8 / 153.5  212.2 / 152.2  174.3 / 154.0  132.4 / 152.5  95.3 / 152.4
# At 50% sparsity CSR costs 1.6x-2.7x the dense path in every case.

#: masked_matmul (forward, ``x @ (mask*W).T``): sparsity at and above which the Numba CSR
#: kernel beats BLAS on ``mask * W`` (wins in 7 of 8 cases at 0.80, all 8 at 0.85).
MATMUL_CROSSOVER = 0.80

#: masked_matmul_t (backward, ``g @ (mask*W)``): the column-wise kernel also gathers and
#: permutes the values, so it needs sparser masks (8 of 8 cases at 0.85, ties at f32 N=4096 B=64).
MATMUL_T_CROSSOVER = 0.85

#: isometry_step, one step, float64, one thread, sparse / dense ms:
#:   N=512:  s=0.70 19.7/23.3   0.75 13.5/23.5   0.80 10.5/25.3   0.85 8.3/25.8    0.90 2.4/22.2
#:   N=1024: s=0.70 145.8/119.7 0.75 105.7/118.0 0.80 75.0/119.6  0.85 49.5/121.1  0.90 28.7/116.9
ISOMETRY_CROSSOVER = 0.80

#: isometry_step chosen automatically on Numba runs one thread below this many entries of V:
#: N=1024 90% sparse takes 17 ms per step on one thread and 9 ms on two free cores, while the
#: 100 x 100 layers of the papers' MLPs take ~0.1 ms, too little to pay for a parallel region
#: that waits on a busy second core
MIN_THREADED_ISOMETRY = 512 * 512

#: below this many weight entries the dense path is used whatever the sparsity (call overheads)
MIN_SPARSE_SIZE = 64 * 64

#: masked products also need B * n_out * n_in at least this large for the CSR path: one thread,
#: 90% sparse, CSR / dense microseconds: 100x100 B=10: 13 / 11; 64x64 B=100: 20 / 24 (forward)
#: and 22 / 19 (backward); 100x100 B=100: 26 / 53; 100x784 B=10: 47 / 72; 300x300 B=10: 53 / 109.
MIN_SPARSE_WORK = 500_000

#: in the CSR forward kernel, read W inside the kernel above this density; below it gather the
#: values first (random reads of W inside the kernel stall it when they are far apart). One
#: thread, fused / gather+product ms, float64, N=4096 B=256: density 0.2 101 / 110, 0.1 59 / 59,
#: 0.05 43 / 33, 0.03 29 / 20, 0.01 11.2 / 7.0 (N=1024: equal within 10% at every density)
GATHER_DENSITY = 0.07

#: the dense masked products form ``mask * W`` in blocks of at most this many rows of W and
#: bytes. Forward, one thread, 50% sparse, float64, ms, blocks of 128 / 256 / 512 / 1024 rows:
#: N=1024 B=64 3.65 / 3.41 / 3.32 / 3.51, N=1024 B=256 12.1 / 12.0 / 11.2 / 11.7, N=4096 B=256
#: 192 / 185 / 183 / 184 (NumPy's ``x @ (W * mask).T``: 4.0, 11.7, 194; BLAS alone on a
#: precomputed ``mask * W``: 3.2, 10.7, 169). Smaller blocks repack x more often, larger ones
#: fall out of cache. Transposed (blocks summed), 256 / 512 rows: N=1024 B=64 3.10 / 3.40,
#: N=1024 B=256 10.9 / 11.2, N=4096 B=256 187 / 185 (BLAS alone: 2.7, 10.3, 165).
DENSE_BLOCK_ROWS = 512
DENSE_BLOCK_ROWS_T = 256
DENSE_BLOCK_BYTES = 16 << 20

#: batched_matmul: split a stack over the thread pool from this many multiply-adds on
#: (100 x 100 @ 100 x 100 stacks of 100, two free cores: 2.8 ms pooled vs 5.0 ms np.matmul,
#: whose OpenBLAS threads gain nothing on 100 x 100 products)
MIN_THREADED_WORK = 4_000_000

#: batched_svdvals: use the thread pool when the stack has at least this many matrices and
#: each is at least this large (min side); smaller problems are dominated by thread overheads
SVD_MIN_STACK = 2
SVD_MIN_SIDE = 8

#: kth_largest: the Numba radix select from this many entries (one thread, radix / np.partition:
#: 129,400 SNIP scores 0.2 / 1.0 ms; below ~20,000 entries both take tens of microseconds)
MIN_SELECT_SIZE = 32_768
