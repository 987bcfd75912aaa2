"""The Triton Mamba-3 path (SISO and MIMO) against the reference: outputs, final states (phase, state, carried
key and input) and every gradient, initial-state gradients included.

On CPU (CI) the kernels run in Triton's interpreter on small shapes; on a GPU the same cases run
natively, plus real sizes, all dtypes and numerical stress (``pytest -m gpu``).
"""

import pytest
import torch

from mambakit.ops import mamba3
from mambakit.ops.mamba3 import Mamba3State
from tests.utils import assert_close

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
INPUTS = ("x", "dt", "A", "B", "C", "trap", "angles", "D", "z", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o")
STATE = ("phi", "H", "K_prev", "x_prev")


def make_case(b, l, h, p, g, n, n_angles, *, optional=True, state=True, dtype=torch.float32, seed=0,
              dt_max=0.5, A_min=-2.0, r=1):
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape, dt_=dtype, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dt_).to(DEVICE)

    case = dict(
        x=rn(b, l, h, p), dt=(torch.rand(b, l, h, generator=gen) * dt_max + 1e-3).to(DEVICE),
        A=(A_min * torch.rand(b, l, h, generator=gen) - 1e-2).to(DEVICE),
        B=rn(b, l, r, g, n), C=rn(b, l, r, g, n), trap=rn(b, l, h, dt_=torch.float32),
        angles=rn(b, l, h, n_angles, dt_=torch.float32),
        D=rn(h, dt_=torch.float32) if optional else None, z=rn(b, l, h, p) if optional else None,
        B_bias=rn(h, r, n, dt_=torch.float32, scale=0.3) if optional else None,
        C_bias=rn(h, r, n, dt_=torch.float32, scale=0.3) if optional else None,
        mimo_x=rn(h, r, p, dt_=torch.float32) if r > 1 else None,
        mimo_z=rn(h, r, p, dt_=torch.float32) if r > 1 and optional else None,
        mimo_o=rn(h, r, p, dt_=torch.float32) if r > 1 else None,
    )
    initial = None
    if state:
        initial = Mamba3State(phi=(6.28 * torch.rand(b, h, n_angles, generator=gen)).to(DEVICE),
                              H=rn(b, h, p, n, dt_=torch.float32), K_prev=rn(b, r, h, n, dt_=torch.float32),
                              x_prev=rn(b, h, p, dt_=torch.float32))
    return case, initial


# In bfloat16 the gradients that flow through the rotary phase (dt and the angles feed it, and the
# initial phase) sum per-token phase gradients over the whole rest of the sequence (a reverse
# cumulative sum), and each per-token term comes from dK, dQ that the SSD kernels return in bfloat16
# (as the official kernels do). Against the float32 reference they are off by 0.2-0.35 at l = 1000
# with dt up to 0.5 (H100). The same code agrees to 2e-2 in float16 and 1e-4 in float32, and at the
# benchmark shape the official bfloat16 kernel and ours differ by 2e-2 (dt) and 6e-2 (angles) on
# them. So bfloat16 runs hold those three to a bound that catches a wrong sign or a missing term
# (errors of order 1), not rounding: a known precision limit, listed in benchmarks/NOTES.md.
PHASE_GRADS = ("ddt", "dangles", "dinitial.phi")
BF16_PHASE_TOL = 0.5


