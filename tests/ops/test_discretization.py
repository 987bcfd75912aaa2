import math

import pytest
import torch

from mambakit.ops import discretization as disc
from tests.utils import assert_close

F64 = torch.float64


def taylor_expm1_over_x(z: torch.Tensor, terms: int = 30) -> torch.Tensor:
    """sum_k z^k / (k+1)!, exact to float64 for |z| <= 1."""
    total, term = torch.zeros_like(z), torch.ones_like(z)
    for k in range(terms):
        total = total + term
        term = term * z / (k + 2)
    return total


def test_expm1_over_x_near_zero_float64():
    z = torch.tensor([0.0, 1e-300, -1e-12, 1e-8, -3e-5, 9.9e-5, 1.01e-4, -2e-3, 0.3, -0.9], dtype=F64)
    got = disc.expm1_over_x(z)
    assert torch.allclose(got, taylor_expm1_over_x(z), rtol=1e-15, atol=0)
    assert got[0].item() == 1.0


def test_expm1_over_x_float32_accurate_everywhere():
    z = torch.cat([-torch.logspace(-12, 1.5, 200, dtype=F64), torch.logspace(-12, 1.5, 200, dtype=F64)])
    exact = torch.where(z.abs() < 1, taylor_expm1_over_x(z), torch.expm1(z) / z)
    got = disc.expm1_over_x(z.float()).double()
    assert ((got - exact).abs() / exact).max().item() < 1e-6


