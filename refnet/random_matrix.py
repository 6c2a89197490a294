r"""Random-matrix results for deep random networks: the spectrum of a product of Gaussian matrices
and the first moment of a deep Jacobian's spectrum.

Pure functions, float64 throughout. The mean-field maps (``q*``, ``chi_1``, ...) that give the
per-layer factor are in :mod:`refnet.theory`, which re-exports these functions.

References
----------
.. [PSG17] J. Pennington, S. S. Schoenholz, S. Ganguli, "Resurrecting the sigmoid in deep
   learning through dynamical isometry: theory and practice", Advances in Neural
   Information Processing Systems 30 (NIPS 2017); arXiv:1711.04735.
.. [PZ11] K. A. Penson, K. Zyczkowski, "Product of Ginibre matrices: Fuss-Catalan and Raney
   distributions", Phys. Rev. E 83, 061118 (2011), arXiv:1103.3453.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from ._checks import check_float, check_int

__all__ = [
    "fuss_catalan_moments",
    "fuss_catalan_mellin",
    "mean_singular_value_gaussian_product",
    "expected_msv",
]


def fuss_catalan_moments(K, n_moments):
    r"""Moments of the squared singular values of a product of ``K`` Gaussian matrices.

    For ``M = W_K ... W_1`` with ``W_i`` independent ``N x N`` matrices of iid ``N(0, 1/N)``
    entries, as ``N -> inf``,

    .. math:: m_k = \lim_{N\to\infty} E\,\tfrac1N \operatorname{tr} (M M^T)^k
              = \mathrm{FC}_K(k) = \frac{1}{K k + 1}\binom{(K+1)k}{k},

    the Fuss-Catalan numbers ``FC_s(k)`` of [PZ11] (their order ``s``, the number of Ginibre
    factors, is our ``K``).
    ``K = 1`` gives the Catalan numbers 1, 2, 5, 14, 42 (Marchenko-Pastur), ``K = 0`` the
    identity (all moments 1).

    Parameters
    ----------
    K : int
        Number of factors, ``>= 0``.
    n_moments : int
        Number of moments, ``>= 1``.

    Returns
    -------
    ndarray, shape (n_moments,)
        ``[m_1, ..., m_{n_moments}]`` as float64 (each computed exactly in integers, then
        rounded once; exact while below 2**53).
    """
    K = check_int(K, "K", min_value=0)
    n_moments = check_int(n_moments, "n_moments", min_value=1)
    vals = [math.comb((K + 1) * k, k) // (K * k + 1) for k in range(1, n_moments + 1)]
    return np.array([float(v) for v in vals], dtype=np.float64)


def fuss_catalan_mellin(K, s):
    r"""Real moments ``E[x^s]`` of the Fuss-Catalan distribution of order ``K``.

    .. math:: E[x^s] = \int x^s P_K(x)\, dx
              = \frac{\Gamma((K+1)s + 1)}{\Gamma(s + 1)\,\Gamma(K s + 2)}

    the Mellin transform of the Fuss-Catalan density ``P_K`` ([PZ11], which works through
    the Mellin transform and the Meijer G-function to write ``P_K`` as a combination of
    ``K`` hypergeometric functions ``{}_K F_{K-1}``). At integer ``s = k`` it is
    ``FC_K(k)``; at ``s = 1/2`` the mean singular value of the product of ``K`` Gaussian
    matrices. The density behaves like ``x^{-K/(K+1)}`` near 0, so ``s > -1/(K+1)`` is required.

    Parameters
    ----------
    K : int
        Order, ``>= 0``.
    s : float
        Real exponent, ``> -1/(K+1)``.

    Returns
    -------
    float
    """
    K = check_int(K, "K", min_value=0)
    s = check_float(s, "s", min_value=-1.0 / (K + 1), min_inclusive=False)
    log_m = (
        special.gammaln((K + 1) * s + 1.0)
        - special.gammaln(s + 1.0)
        - special.gammaln(K * s + 2.0)
    )
    return float(np.exp(log_m))


def mean_singular_value_gaussian_product(K):
    r"""Mean singular value of a product of ``K`` Gaussian ``N(0, 1/N)`` matrices, ``N -> inf``.

    .. math:: E[\sigma] = E_{x \sim P_K}[x^{1/2}]
              = \frac{\Gamma((K+1)/2 + 1)}{\Gamma(3/2)\,\Gamma(K/2 + 2)}

    (the Mellin transform of [PZ11] at ``s = 1/2``, see :func:`fuss_catalan_mellin`).
    ``K = 1`` gives the quarter-circle law's ``8 / (3 pi)``.

    Parameters
    ----------
    K : int
        Number of factors, ``>= 0``.

    Returns
    -------
    float
    """
    K = check_int(K, "K", min_value=0)
    return fuss_catalan_mellin(K, 0.5)


def expected_msv(chi, L):
    r"""Expected mean squared singular value of a depth-``L`` input-output Jacobian.

    .. math:: E\,\tfrac1N \operatorname{tr}(J J^T) = \chi_1^L,\qquad
              J = \prod_{l=1}^{L} D^l W^l

    (``J`` as in [PSG17] eq. (2), with ``chi`` of its eq. (5) the per-layer factor: the first
    moment of the spectrum of ``J J^T`` at ``q*`` is ``chi^L``, and criticality,
    ``chi = 1``, keeps it at 1 at every depth.) Pass ``chi = refnet.theory.chi_1(...)``.

    Parameters
    ----------
    chi : float
        Per-layer mean squared singular value, ``>= 0``.
    L : int
        Depth, ``>= 0``.

    Returns
    -------
    float
    """
    chi = check_float(chi, "chi", min_value=0.0)
    L = check_int(L, "L", min_value=0)
    return chi**L
