"""Tests for mtl_jax.linalg: the stable bordered block-diagonal solve and the PSD helpers.

Everything is called through ``jax.jit`` (one compilation per shape instead of op-by-op
dispatch, which keeps the file fast and checks jittability); problems that share shapes
share compilations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import linalg
from mtl_jax.linalg import (
    BorderedSolution,
    bordered_solve,
    diag_embed,
    kron_bordered_solve,
    kron_rows,
    row_covariance,
    segment_sum,
)

solve = jax.jit(bordered_solve, static_argnames=("num_tasks", "refinement_steps"))
kron_solve = jax.jit(kron_bordered_solve, static_argnames=("num_tasks", "random_intercepts", "refinement_steps"))
cholesky = jax.jit(linalg.cholesky)
solve_triangular = jax.jit(linalg.solve_triangular, static_argnames=("transpose",))
row_cov_fn = jax.jit(row_covariance)
psd_cholesky = jax.jit(linalg.psd_cholesky)
psd_inverse = jax.jit(linalg.psd_inverse)
psd_logdet = jax.jit(linalg.psd_logdet)
psd_solve = jax.jit(linalg.psd_solve)
is_positive_definite = jax.jit(linalg.is_positive_definite)

K_TASKS, M_FIXED = 4, 3
TASK_SIZES = np.array([1, 5, 10, 14])  # unequal, one task with a single row: n = 30


def _rel(actual, expected) -> float:
    """Max-norm relative error ``max|a - e| / max|e|``."""
    actual, expected = np.asarray(actual, float), np.asarray(expected, float)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.size == 0:
        return 0.0
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300))


# ----------------------------------------------------------------------------- dense reference
def _dense_reference(A, B, W, u, task, num_tasks, Q, h=None, F0=None, full=True):
    """Assembles the dense ``(m + K r)`` system in numpy; solves and inverts it directly.

    With ``full=False`` only ``fixed`` and ``fixed_cov`` (one LU solve, no inverse).
    """
    A, B, W, u = (np.asarray(a, float) for a in (A, B, W, u))
    task = np.asarray(task)
    K, m, r = num_tasks, A.shape[1], B.shape[1]
    Q = np.broadcast_to(np.asarray(Q, float), (K, r, r))
    AW = np.einsum("nmd,nde->nme", A, W)
    C, D, g_r = np.zeros((K, m, r)), np.array(Q), np.zeros((K, r))
    np.add.at(C, task, np.einsum("nme,nre->nmr", AW, B))
    np.add.at(D, task, np.einsum("nrd,nde,nse->nrs", B, W, B))
    np.add.at(g_r, task, np.einsum("nrd,nd->nr", B, u))
    if h is not None:
        g_r += h
    H = np.zeros((m + K * r, m + K * r))
    H[:m, :m] = np.einsum("nme,nke->mk", AW, A) + (0.0 if F0 is None else F0)
    blocks = [slice(m + i * r, m + (i + 1) * r) for i in range(K)]
    for i, sl in enumerate(blocks):
        H[:m, sl], H[sl, :m], H[sl, sl] = C[i], C[i].T, D[i]
    rhs = np.concatenate([np.einsum("nmd,nd->m", A, u), g_r.reshape(-1)])
    if not full:
        cols = np.linalg.solve(H, np.column_stack([rhs, np.eye(m + K * r)[:, :m]]))
        return dict(fixed=cols[:m, 0], fixed_cov=cols[:m, 1:])
    theta = np.linalg.solve(H, rhs)
    Hinv = np.linalg.inv(H)
    H_fr = np.stack([Hinv[:m, sl] for sl in blocks]) if r else np.zeros((K, m, 0))
    H_rr = np.stack([Hinv[sl, sl] for sl in blocks]) if r else np.zeros((K, 0, 0))
    # Cov(eta_j) = L_j^T H^{-1} L_j with L_j = (A_j; B_j in task t_j's block)
    cross = np.einsum("nmd,nmr,nre->nde", A, H_fr[task], B)
    row_cov = (
        np.einsum("nmd,mk,nke->nde", A, Hinv[:m, :m], A)
        + cross
        + np.swapaxes(cross, -1, -2)
        + np.einsum("nrd,nrs,nse->nde", B, H_rr[task], B)
    )
    return dict(fixed=theta[:m], random=theta[m:].reshape(K, r), fixed_cov=Hinv[:m, :m],
                cross_cov=H_fr, random_cov=H_rr, row_cov=row_cov, random_info=D - Q)


# ----------------------------------------------------------------------------- brute force
def _random_problem(seed, d, r, all_priors):
    """Random problem; always full prior arrays (zeros when off) so shapes share compilations."""
    rng = np.random.default_rng(seed)
    task = rng.permutation(np.repeat(np.arange(K_TASKS), TASK_SIZES))
    n = task.size
    G = rng.normal(size=(n, d, d))
    if d > 1:
        G[::3, :, 1:] = 0.0  # every third weight is rank one: PSD but singular
    R = rng.normal(size=(K_TASKS, r, r)) if all_priors else np.broadcast_to(rng.normal(size=(r, r)), (K_TASKS, r, r))
    S = rng.normal(size=(M_FIXED, M_FIXED))
    return dict(
        A=rng.normal(size=(n, M_FIXED, d)),
        B=rng.normal(size=(n, r, d)),
        W=G @ np.swapaxes(G, -1, -2),
        u=rng.normal(size=(n, d)),
        task=task,
        Q=R @ np.swapaxes(R, -1, -2) + 0.5 * np.eye(r),  # [K, r, r], equal blocks unless all_priors
        h=rng.normal(size=(K_TASKS, r)) if all_priors else np.zeros((K_TASKS, r)),
        F0=S @ S.T + 0.1 * np.eye(M_FIXED) if all_priors else np.zeros((M_FIXED, M_FIXED)),
    )


ARGS = ("A", "B", "W", "u", "task")


def _solve(p, **kwargs):
    return solve(*(p[k] for k in ARGS), K_TASKS, p["Q"], p["h"], p["F0"], **kwargs)


def _check_against_dense(p, solution, tol=1e-10):
    ref = _dense_reference(*(p[k] for k in ARGS), K_TASKS, p["Q"], p["h"], p["F0"])
    assert isinstance(solution, BorderedSolution)
    for name in ("fixed", "random", "fixed_cov", "cross_cov", "random_cov", "random_info"):
        assert _rel(getattr(solution, name), ref[name]) < tol, name
    assert _rel(row_cov_fn(solution, p["A"], p["B"], p["task"]), ref["row_cov"]) < tol


@pytest.mark.parametrize(
    ("d", "r", "all_priors"),
    [
        pytest.param(d, r, all_priors, id=f"d{d}-r{r}-" + ("all_priors" if all_priors else "shared_prior"))
        for d, r, all_priors in [(1, 1, False), (1, 1, True), (2, 2, False), (2, 2, True), (2, 1, True)]
    ],
)
def test_matches_dense_solve_float64(d, r, all_priors):
    """Shared Q, or per-task Q_i [K, r, r] with a nonzero h_i and a fixed prior F_0."""
    p = _random_problem(10 * d + r + 100 * all_priors, d, r, all_priors)
    solution = _solve(p)
    assert solution.fixed.dtype == jnp.float64
    assert solution.random.shape == (K_TASKS, r) and solution.centre.shape == (K_TASKS, M_FIXED, r)
    _check_against_dense(p, solution)


def test_closed_form_without_refinement_is_exact_in_float64():
    p = _random_problem(7, 2, 2, all_priors=True)
    _check_against_dense(p, _solve(p, refinement_steps=0), tol=1e-9)


def test_default_priors_and_shared_prior_precision():
    """``Q [r, r]`` broadcasts to every task and ``None`` means zero h_i / no F_0."""
    p = _random_problem(8, 2, 2, all_priors=False)
    solution = solve(*(p[k] for k in ARGS), K_TASKS, p["Q"][0])
    _check_against_dense(p, solution)


@pytest.mark.parametrize("d", [1, 2])
def test_without_random_effects_is_weighted_least_squares(d):
    p = _random_problem(5 + d, d, 0, all_priors=d == 2)
    solution = _solve(p)
    assert solution.random.shape == (K_TASKS, 0)
    assert solution.centre.shape == (K_TASKS, M_FIXED, 0)
    assert solution.random_prec_inv.shape == (K_TASKS, 0, 0)
    assert solution.cross_cov.shape == (K_TASKS, M_FIXED, 0)
    assert solution.random_cov.shape == (K_TASKS, 0, 0)
    _check_against_dense(p, solution)
    info = np.einsum("nmd,nde,nke->mk", p["A"], p["W"], p["A"]) + p["F0"]
    wls = np.linalg.solve(info, np.einsum("nmd,nd->m", p["A"], p["u"]))
    assert _rel(solution.fixed, wls) < 1e-10


def test_kron_rows_layout():
    rng = np.random.default_rng(3)
    n, q, d = 6, 3, 2
    x = rng.normal(size=(n, q))
    rows = kron_rows(x, d)
    assert rows.shape == (n, q * d, d)
    for a in range(q):
        for k in range(d):
            for l in range(d):
                np.testing.assert_array_equal(rows[:, a * d + k, l], x[:, a] * (k == l))
    coef = rng.normal(size=(q, d))  # W [q, d] flattened row-major: eta_j = W^T x_j
    np.testing.assert_allclose(jnp.einsum("nmd,m->nd", rows, coef.reshape(-1)), x @ coef, rtol=1e-12)
    gram = np.einsum("nmd,nkd->mk", rows, rows)  # with W_j = I: kron(X^T X, I_d)
    np.testing.assert_allclose(gram, np.kron(x.T @ x, np.eye(d)), rtol=1e-12)


@pytest.mark.parametrize("random_intercepts", [True, False])
@pytest.mark.parametrize("all_priors", [True, False])
def test_kron_solve_matches_the_dense_system_float64(random_intercepts, all_priors):
    """A_j = x_j (x) I_d, B_j = I_d (or none): the brute-force dense solve, covariates far from zero."""
    rng = np.random.default_rng(20 + 2 * random_intercepts + all_priors)
    q, d = 2, 3
    task = rng.permutation(np.repeat(np.arange(K_TASKS), TASK_SIZES))
    n, r = task.size, d if random_intercepts else 0
    x = np.column_stack([np.ones(n), 50.0 + rng.normal(size=n)])
    G = rng.normal(size=(n, d, d))
    G[::3, :, 1:] = 0.0  # rank-one weights
    R = rng.normal(size=(K_TASKS if all_priors else 1, r, r))
    Q = np.broadcast_to(R @ np.swapaxes(R, -1, -2) + 0.5 * np.eye(r), (K_TASKS, r, r))
    S = rng.normal(size=(q * d, q * d))
    p = dict(A=np.asarray(kron_rows(x, d)), B=np.broadcast_to(np.eye(d)[:r], (n, r, d)), W=G @ np.swapaxes(G, -1, -2),
             u=rng.normal(size=(n, d)), task=task, Q=Q,
             h=rng.normal(size=(K_TASKS, r)) if all_priors else np.zeros((K_TASKS, r)),
             F0=S @ S.T + 0.1 * np.eye(q * d) if all_priors else np.zeros((q * d, q * d)))
    solution = kron_solve(x, p["W"], p["u"], task, K_TASKS, Q, p["h"], p["F0"], random_intercepts=random_intercepts)
    assert solution.random.shape == (K_TASKS, r) and solution.centre.shape == (K_TASKS, q * d, r)
    _check_against_dense(p, solution, tol=1e-9)
    # the weighted sum of the rows' Cov(eta_j), from the dense inverse row by row
    weights = rng.uniform(size=n)
    dense = _dense_reference(*(p[k] for k in ARGS), K_TASKS, Q, p["h"], p["F0"])["row_cov"]
    summed = jax.jit(linalg.kron_row_covariance_sum)(solution, x, task, weights)
    assert _rel(summed, np.einsum("n,nde->de", weights, dense)) < 1e-9


@pytest.mark.parametrize("random_intercepts", [True, False])
def test_kron_solve_with_factored_weights_matches_the_dense_system(random_intercepts):
    """``KronWeights``, W_j = w_j S (a Gaussian component's tau_j Sigma^-1; some rows of weight
    zero): the brute-force dense solve in float64, covariates far from zero; in float32 the
    factored sums are as accurate as the weights written out row by row."""
    rng = np.random.default_rng(30 + random_intercepts)
    q, d = 2, 3
    task = rng.permutation(np.repeat(np.arange(K_TASKS), TASK_SIZES))
    n, r = task.size, d if random_intercepts else 0
    x = np.column_stack([np.ones(n), 50.0 + rng.normal(size=n)])
    w = rng.uniform(size=n)
    w[::4] = 0.0
    L = rng.normal(size=(d, d))
    S = L @ L.T + 0.1 * np.eye(d)
    R = rng.normal(size=(r, r))
    Q = np.broadcast_to(R @ R.T + 0.5 * np.eye(r), (K_TASKS, r, r))
    p = dict(A=np.asarray(kron_rows(x, d)), B=np.broadcast_to(np.eye(d)[:r], (n, r, d)),
             W=w[:, None, None] * S, u=rng.normal(size=(n, d)), task=task, Q=Q, h=np.zeros((K_TASKS, r)),
             F0=np.zeros((q * d, q * d)))
    factored = linalg.KronWeights(w, S)
    _check_against_dense(p, kron_solve(x, factored, p["u"], task, K_TASKS, Q, random_intercepts=random_intercepts),
                         tol=1e-9)
    single = [np.asarray(a, np.float32) for a in (x, w, S, p["W"], p["u"], Q)]
    x32, w32, S32, W32, u32, Q32 = single
    exact = kron_solve(x, factored, p["u"], task, K_TASKS, Q, random_intercepts=random_intercepts)
    from_factors = kron_solve(x32, linalg.KronWeights(w32, S32), u32, task, K_TASKS, Q32,
                              random_intercepts=random_intercepts)
    from_rows = kron_solve(x32, W32, u32, task, K_TASKS, Q32, random_intercepts=random_intercepts)
    assert from_factors.fixed.dtype == jnp.float32
    for name in ("fixed", "random", "fixed_cov"):
        assert _rel(getattr(from_factors, name), getattr(exact, name)) <= 2 * max(
            _rel(getattr(from_rows, name), getattr(exact, name)), 1e-6), name


@pytest.mark.parametrize("random_intercepts", [True, False])
def test_kron_solve_with_multinomial_weights_matches_the_dense_system(random_intercepts):
    """``MultinomialWeights``, W_j = m_j (diag pi_j - pi_j pi_j^T) (a mixing step's logits; rows of
    mass zero, near-certain rows): the brute-force dense solve in float64, covariates far from
    zero; in float32 as accurate as the blocks written out row by row."""
    rng = np.random.default_rng(40 + random_intercepts)
    q, d = 2, 3
    task = rng.permutation(np.repeat(np.arange(K_TASKS), TASK_SIZES))
    n, r = task.size, d if random_intercepts else 0
    x = np.column_stack([np.ones(n), 50.0 + rng.normal(size=n)])
    logits = np.concatenate([3.0 * rng.normal(size=(n, d)), np.zeros((n, 1))], axis=1)
    logits[::5, 0] += 12.0  # pi_1 within ~1e-5 of 1
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True))[:, :d]
    mass = rng.uniform(size=n)
    mass[::4] = 0.0
    dense_weights = mass[:, None, None] * (np.einsum("nk,kl->nkl", probs, np.eye(d))
                                           - probs[:, :, None] * probs[:, None, :])
    R = rng.normal(size=(r, r))
    Q = np.broadcast_to(R @ R.T + 0.5 * np.eye(r), (K_TASKS, r, r))
    F0 = 1e-3 * np.eye(q * d)
    p = dict(A=np.asarray(kron_rows(x, d)), B=np.broadcast_to(np.eye(d)[:r], (n, r, d)), W=dense_weights,
             u=rng.normal(size=(n, d)), task=task, Q=Q, h=rng.normal(size=(K_TASKS, r)), F0=F0)
    structured = linalg.MultinomialWeights(mass, probs)
    exact = kron_solve(x, structured, p["u"], task, K_TASKS, Q, p["h"], F0, random_intercepts=random_intercepts)
    _check_against_dense(p, exact, tol=1e-9)
    single = [np.asarray(a, np.float32) for a in (x, mass, probs, dense_weights, p["u"], Q, p["h"], F0)]
    x32, m32, pi32, W32, u32, Q32, h32, F32 = single
    from_structure = kron_solve(x32, linalg.MultinomialWeights(m32, pi32), u32, task, K_TASKS, Q32, h32, F32,
                                random_intercepts=random_intercepts)
    from_rows = kron_solve(x32, W32, u32, task, K_TASKS, Q32, h32, F32, random_intercepts=random_intercepts)
    assert from_structure.fixed.dtype == jnp.float32
    for name in ("fixed", "random", "fixed_cov"):
        assert _rel(getattr(from_structure, name), getattr(exact, name)) <= 2 * max(
            _rel(getattr(from_rows, name), getattr(exact, name)), 1e-6), name


def test_packed_weights_round_trip():
    """The distinct entries of symmetric blocks, and back; multinomial weights packed entry by entry."""
    rng = np.random.default_rng(6)
    G = rng.normal(size=(5, 4, 4))
    blocks = G @ np.swapaxes(G, -1, -2)
    packed = linalg.packed_weights(jnp.asarray(blocks))
    assert packed.shape == (5, 10)
    np.testing.assert_array_equal(linalg.unpack_symmetric(packed, 4), blocks)
    mass, probs = rng.uniform(size=5), rng.dirichlet(np.ones(5), size=5)[:, :4]
    dense = mass[:, None, None] * (np.einsum("nk,kl->nkl", probs, np.eye(4)) - probs[:, :, None] * probs[:, None, :])
    unpacked = linalg.unpack_symmetric(linalg.packed_weights(linalg.MultinomialWeights(mass, probs)), 4)
    np.testing.assert_allclose(unpacked, dense, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("num_tasks", [3, 40])  # a product with the task indicator / a scatter
def test_segment_outer_sum_matches_numpy(num_tasks):
    rng = np.random.default_rng(5)
    n = 200
    task = rng.integers(0, num_tasks, n)
    task[:num_tasks - 1] = np.arange(num_tasks - 1)  # every task but the last has rows
    task[task == num_tasks - 1] = 0  # the last has none: its sums are 0
    left, right = rng.normal(size=(n, 4)), rng.normal(size=(n, 3, 3))
    expected = np.zeros((num_tasks, 4, 3, 3))
    np.add.at(expected, task, left[:, :, None, None] * right[:, None])
    actual = jax.jit(linalg.segment_outer_sum, static_argnums=3)(left, right, task, num_tasks)
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)
    assert not np.any(np.asarray(actual)[-1])


@pytest.mark.parametrize(("q", "outputs"), [(5, (2,)), (5, (2, 1)), (3, ()), (12, (8,)), (0, (2,))])
def test_row_products_equal_the_matrix_product(q, outputs):
    """Unrolled over the columns (narrow) or a tensordot (``q * m > 64``, or no columns)."""
    rng = np.random.default_rng(11)
    x, w = rng.normal(size=(50, q)) + 30.0, rng.normal(size=(q,) + outputs)
    actual = jax.jit(linalg.row_products)(x, w)
    assert actual.shape == (50,) + outputs
    np.testing.assert_allclose(actual, np.tensordot(x, w, axes=1), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("q", [3, 12])  # pairwise products of the design / weighted rows
@pytest.mark.parametrize("weight_shape", [(), (2, 2)])
def test_weighted_gram_equals_the_sum_of_weighted_outer_products(q, weight_shape):
    rng = np.random.default_rng(12)
    n = 80
    x, weights = rng.normal(size=(n, q)) - 5.0, rng.uniform(size=(n,) + weight_shape)
    expected = np.einsum("na,nb,n...->ab...", x, x, weights)
    actual = jax.jit(linalg._weighted_gram)(x, weights)
    np.testing.assert_allclose(actual, expected, rtol=1e-12)


def test_cholesky_and_triangular_solves_match_numpy():
    rng = np.random.default_rng(11)
    G = rng.normal(size=(2, 3, 5, 5))
    mats = G @ np.swapaxes(G, -1, -2) + 0.1 * np.eye(5)
    chol = np.asarray(cholesky(mats))
    np.testing.assert_allclose(chol, np.linalg.cholesky(mats), rtol=1e-12, atol=1e-14)
    rhs = rng.normal(size=(3, 5, 2))  # broadcasts against the [2, 3] batch
    np.testing.assert_allclose(solve_triangular(chol, rhs), np.linalg.solve(chol, rhs), rtol=1e-10)
    np.testing.assert_allclose(solve_triangular(chol, rhs, transpose=True),
                               np.linalg.solve(np.swapaxes(chol, -1, -2), rhs), rtol=1e-10)
    # not positive definite: NaN from the failing column on (the third here), like LAPACK's failure
    indefinite = np.diag([4.0, 1.0, -1.0, 2.0])
    bad = np.asarray(cholesky(indefinite))
    np.testing.assert_array_equal(np.diag(bad)[:2], [2.0, 1.0])
    assert np.all(np.isnan(np.diag(bad)[2:]))


def test_em_step_compiles_without_lapack_cholesky_or_triangular_solves():
    """jaxlib 0.10's batched LAPACK kernels can deadlock the CPU thread pool when two run at once
    (see linalg.cholesky); the mixture EM step must use the plain-jnp factorisations."""
    from mtl_jax.models.mixture_glmm import MixtureGLMM
    from tests.support import random_problem

    params, design = random_problem(p=2, g=4, K=3, n=12)
    text = jax.jit(lambda prm: MixtureGLMM(4).em_step(prm, design)).lower(params).as_text()
    assert "potrf" not in text and "trsm" not in text
    assert text.count("syevd") <= 1  # one eigendecomposition per step can never wait on another


def test_segment_sum_and_diag_embed():
    values = jnp.arange(10.0).reshape(5, 2)
    task = jnp.array([2, 0, 2, 1, 0])
    np.testing.assert_array_equal(segment_sum(values, task, 4), [[10, 12], [6, 7], [4, 6], [0, 0]])
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(diag_embed(x), [np.diag([1.0, 2.0]), np.diag([3.0, 4.0])])


# ----------------------------------------------------------------------------- float32 grid
PHI = 0.7
GRID_SNR = (1e-2, 1.0, 1e2, 1e4, 1e6)  # n_i * phi / sigma^2
GRID_TASK_SIZES = {  # n_i shrinks as K grows, so that the test stays fast
    2: np.array([28, 52]),
    10: np.array([4, 6, 8, 10, 12, 12, 14, 16, 18, 20]),
    1000: np.tile([1, 2, 3], 334)[:1000],
}


def _lmm_problem(K, snr, seed=0):
    """y = 3.5 + 0.7 x + b_i + e with b_i ~ N(0, phi), e ~ N(0, sigma^2), x ~ N(0, 1).

    d = 1, A_j = (1, x_j), B_j = 1, W_j = 1/sigma^2, u_j = y_j/sigma^2, Q = 1/phi, with
    sigma^2 = mean(n_i) phi / snr.
    """
    rng = np.random.default_rng(seed)
    sizes = GRID_TASK_SIZES[K]
    task = rng.permutation(np.repeat(np.arange(K), sizes))
    n = task.size
    sigma2 = sizes.mean() * PHI / snr
    x = rng.normal(size=n)
    b = rng.normal(scale=np.sqrt(PHI), size=K)
    y = 3.5 + 0.7 * x + b[task] + rng.normal(scale=np.sqrt(sigma2), size=n)
    A = np.stack([np.ones(n), x], axis=1)[:, :, None]
    B = np.ones((n, 1, 1))
    W = np.full((n, 1, 1), 1.0 / sigma2)
    u = (y / sigma2)[:, None]
    return (A, B, W, u), task, np.array([[1.0 / PHI]])


@functools.partial(jax.jit, static_argnames=("num_tasks",))
def _naive_solve(A, B, W, u, task, Q, num_tasks):
    """The old formula, P = F - sum_i C_i D_i^{-1} C_i^T (a difference of huge numbers)."""
    AW = jnp.einsum("nmd,nde->nme", A, W)
    F = jnp.einsum("nme,nke->mk", AW, A)
    C = segment_sum(jnp.einsum("nme,nre->nmr", AW, B), task, num_tasks)
    D = segment_sum(jnp.einsum("nrd,nde,nse->nrs", B, W, B), task, num_tasks) + Q
    g_f = jnp.einsum("nmd,nd->m", A, u)
    g_r = segment_sum(jnp.einsum("nrd,nd->nr", B, u), task, num_tasks)
    c_dinv = jnp.einsum("imr,irs->ims", C, jnp.linalg.inv(D))
    p_inv = jnp.linalg.inv(F - jnp.einsum("ims,ins->mn", c_dinv, C))
    return p_inv @ (g_f - jnp.einsum("ims,is->m", c_dinv, g_r)), p_inv


@pytest.mark.parametrize("K", sorted(GRID_TASK_SIZES))
def test_float32_matches_float64_over_snr_grid(K):
    """float32 agrees with the float64 (dense, exact) solution to 1e-3 over the whole grid.

    Measured worst relative errors of float32 against float64 (this seed), by
    snr = n_i phi / sigma^2:

    * stable form (default, one refinement step): fixed effects <= 4e-7 and
      diag(fixed_cov) <= 1e-5 over the whole grid;
    * its closed form alone (``refinement_steps=0``): fixed effects 3e-2..5e-2 at 1e6
      (that right-hand side is first order in the rounding of the centres);
    * naive Schur complement (``_naive_solve``): fixed effects 0.2 / 0.5 / 0.8 and
      diag(P^{-1}) 0.3 / 0.5 / 0.8 at 1e6 for K = 2 / 10 / 1000, already 1e-2..2e-1 at 1e4.
    """
    naive_errors = {}
    for snr in GRID_SNR:
        rows64, task, Q = _lmm_problem(K, snr)
        ref = _dense_reference(*rows64, task, K, Q, full=False)
        rows32 = [jnp.asarray(a, dtype=jnp.float32) for a in rows64]
        Q32 = jnp.asarray(Q, dtype=jnp.float32)
        sol = solve(*rows32, task, K, Q32)
        assert sol.fixed.dtype == jnp.float32 and sol.fixed_cov.dtype == jnp.float32

        ref_var = np.diag(ref["fixed_cov"])
        scale = np.maximum(np.abs(ref["fixed"]), np.sqrt(ref_var))  # the value or its standard error

        def errors(fixed, cov):
            return (
                np.max(np.abs(np.asarray(fixed, float) - ref["fixed"]) / scale),
                np.max(np.abs(np.diag(np.asarray(cov, float)) / ref_var - 1.0)),
            )

        fixed_err, var_err = errors(sol.fixed, sol.fixed_cov)
        assert fixed_err < 1e-3, (snr, fixed_err)
        assert var_err < 1e-3, (snr, var_err)
        naive_errors[snr] = errors(*_naive_solve(*rows32, task, Q32, num_tasks=K))
    # the defect being fixed: at snr = 1e6 the naive float32 Schur complement loses the
    # fixed-intercept information (its variance is off by more than 10%)
    assert naive_errors[1e6][1] > 0.1, naive_errors


# ----------------------------------------------------------------------------- PSD helpers
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_psd_logdet_and_positive_definiteness(dtype):
    G = np.random.default_rng(7).normal(size=(3, 4, 4))
    pd = G @ np.swapaxes(G, -1, -2) + 0.1 * np.eye(4)
    tol = 1e-4 if dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(psd_logdet(jnp.asarray(pd, dtype)), np.linalg.slogdet(pd)[1], rtol=tol, atol=tol)
    assert bool(jnp.all(is_positive_definite(jnp.asarray(pd, dtype))))

    indefinite = jnp.asarray([[1.0, 2.0], [2.0, 1.0]], dtype)  # det = -3: |det| would give log 3
    assert bool(jnp.isnan(psd_logdet(indefinite)))
    assert not bool(is_positive_definite(indefinite))
    batch = jnp.stack([indefinite, 2.0 * jnp.eye(2, dtype=dtype)])
    logdets = np.asarray(psd_logdet(batch))
    assert np.isnan(logdets[0]) and abs(logdets[1] - 2 * np.log(2.0)) < tol
    np.testing.assert_array_equal(is_positive_definite(batch), [False, True])


def test_psd_inverse_near_singular_float32_is_finite():
    near = jnp.asarray([[1.0, 1.0 - 1e-8], [1.0 - 1e-8, 1.0]], dtype=jnp.float32)  # singular in float32
    assert bool(jnp.all(jnp.isfinite(psd_inverse(near))))
    G = np.random.default_rng(2).normal(size=(5, 2))
    assert bool(jnp.all(jnp.isfinite(psd_inverse(jnp.asarray(G @ G.T, dtype=jnp.float32)))))  # rank 2
    zero_rows = jnp.diag(jnp.asarray([1.0, 0.0, 0.0], dtype=jnp.float32))  # no information at all
    assert bool(jnp.all(jnp.isfinite(psd_inverse(zero_rows))))
    # the jitter is relative to each diagonal entry, so widely scaled matrices keep their accuracy
    scaled = jnp.asarray([[1e6, 10.0], [10.0, 1.0]], dtype=jnp.float32)
    np.testing.assert_allclose(psd_inverse(scaled), np.linalg.inv(np.asarray(scaled, float)), rtol=1e-5)


def test_psd_solve_batched_vectors_and_matrices():
    rng = np.random.default_rng(4)
    G = rng.normal(size=(3, 4, 4))
    mats = G @ np.swapaxes(G, -1, -2) + np.eye(4)
    vecs, rhs = rng.normal(size=(3, 4)), rng.normal(size=(3, 4, 2))
    np.testing.assert_allclose(psd_solve(mats, vecs), np.linalg.solve(mats, vecs[..., None])[..., 0], rtol=1e-10)
    np.testing.assert_allclose(psd_solve(mats, rhs), np.linalg.solve(mats, rhs), rtol=1e-10)
    np.testing.assert_allclose(psd_inverse(mats), np.linalg.inv(mats), rtol=1e-10)
    chol = psd_cholesky(mats)
    np.testing.assert_allclose(chol @ np.swapaxes(chol, -1, -2), mats, rtol=1e-12)
    assert float(jnp.max(jnp.abs(jnp.triu(chol, 1)))) == 0.0


# ----------------------------------------------------------------------------- transforms
def test_bordered_solve_vmaps_over_problems():
    problems = [_random_problem(seed, 2, 2, all_priors=True) for seed in (1, 2)]
    keys = ARGS + ("Q", "h", "F0")
    stacked = {k: np.stack([p[k] for p in problems]) for k in keys}
    def one(A, B, W, u, task, Q, h, F0):
        return bordered_solve(A, B, W, u, task, K_TASKS, Q, h, F0)

    out = jax.jit(jax.vmap(one))(*(stacked[k] for k in keys))
    assert out.fixed.shape == (2, M_FIXED) and out.random.shape == (2, K_TASKS, 2)
    row_cov = jax.jit(jax.vmap(row_covariance))(out, stacked["A"], stacked["B"], stacked["task"])
    for b, p in enumerate(problems):
        single = _solve(p)  # the jitted call, same shapes as the brute-force test
        for name in ("fixed", "random", "fixed_cov", "centre", "random_prec_inv", "cross_cov", "random_cov"):
            np.testing.assert_allclose(getattr(out, name)[b], getattr(single, name), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(row_cov[b], row_cov_fn(single, p["A"], p["B"], p["task"]),
                                   rtol=1e-10, atol=1e-12)
        _check_against_dense(p, single)


@pytest.mark.parametrize(("offset", "sigma2"), [(0.0, 1.0), (0.0, 1e-4), (1e3, 1.0), (1e3, 1e-4)])
def test_kron_row_covariance_sum_float32_as_accurate_as_the_rows(offset, sigma2):
    """float32 against float64: large tasks (500 rows), small noise, a covariate far from zero.

    The closed-form sum must be as accurate as summing the float32 row covariances (the
    float32 solve's own error, 3e-4 at offset 1e3 and sigma^2 = 1, bounds both)."""
    rng = np.random.default_rng(3)
    num_tasks, size = 20, 500
    task = np.repeat(np.arange(num_tasks), size)
    n = task.size
    x = np.column_stack([np.ones(n), offset + rng.normal(size=n), rng.normal(size=n)])
    W, u = np.full((n, 1, 1), 1.0 / sigma2), rng.normal(size=(n, 1)) / sigma2
    weights = rng.uniform(size=n)

    def sums(dtype):
        solution = kron_solve(x.astype(dtype), W.astype(dtype), u.astype(dtype), task, num_tasks,
                              np.eye(1, dtype=dtype) / PHI)
        closed = jax.jit(linalg.kron_row_covariance_sum)(solution, x.astype(dtype), task, weights.astype(dtype))
        rows = row_cov_fn(solution, kron_rows(x.astype(dtype), 1), np.ones((n, 1, 1), dtype), task)
        return np.asarray(closed, float), np.einsum("n,nde->de", weights, np.asarray(rows, float))

    exact, by_rows64 = sums(np.float64)
    assert _rel(by_rows64, exact) < 1e-12
    closed32, by_rows32 = sums(np.float32)
    assert _rel(closed32, exact) < 1e-3
    assert _rel(closed32, exact) <= 1.5 * _rel(by_rows32, exact) + 1e-6