def run_both(case, initial, chunk_size, tol_y, tol_grad, rope_layout=None, seq_idx=None):
    names = [k for k in INPUTS if case[k] is not None and case[k].is_floating_point()]
    results = {}
    for backend in ("reference", "triton"):
        args = {k: (v.detach().clone().requires_grad_() if k in names else v) for k, v in case.items()}
        state = None if initial is None else Mamba3State(*(t.detach().clone().requires_grad_() for t in initial))
        y, final = mamba3(**args, initial_state=state, return_final_state=True, chunk_size=chunk_size,
                          rope_layout=rope_layout, backend=backend, seq_idx=seq_idx)
        gen = torch.Generator(device=y.device).manual_seed(7)
        weights = [torch.randn(t.shape, generator=gen, device=y.device) for t in (y, *final)]
        loss = sum((t.float() * w).sum() for t, w in zip((y, *final), weights))
        wrt = [args[k] for k in names] + ([] if state is None else list(state))
        grads = torch.autograd.grad(loss, wrt)
        results[backend] = {"y": y, **{f"final.{k}": t for k, t in zip(STATE, final)},
                            **{f"d{k}": gr for k, gr in zip(names + ([] if state is None else [f"initial.{s}" for s in STATE]), grads)}}
    ref, tri = results["reference"], results["triton"]
    assert tri["y"].dtype == case["x"].dtype
    for key in ref:
        tol = tol_y if key == "y" or key.startswith("final") else tol_grad
        if case["x"].dtype == torch.bfloat16 and key in PHASE_GRADS:
            tol = max(tol, BF16_PHASE_TOL)
        assert_close(tri[key].float(), ref[key].float(), tol, key)


@pytest.mark.parametrize("l", [1, 37, 64])
@pytest.mark.parametrize("optional,state", [(True, True), (False, False)], ids=["all-options", "bare"])
def test_matches_reference_fp32(l, optional, state):
    case, initial = make_case(2, l, 4, 8, 2, 16, 4, optional=optional, state=state)
    run_both(case, initial, chunk_size=16, tol_y=1e-5, tol_grad=1e-4)


@pytest.mark.parametrize("rope_layout,n,n_angles", [("halves", 16, 8), ("interleaved", 16, 3), ("halves", 12, 6),
                                                    ("interleaved", 12, 5), ("interleaved", 32, 13)],
                         ids=["halves-full", "odd-angles", "halves-n12", "interleaved-n12", "angle-blocks"])
def test_rope_layouts_odd_sizes(rope_layout, n, n_angles):
    case, initial = make_case(1, 29, 3, 6, 1, n, n_angles, seed=1)
    run_both(case, initial, chunk_size=16, tol_y=1e-5, tol_grad=1e-4, rope_layout=rope_layout)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_half_precision_inputs(dtype, tol):
    case, initial = make_case(1, 40, 2, 8, 1, 16, 4, dtype=dtype, seed=2)
    run_both(case, initial, chunk_size=16, tol_y=tol, tol_grad=tol)


@pytest.mark.parametrize("r", [2, 4])
# (Not l = 1 without a state: dA is then exactly 0 and the kernels' rounding of it, ~1e-7, has no
# scale to be relative to.)
@pytest.mark.parametrize("l,optional,state", [(1, True, True), (23, True, True), (2, False, False),
                                              (23, False, False)], ids=["l1-all", "l23-all", "l2-bare", "l23-bare"])
def test_mimo_matches_reference_fp32(r, l, optional, state):
    """Ranks as rank-tokens through the SSD kernels plus the same-step correction: outputs, final
    states and every gradient (mimo_x, mimo_z, mimo_o and the carried K_prev, x_prev included)."""
    case, initial = make_case(2, l, 4, 8, 2, 16, 8, optional=optional, state=state, r=r, seed=5)
    run_both(case, initial, chunk_size=8, tol_y=1e-5, tol_grad=1e-4)


def test_mimo_ranks_unmixed():
    """Without mimo_o the ranks' gated outputs (b, l, h, r, p), and their gradients."""
    case, initial = make_case(1, 19, 2, 8, 1, 16, 4, r=4, seed=10)
    run_both(dict(case, mimo_o=None), initial, chunk_size=8, tol_y=1e-5, tol_grad=1e-4)


