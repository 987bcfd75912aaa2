"""Comparison helpers shared by the tests."""

from __future__ import annotations

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; inf if either holds NaN/inf."""
    actual = torch.view_as_real(actual) if actual.is_complex() else actual
    expected = torch.view_as_real(expected) if expected.is_complex() else expected
    actual, expected = actual.detach().double(), expected.detach().double()
    if not (torch.isfinite(actual).all() and torch.isfinite(expected).all()):
        return float("inf")
    denom = expected.norm().item()
    return (actual - expected).norm().item() / max(denom, 1e-30)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Shapes equal and relative error (NaN rejected) at most ``tol``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
