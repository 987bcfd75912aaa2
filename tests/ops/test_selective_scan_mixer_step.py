"""The Mamba-1 mixer decode step: the reference against the ops it fuses, the Triton kernels
(interpreter on CPU) against the reference, states in place, and its input errors."""

import pytest
import torch
import torch.nn.functional as F

from mambakit.ops.conv1d import causal_conv1d_update
from mambakit.ops.selective_scan import selective_scan
from mambakit.ops.selective_scan.mixer_step import mamba1_mixer_step, mamba1_mixer_step_reference
from tests.utils import assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def make(b, d, n, r, w, *, dtype=torch.float32, conv_bias=True, D=True, seed=0):
    """Inputs of one token; x and z are the halves of a (b, 2d) in_proj row, as the layer passes them."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(DEVICE)

    xz = rn(b, 2 * d).to(dtype)
    return dict(
        x=xz[:, :d], z=xz[:, d:], conv_state=rn(b, d, w - 1).to(dtype), conv_weight=rn(d, w).to(dtype),
        conv_bias=rn(d).to(dtype) if conv_bias else None, x_proj_weight=rn(r + 2 * n, d, scale=d ** -0.5).to(dtype),
        dt_proj_weight=rn(d, r, scale=r ** -0.5).to(dtype), dt_bias=rn(d, scale=0.5),
        A=-torch.rand(d, n, generator=g).to(DEVICE) - 0.1, D=rn(d) if D else None, ssm_state=rn(b, d, n),
    )


def run(kw, backend):
    """-> (y, conv_state after, ssm_state after), the inputs' states left untouched."""
    args = dict(kw, conv_state=kw["conv_state"].clone(), ssm_state=kw["ssm_state"].clone())
    y = mamba1_mixer_step(**args, backend=backend)
    return y, args["conv_state"], args["ssm_state"]


def test_reference_is_the_conv_update_projections_and_a_one_token_scan():
    # float64: the fused reference against the unfused ops the layer ran before (as the spec).
    kw = {k: (v.double() if v is not None else None) for k, v in make(3, 10, 4, 2, 4, seed=1).items()}
    y, conv_after, ssm_after = run(kw, "reference")
    conv_state = kw["conv_state"].clone()
    xc = causal_conv1d_update(kw["x"], conv_state, kw["conv_weight"], kw["conv_bias"], activation="silu",
                              backend="reference")
    dt_low, B, C = torch.split(F.linear(xc, kw["x_proj_weight"]), [2, 4, 4], dim=-1)
    expected, last = selective_scan(xc[..., None], F.linear(dt_low, kw["dt_proj_weight"])[..., None], kw["A"],
                                    B[..., None], C[..., None], D=kw["D"], z=kw["z"][..., None],
                                    delta_bias=kw["dt_bias"], delta_softplus=True, initial_state=kw["ssm_state"],
                                    return_final_state=True, backend="reference")
    assert_close(y, expected[..., 0], 1e-12, "y")
    assert_close(conv_after, conv_state, 0.0, "conv_state")
    assert_close(ssm_after, last, 1e-12, "ssm_state")