def test_mimo_rank8_interleaved_odd_sizes():
    case, initial = make_case(1, 13, 2, 6, 1, 12, 5, r=8, seed=6)
    run_both(case, initial, chunk_size=16, tol_y=1e-5, tol_grad=1e-4, rope_layout="interleaved")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_mimo_half_precision_inputs(dtype, tol):
    case, initial = make_case(1, 30, 2, 8, 1, 16, 8, dtype=dtype, r=4, seed=7)
    run_both(case, initial, chunk_size=16, tol_y=tol, tol_grad=tol)


@pytest.mark.parametrize("given", ["B_bias", "C_bias"])
def test_one_bias_only(given):
    """The rotation kernel takes both biases or neither; a bias given alone pairs with zeros."""
    case, initial = make_case(1, 21, 2, 4, 1, 16, 4, seed=3)
    case["C_bias" if given == "B_bias" else "B_bias"] = None
    run_both(case, initial, chunk_size=16, tol_y=1e-5, tol_grad=1e-4)


@pytest.mark.parametrize("r", [1, 2])
def test_packed_sequences(r):
    """seq_idx: the kernels' state reset, the phase restarted (with its gradient) and, for MIMO,
    every rank-token of a step in its step's sequence; chunk boundaries fall inside sequences."""
    case, initial = make_case(2, 21, 2, 8, 1, 16, 4, r=r, seed=9)
    seq_idx = torch.tensor([[0] * 7 + [1] * 9 + [0] * 5, [4] * 12 + [5] * 9], device=DEVICE, dtype=torch.int32)
    run_both(case, initial, chunk_size=8, tol_y=1e-5, tol_grad=1e-4, seq_idx=seq_idx)


def test_dispatch_and_errors():
    case, _ = make_case(1, 5, 2, 4, 1, 8, 2)
    with pytest.raises(ValueError, match="float64"):
        mamba3(**dict(case, x=case["x"].double()), backend="triton")
    mimo, _ = make_case(1, 5, 2, 4, 1, 8, 2, r=2)
    with pytest.raises(ValueError, match="float64"):
        mamba3(**dict(mimo, mimo_x=mimo["mimo_x"].double()), backend="triton")
    # auto on CPU runs the reference: the same function
    assert_close(mamba3(**mimo, backend="triton"), mamba3(**mimo, backend="reference"), 1e-5, "y")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_real_sizes_on_gpu(dtype, tol):
    case, initial = make_case(2, 1000, 8, 64, 1, 128, 32, dtype=dtype, seed=3)
    run_both(case, initial, chunk_size=64, tol_y=tol, tol_grad=2 * tol)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("r", [2, 4, 8])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_mimo_real_sizes_on_gpu(r, dtype, tol):
    case, initial = make_case(2, 500, 8, 64, 1, 128, 64, dtype=dtype, seed=8, r=r)
    run_both(case, initial, chunk_size=64, tol_y=tol, tol_grad=2 * tol)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("p,n", [(32, 32), (16, 32), (32, 16)])
def test_small_heads_on_gpu(dtype, tol, r, p, n):
    """Head and state sizes below the kernels' tiles: in bfloat16 at p = n = 32 the tf32 products of
    float32-widened tiles compiled (triton 3.6, H200) into an illegal memory access, which the
    real-size cases did not reach; 300 tokens, a partial 64-token chunk."""
    case, initial = make_case(2, 300, 8, p, 1, n, n // 4, dtype=dtype, seed=15, r=r)
    run_both(case, initial, chunk_size=64, tol_y=tol, tol_grad=2 * tol)


@pytest.mark.gpu
@gpu
def test_numerical_stress_on_gpu():
    """dt up to 10 and decays down to -1e3 per step (exp underflows to 0), bf16, long sequence."""
    case, initial = make_case(1, 1 << 14, 2, 32, 1, 64, 16, dtype=torch.bfloat16, seed=4, dt_max=10.0, A_min=-100.0)
    run_both(case, initial, chunk_size=64, tol_y=3e-2, tol_grad=6e-2)
