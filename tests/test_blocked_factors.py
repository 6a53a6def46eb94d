"""The wide Gram's factorisations in blocks (:mod:`chita_onnx.solver.blocked`): LAPACK's results up to
rounding, the same values bit for bit whether a step's pieces ran on two threads, in turn on one, or
outside the helper, LAPACK's ``info`` for a matrix that is not positive definite, and the layer solver
on top of them (``MIN_D`` lowered to reach them on small layers) equal to the one-call route up to
rounding."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla

from chita_onnx.blas import limit_blas_threads
from chita_onnx.solver import blocked, parallel
from chita_onnx.solver import layerwise as lw


def _spd(d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((d + 20, d))
    H = X.T @ X
    H[np.diag_indices(d)] += 1.0
    return H


def _all(A: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    L, info = blocked.cholesky(np.array(A, order="F"), nb)
    assert info == 0
    Li = blocked.tri_inverse(L, nb)
    return L, Li, blocked.lower_gram(Li, nb)


@pytest.mark.parametrize(("d", "nb"), [(301, 64), (512, 128), (700, 700), (5, 2)])
def test_blocked_factors_equal_lapack_up_to_rounding(d: int, nb: int) -> None:
    """Cholesky, triangular inverse and ``L⁻ᵀL⁻¹`` against ``dpotrf``/``dtrtri``/``dlauum``, on sizes
    that are and are not multiples of the block; the strict upper triangles are zero."""
    A = _spd(d, d)
    L, Li, C = _all(A, nb)
    Lr, _ = sla.lapack.dpotrf(A, lower=1, clean=1)
    Ir, _ = sla.lapack.dtrtri(Lr, lower=1)
    Cr, _ = sla.lapack.dlauum(Ir, lower=1)
    for got, want in ((L, Lr), (Li, Ir), (C, np.tril(Cr))):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-11 * float(np.abs(want).max()))
        assert not np.any(np.triu(got, 1))
    np.testing.assert_allclose(L @ L.T, A, rtol=0, atol=1e-11 * float(np.abs(A).max()))
    np.testing.assert_allclose(Li @ L, np.eye(d), rtol=0, atol=1e-10)


def test_a_fortran_input_is_factored_in_place_and_a_c_input_is_left_alone() -> None:
    A = _spd(200, 3)
    F = np.array(A, order="F")
    L, _ = blocked.cholesky(F, 64)
    assert L is F
    C = np.array(A, order="C")
    L2, _ = blocked.cholesky(C, 64)
    assert L2 is not C
    np.testing.assert_array_equal(C, A)
    np.testing.assert_array_equal(L, L2)


@pytest.mark.parametrize("bad", [0, 150, 299])
def test_not_positive_definite_gives_lapacks_info(bad: int) -> None:
    """The order of the first leading minor that is not positive definite, as ``dpotrf`` reports it,
    also when it falls inside a later block."""
    A = _spd(300, 7)
    A[bad, bad] = -1.0
    _, want = sla.lapack.dpotrf(A, lower=1)
    _, got = blocked.cholesky(np.array(A, order="F"), 64)
    assert want == bad + 1
    assert got == want


def test_the_pieces_give_the_same_values_on_two_threads_in_turn_and_alone() -> None:
    """A step's pieces are fixed by the shape: run on both threads, in turn while the second core is
    taken, or with no helper at all, the values are the same bit for bit; and the steps did run on
    both threads (``parallel.shared`` counted them)."""
    A = _spd(1500, 11)
    alone = _all(A, 128)
    before = parallel.shared()
    with limit_blas_threads(1), parallel.helping():
        two = _all(A, 128)
    assert parallel.shared() > before + 10
    with limit_blas_threads(1), parallel.helping(idle=lambda: False):
        busy = _all(A, 128)
    for a, b, c in zip(alone, two, busy, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_the_symmetrized_gram_is_the_same_with_its_rows_on_two_threads() -> None:
    """``(H + Hᵀ)/2`` block row by block row: on two threads the same bit for bit as on one, and
    exactly symmetric."""
    rng = np.random.default_rng(5)
    H = rng.standard_normal((3072, 3072))
    one = lw._symmetrized(H)
    before = parallel.shared()
    with limit_blas_threads(1), parallel.helping():
        two = lw._symmetrized(H)
    assert parallel.shared() == before + 1
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(two, two.T)
    np.testing.assert_array_equal(two, 0.5 * (H + H.T))


def test_the_layer_solver_on_blocked_factors_matches_the_one_call_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """With :data:`blocked.MIN_D` lowered below the layer's width, ``damp_gram``'s factor, ``U`` and
    ``H_λ⁻¹`` and a whole ``prune_layer`` (selection and exact re-fit) equal the LAPACK route up to
    rounding; the kept weights are the same."""
    d, M = 300, 24
    rng = np.random.default_rng(2)
    X = rng.standard_normal((900, d))
    H = X.T @ X
    W = rng.standard_normal((M, d))
    ref = lw.damp_gram(H, 0.01)
    ref_sol = lw.prune_layer(W[None], H[None], None, None, keep=M * d // 2, refit=True, name="t")
    monkeypatch.setattr(blocked, "MIN_D", 64)
    monkeypatch.setattr(blocked, "NB", 64)  # five blocks
    with limit_blas_threads(1), parallel.helping():
        got = lw.damp_gram(H, 0.01)
        sol = lw.prune_layer(W[None], H[None], None, None, keep=M * d // 2, refit=True, name="t")
    scale = float(np.abs(ref.factor).max())
    np.testing.assert_allclose(got.factor, ref.factor, rtol=0, atol=1e-12 * scale)
    for a, b in ((got.inverse_factor(), ref.inverse_factor()), (got.inverse(), ref.inverse())):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * float(np.abs(b).max()))
    np.testing.assert_array_equal(sol.mask, ref_sol.mask)
    np.testing.assert_allclose(sol.W, ref_sol.W, rtol=0, atol=1e-9 * float(np.abs(ref_sol.W).max()))


def test_without_the_ctypes_entry_points_scipys_wrappers_give_the_same_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    """When SciPy's Cython entry points cannot be had, the same pieces go through SciPy's wrappers (in
    turn, the GIL held) and give the same factors up to rounding."""
    A = _spd(301, 9)
    want = _all(A, 64)
    monkeypatch.setattr(blocked, "_kernels", lambda: None)
    got = _all(A, 64)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-11 * float(np.abs(b).max()))
        assert not np.any(np.triu(a, 1))