CASES = [
    pytest.param((2, 70, 16, 5, 4), {}, id="d70-n16-w4"),  # channels past a block and a chunk
    pytest.param((1, 24, 4, 3, 2), {}, id="d24-one-block-w2"),
    pytest.param((3, 130, 8, 9, 4), dict(conv_bias=False, D=False), id="bare-d130"),
    pytest.param((2, 64, 16, 4, 1), {}, id="w1-no-conv-state"),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape,features", CASES)
def test_triton_matches_reference(shape, features, dtype, tol):
    kw = make(*shape, dtype=dtype, **features, seed=sum(shape))
    expected = run(kw, "reference")
    got = run(kw, "triton")
    for name, a, e in zip(["y", "conv_state", "ssm_state"], got, expected):
        assert a.dtype == e.dtype, name
        assert_close(a.float(), e.float(), tol, name)


def test_steps_through_a_sequence_like_the_scan():
    # Eight tokens, the states carried in place from one call to the next, against the scan of the
    # whole sequence from the same start (the kernels on the Triton backend).
    kw = make(2, 40, 8, 3, 4, seed=3)
    xs = torch.randn(2, 8, 80, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    conv_state, ssm_state = kw["conv_state"].clone(), kw["ssm_state"].clone()
    ys = []
    for t in range(8):
        args = dict(kw, x=xs[:, t, :40], z=xs[:, t, 40:], conv_state=conv_state, ssm_state=ssm_state)
        ys.append(mamba1_mixer_step(**args, backend="triton"))
    expected = []
    conv_ref, ssm_ref = kw["conv_state"].clone(), kw["ssm_state"].clone()
    for t in range(8):
        args = dict(kw, x=xs[:, t, :40], z=xs[:, t, 40:], conv_state=conv_ref, ssm_state=ssm_ref)
        expected.append(mamba1_mixer_step_reference(**args))
    assert_close(torch.stack(ys, 1), torch.stack(expected, 1), 1e-5, "y")
    assert_close(ssm_state, ssm_ref, 1e-5, "ssm_state")
    assert_close(conv_state, xs[:, 5:, :40].transpose(1, 2), 0.0, "conv_state: the last three inputs")


def test_custom_op_registration():
    import mambakit.ops.selective_scan.mixer_step_triton  # noqa: F401 (registers the custom op)

    kw = make(2, 40, 4, 2, 4, seed=5)
    order = ["x", "z", "conv_state", "conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "dt_bias", "A",
             "D", "ssm_state"]
    torch.library.opcheck(torch.ops.mambakit.mamba1_mixer_step.default, tuple(kw[k] for k in order),
                          test_utils=("test_schema", "test_faketensor"))


KW = make(2, 8, 4, 2, 4, seed=6)
ERRORS = {
    "z_shape": (dict(z=KW["z"][:, :5]), ValueError, "z: expected shape"),
    "z_dtype": (dict(z=KW["z"].double()), TypeError, "z: expected dtype"),
    "conv_state_width": (dict(conv_state=KW["conv_state"][..., :2]), ValueError, "conv_state: expected shape"),
    "x_proj_rows": (dict(x_proj_weight=KW["x_proj_weight"][:9]), ValueError, "x_proj_weight: expected shape"),
    "dt_proj_shape": (dict(dt_proj_weight=KW["dt_proj_weight"][:7]), ValueError, "dt_proj_weight: expected shape"),
    "A_shape": (dict(A=KW["A"][:, :3]), ValueError, "A: expected shape"),
    "ssm_state_dtype": (dict(ssm_state=KW["ssm_state"].half()), TypeError, "ssm_state: expected dtype"),
    "D_shape": (dict(D=KW["D"][:4]), ValueError, "D: expected shape"),
}


@pytest.mark.parametrize("change,error,match", ERRORS.values(), ids=ERRORS.keys())
def test_bad_inputs_are_named(change, error, match):
    with pytest.raises(error, match=match):
        mamba1_mixer_step(**dict(KW, **change))


@pytest.mark.parametrize("change,match", [
    (dict(ssm_state=KW["ssm_state"].transpose(1, 2).contiguous().transpose(1, 2)), "non-contiguous states"),
    (dict(ssm_state=KW["ssm_state"].double()), "float64"),
    (dict(x=KW["x"].t().contiguous().t()), "unit stride"),
], ids=["strided-state", "float64-state", "channel-strided-x"])
def test_what_the_kernels_do_not_take_is_refused_on_triton_and_runs_the_reference_on_auto(change, match, monkeypatch):
    kw = dict(KW, **change)
    with pytest.raises(ValueError, match=match):
        run(kw, "triton")
    monkeypatch.setenv("MAMBAKIT_BACKEND", "auto")
    if DEVICE == "cuda":  # auto takes the kernels only for CUDA tensors
        for a, e in zip(run(kw, None), run(kw, "reference")):
            assert_close(a.float(), e.float(), 1e-6, "auto fallback")
