"""mambakit/ops/_backend.py: the launchers' plain-Python block arithmetic."""

import triton

from mambakit.ops._backend import cdiv, next_power_of_2


def test_block_arithmetic_matches_tritons():
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 600) for b in range(1, 70))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 1 << 13))
    assert next_power_of_2((1 << 40) + 1) == 1 << 41 and cdiv(10**12 + 1, 10**6) == 10**6 + 1