def test_expm1_over_x_gradient_finite_at_zero():
    z = torch.tensor([0.0, 5e-5, -5e-5, 1e-3, -2.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(disc.expm1_over_x, (z,))
    (grad,) = torch.autograd.grad(disc.expm1_over_x(z[:1]).sum(), z)
    assert grad[0].item() == pytest.approx(0.5)


def test_expm1_over_x_complex():
    z = torch.tensor([0.0, 1e-6 + 2e-6j, 0.5 - 1.5j], dtype=torch.complex128)
    expected = torch.stack([torch.tensor(1.0 + 0j, dtype=torch.complex128), taylor_expm1_over_x(z[1:2])[0], torch.expm1(z[2]) / z[2]])
    assert torch.allclose(disc.expm1_over_x(z), expected, rtol=1e-14, atol=0)


def random_stable_system(n: int, m: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=F64)
    A = -(M @ M.T) / n - 0.5 * torch.eye(n, dtype=F64) + 0.3 * (M - M.T)  # eigenvalues in the left half plane
    B = torch.randn(n, m, generator=g, dtype=F64)
    x = torch.randn(m, generator=g, dtype=F64)
    h0 = torch.randn(n, generator=g, dtype=F64)
    return A, B, x, h0


def exact_constant_input_solution(A, B, x, h0, T):
    """h(T) = e^{AT} h0 + A^{-1} (e^{AT} - I) B x for invertible A."""
    E = torch.linalg.matrix_exp(A * T)
    return E @ h0 + torch.linalg.solve(A, (E - torch.eye(A.shape[0], dtype=F64)) @ (B @ x))


def test_zoh_matrix_is_exact_for_constant_input():
    A, B, x, h0 = random_stable_system(4, 2, seed=0)
    T, steps = 3.0, 37
    A_bar, B_bar = disc.zoh_matrix(T / steps, A, B)
    h = h0
    for _ in range(steps):
        h = A_bar @ h + B_bar @ x
    assert_close(h, exact_constant_input_solution(A, B, x, h0, T), 1e-12, "zoh_matrix")


def test_zoh_matrix_singular_A():
    # A = 0: h' = B x, so one step of length Delta adds exactly Delta B x.
    B = torch.randn(3, 2, dtype=F64)
    A_bar, B_bar = disc.zoh_matrix(0.7, torch.zeros(3, 3, dtype=F64), B)
    assert torch.allclose(A_bar, torch.eye(3, dtype=F64), atol=1e-15)
    assert torch.allclose(B_bar, 0.7 * B, atol=1e-15)


def test_zoh_diagonal_matches_matrix_form():
    g = torch.Generator().manual_seed(1)
    a = -torch.rand(5, generator=g, dtype=F64) * 3
    a[2] = 0.0  # a zero eigenvalue must be handled by the stable (e^z - 1)/z
    b = torch.randn(5, generator=g, dtype=F64)
    A_bar, B_bar = disc.zoh(torch.tensor(0.4, dtype=F64), a, b)
    A_bar_m, B_bar_m = disc.zoh_matrix(0.4, torch.diag(a), b[:, None])
    assert_close(A_bar, torch.diagonal(A_bar_m), 1e-14, "A_bar")
    assert_close(B_bar, B_bar_m[:, 0], 1e-14, "B_bar")


def integrate_diagonal(rule, a, b, x, h0, T, steps):
    delta = torch.tensor(T / steps, dtype=F64)
    h = h0
    for _ in range(steps):
        if rule == "euler":
            A_bar, B_bar = disc.euler(delta, a, b)
            h = A_bar * h + B_bar * x
        elif rule == "zoh":
            A_bar, B_bar = disc.zoh(delta, a, b)
            h = A_bar * h + B_bar * x
        else:
            alpha, beta, gamma = disc.exp_trapezoidal(delta, a, torch.tensor(rule, dtype=F64))
            h = alpha * h + (beta + gamma) * b * x  # constant input: x_{t-1} = x_t
    return h


@pytest.mark.parametrize("rule,order", [("euler", 1), (1.0, 1), (0.5, 2)], ids=["euler", "trap-lambda1", "trap-lambda-half"])
def test_convergence_order_against_matrix_exponential(rule, order):
    g = torch.Generator().manual_seed(2)
    a = -torch.rand(6, generator=g, dtype=F64) * 4 - 0.1
    b = torch.randn(6, generator=g, dtype=F64)
    x, h0, T = 1.3, torch.randn(6, generator=g, dtype=F64), 2.0
    exact = exact_constant_input_solution(torch.diag(a), torch.diag(b), torch.full((6,), x, dtype=F64), h0, T)
    errors = [(integrate_diagonal(rule, a, b, x, h0, T, steps) - exact).norm().item() for steps in (64, 128, 256)]
    for coarse, fine in zip(errors, errors[1:]):
        assert math.log2(coarse / fine) == pytest.approx(order, abs=0.15)


def test_zoh_diagonal_exact_for_constant_input():
    g = torch.Generator().manual_seed(3)
    a = -torch.rand(6, generator=g, dtype=F64) * 4
    b = torch.randn(6, generator=g, dtype=F64)
    h0 = torch.randn(6, generator=g, dtype=F64)
    exact = exact_constant_input_solution(torch.diag(a - 1e-3), torch.diag(b), torch.full((6,), 0.7, dtype=F64), h0, 2.0)
    got = integrate_diagonal("zoh", a - 1e-3, b, 0.7, h0, 2.0, 9)
    assert_close(got, exact, 1e-12, "zoh diagonal")


def test_exp_trapezoidal_lambda_one_is_euler():
    delta, a, lam = torch.tensor(0.3, dtype=F64), torch.tensor(-2.0, dtype=F64), torch.tensor(1.0, dtype=F64)
    alpha, beta, gamma = disc.exp_trapezoidal(delta, a, lam)
    A_bar, B_bar = disc.euler(delta, a, torch.tensor(1.0, dtype=F64))
    assert alpha.item() == A_bar.item() and beta.item() == 0.0 and gamma.item() == B_bar.item()


def test_bad_input():
    with pytest.raises(ValueError, match="A: expected a square matrix"):
        disc.zoh_matrix(0.1, torch.zeros(2, 3), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="B: expected shape"):
        disc.zoh_matrix(0.1, torch.zeros(2, 2), torch.zeros(3, 1))
    with pytest.raises(TypeError, match="z: expected dtype"):
        disc.expm1_over_x(torch.zeros(2, dtype=torch.int64))
