"""Tests of the Mamba-1/2/3 mixer layers: checkpoint layout, initialisation, forward against
independent token loops, prefill + decode through the cache, dtypes and input errors."""

from __future__ import annotations

import math
import struct

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mambakit.cache import InferenceCache
from mambakit.layers import Mamba1, Mamba2, Mamba3
from mambakit.layers.mixer_common import derived_parameter
from tests.utils import assert_close

D_MODEL = 32


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Add noise to every parameter so that no init symmetry (ones, equal rows) hides a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return module


def inputs(seed: int, b: int = 2, l: int = 11, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, l, D_MODEL, generator=gen, dtype=torch.float64).to(dtype)


def param_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Parameter names and shapes. The expected tables are written out by hand from the official
# modules of state-spaces/mamba: mamba_ssm/modules/mamba_simple.py @ 52f57d66, mamba2.py @ 03a38fb2
# and mamba3.py @ 0348a3dd (d_model 32 throughout).
# ----------------------------------------------------------------------------------------------

LAYOUT_CASES = [
    pytest.param(
        Mamba1, {},
        # d_inner 64, dt_rank ceil(32 / 16) = 2, d_state 16, d_conv 4
        {"in_proj.weight": (128, 32), "conv1d.weight": (64, 1, 4), "conv1d.bias": (64,),
         "x_proj.weight": (2 + 2 * 16, 64), "dt_proj.weight": (64, 2), "dt_proj.bias": (64,),
         "A_log": (64, 16), "D": (64,), "out_proj.weight": (32, 64)},
        id="mamba1-default",
    ),
    pytest.param(
        Mamba1, dict(dt_rank=5, bias=True, conv_bias=False, d_state=8, d_conv=3),
        {"in_proj.weight": (128, 32), "in_proj.bias": (128,), "conv1d.weight": (64, 1, 3),
         "x_proj.weight": (5 + 2 * 8, 64), "dt_proj.weight": (64, 5), "dt_proj.bias": (64,),
         "A_log": (64, 8), "D": (64,), "out_proj.weight": (32, 64), "out_proj.bias": (32,)},
        id="mamba1-rank5-bias-noconvbias",
    ),
    pytest.param(
        Mamba2, dict(d_state=16, headdim=16),
        # d_inner 64, nheads 4, in_proj [z 64, xBC 64 + 2*16, dt 4] = 164, conv_dim 96
        {"in_proj.weight": (164, 32), "conv1d.weight": (96, 1, 4), "conv1d.bias": (96,),
         "dt_bias": (4,), "A_log": (4,), "D": (4,), "norm.weight": (64,), "out_proj.weight": (32, 64)},
        id="mamba2-default",
    ),
    pytest.param(
        Mamba2, dict(d_state=16, headdim=16, ngroups=2, D_has_hdim=True, rmsnorm=False, d_ssm=32, bias=True),
        # d_ssm 32 -> nheads 2, d_mlp 32; in_proj 2*64 + 2*2*16 + 2 = 194; conv_dim 32 + 64 = 96
        {"in_proj.weight": (194, 32), "in_proj.bias": (194,), "conv1d.weight": (96, 1, 4),
         "conv1d.bias": (96,), "dt_bias": (2,), "A_log": (2,), "D": (32,),
         "out_proj.weight": (32, 64), "out_proj.bias": (32,)},
        id="mamba2-groups2-hdimD-nonorm-dssm",
    ),
    pytest.param(
        Mamba3, dict(d_state=16, headdim=16),
        # h 4, r 1, g 1, n_angles floor(16 * 0.5 / 2) = 4: in_proj 2*64 + 2*16 + 3*4 + 4 = 176
        {"in_proj.weight": (176, 32), "dt_bias": (4,), "B_bias": (4, 1, 16), "C_bias": (4, 1, 16),
         "B_norm.weight": (16,), "C_norm.weight": (16,), "D": (4,), "out_proj.weight": (32, 64)},
        id="mamba3-siso",
    ),
    pytest.param(
        Mamba3, dict(d_state=16, headdim=16, rope_fraction=1.0, ngroups=2, is_outproj_norm=True),
        # n_angles 8, g 2: in_proj 128 + 2*16*2 + 12 + 8 = 212
        {"in_proj.weight": (212, 32), "dt_bias": (4,), "B_bias": (4, 1, 16), "C_bias": (4, 1, 16),
         "B_norm.weight": (16,), "C_norm.weight": (16,), "D": (4,), "norm.weight": (64,),
         "out_proj.weight": (32, 64)},
        id="mamba3-siso-rope1-groups2-outnorm",
    ),
    pytest.param(
        Mamba3, dict(d_state=16, headdim=16, is_mimo=True, mimo_rank=2),
        # r 2: in_proj 128 + 2*16*2 + 12 + 4 = 208
        {"in_proj.weight": (208, 32), "dt_bias": (4,), "B_bias": (4, 2, 16), "C_bias": (4, 2, 16),
         "B_norm.weight": (16,), "C_norm.weight": (16,), "mimo_x": (4, 2, 16), "mimo_z": (4, 2, 16),
         "mimo_o": (4, 2, 16), "D": (4,), "out_proj.weight": (32, 64)},
        id="mamba3-mimo2",
    ),
    pytest.param(
        Mamba3, dict(d_state=16, headdim=16, is_mimo=True, mimo_rank=4, rope_fraction=1.0, ngroups=2,
                     is_outproj_norm=True),
        # r 4, g 2, n_angles 8: in_proj 128 + 2*16*2*4 + 12 + 8 = 404
        {"in_proj.weight": (404, 32), "dt_bias": (4,), "B_bias": (4, 4, 16), "C_bias": (4, 4, 16),
         "B_norm.weight": (16,), "C_norm.weight": (16,), "mimo_x": (4, 4, 16), "mimo_z": (4, 4, 16),
         "mimo_o": (4, 4, 16), "D": (4,), "norm.weight": (64,), "out_proj.weight": (32, 64)},
        id="mamba3-mimo4-rope1-groups2-outnorm",
    ),
]


@pytest.mark.parametrize("cls, kwargs, expected", LAYOUT_CASES)
def test_parameter_names_and_shapes(cls, kwargs, expected):
    assert param_shapes(cls(D_MODEL, **kwargs)) == expected


# Parameters the official modules keep in float32 whatever the factory dtype (the rest follow it).
FP32_PARAMS = [
    pytest.param(Mamba1, {}, {"A_log", "D"}, id="mamba1"),
    pytest.param(Mamba2, dict(d_state=16, headdim=16), {"D"}, id="mamba2"),
    pytest.param(Mamba3, dict(d_state=16, headdim=16, is_mimo=True, mimo_rank=2),
                 {"dt_bias", "B_bias", "C_bias", "D", "mimo_x", "mimo_z", "mimo_o"}, id="mamba3-mimo"),
]


@pytest.mark.parametrize("cls, kwargs, fp32", FP32_PARAMS)
def test_parameter_dtypes_follow_the_official_modules(cls, kwargs, fp32):
    layer = cls(D_MODEL, dtype=torch.bfloat16, **kwargs)
    for name, p in layer.named_parameters():
        assert p.dtype == (torch.float32 if name in fp32 else torch.bfloat16), name


def test_state_dict_round_trip_between_layers():
    src = Mamba3(D_MODEL, d_state=16, headdim=16, is_mimo=True, mimo_rank=2)
    dst = Mamba3(D_MODEL, d_state=16, headdim=16, is_mimo=True, mimo_rank=2)
    dst.load_state_dict(src.state_dict(), strict=True)
    x = inputs(0, dtype=torch.float32)
    assert torch.equal(dst(x), src(x))


# ----------------------------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------------------------


def check_dt_bias(bias: torch.Tensor, dt_min=1e-3, dt_max=0.1):
    dt = F.softplus(bias.double())
    assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
    # log-uniform over two decades: both ends are reached with many channels, and the median sits
    # near the geometric mean sqrt(dt_min dt_max) = 0.01
    assert dt.min() < 2 * dt_min and dt.max() > dt_max / 2
    assert 0.004 < dt.median() < 0.025


def test_mamba1_init():
    torch.manual_seed(0)
    layer = Mamba1(64, d_state=8)  # d_inner 128, dt_rank 4
    expected_A_log = torch.log(torch.arange(1, 9, dtype=torch.float32)).expand(128, 8)
    assert torch.equal(layer.A_log.data, expected_A_log)
    assert torch.equal(layer.D.data, torch.ones(128))
    check_dt_bias(layer.dt_proj.bias.data)
    bound = 4**-0.5
    w = layer.dt_proj.weight.data
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and abs(w.mean()) < 0.1 * bound
    constant = Mamba1(64, dt_init="constant", dt_scale=2.0)
    assert torch.allclose(constant.dt_proj.weight.data, torch.full((128, 4), 2.0 * bound))
    floored = Mamba1(64, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-4)
    assert torch.allclose(F.softplus(floored.dt_proj.bias.double()), torch.full((128,), 1e-4, dtype=torch.float64))


def test_mamba2_init():
    torch.manual_seed(0)
    layer = Mamba2(256, d_state=8, headdim=4, conv_init=0.05)  # 128 heads
    A = torch.exp(layer.A_log.data)
    assert A.min() >= 1 and A.max() <= 16 and A.min() < 2 and A.max() > 15  # uniform on [1, 16]
    assert torch.equal(layer.D.data, torch.ones(128))
    check_dt_bias(layer.dt_bias.data)
    assert torch.equal(layer.norm.weight.data, torch.ones(512))
    assert layer.conv1d.weight.abs().max() <= 0.05
    hdim = Mamba2(32, d_state=8, headdim=16, D_has_hdim=True, A_init_range=(2, 3))
    assert torch.equal(hdim.D.data, torch.ones(64))
    assert (torch.exp(hdim.A_log) >= 2 - 1e-6).all() and (torch.exp(hdim.A_log) <= 3 + 1e-6).all()


@pytest.mark.parametrize("rank", [2, 4])
def test_mamba3_init(rank):
    torch.manual_seed(0)
    layer = Mamba3(256, d_state=16, headdim=4, is_mimo=True, mimo_rank=rank)  # 128 heads
    check_dt_bias(layer.dt_bias.data)
    for name in ("B_bias", "C_bias"):
        assert torch.equal(getattr(layer, name).data, torch.ones(128, rank, 16))
    assert torch.equal(layer.mimo_x.data, torch.full((128, rank, 4), 1.0 / rank))
    assert torch.equal(layer.mimo_z.data, torch.ones(128, rank, 4))
    assert torch.equal(layer.mimo_o.data, torch.full((128, rank, 4), 1.0 / rank))
    assert torch.equal(layer.D.data, torch.ones(128))
    assert torch.equal(layer.B_norm.weight.data, torch.ones(16))


# ----------------------------------------------------------------------------------------------
# Forward against token loops written out here from the official modules' math
# ----------------------------------------------------------------------------------------------


def gated_rms(y, weight, z, group, before_gate, eps=1e-5):
    if not before_gate:
        y = y * F.silu(z)
    yg = y.unflatten(-1, (-1, group))
    y = (yg * torch.rsqrt(yg.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight
    return y * F.silu(z) if before_gate else y


def mamba1_loop(m: Mamba1, u):
    b, l, _ = u.shape
    x, z = F.linear(u, m.in_proj.weight, m.in_proj.bias).chunk(2, dim=-1)  # (b, l, d)
    x = F.conv1d(x.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1, groups=m.d_inner)
    x = F.silu(x[..., :l]).transpose(1, 2)
    dt, B, C = torch.split(x @ m.x_proj.weight.T, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = F.softplus(F.linear(dt, m.dt_proj.weight, m.dt_proj.bias))  # (b, l, d)
    A = -torch.exp(m.A_log.double())
    h, ys = torch.zeros(b, m.d_inner, m.d_state, dtype=u.dtype), []
    for t in range(l):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + m.D * x[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


def mamba2_loop(m: Mamba2, u):
    b, l, _ = u.shape
    gn, d_mlp = m.ngroups * m.d_state, m.d_inner - m.d_ssm
    zxbcdt = F.linear(u, m.in_proj.weight, m.in_proj.bias)
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, m.d_ssm, m.d_ssm + 2 * gn, m.nheads], dim=-1)
    xBC = F.conv1d(xBC.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1, groups=xBC.shape[-1])
    xBC = F.silu(xBC[..., :l]).transpose(1, 2)
    x, B, C = torch.split(xBC, [m.d_ssm, gn, gn], dim=-1)
    x = x.reshape(b, l, m.nheads, m.headdim)
    per_group = m.nheads // m.ngroups
    B = B.reshape(b, l, m.ngroups, m.d_state).repeat_interleave(per_group, dim=2)  # (b, l, h, n)
    C = C.reshape(b, l, m.ngroups, m.d_state).repeat_interleave(per_group, dim=2)
    dt = F.softplus(dt + m.dt_bias).clamp(*m.dt_limit)
    A = -torch.exp(m.A_log)
    D = m.D.reshape(m.nheads, m.headdim) if m.D_has_hdim else m.D[:, None]
    h, ys = torch.zeros(b, m.nheads, m.headdim, m.d_state, dtype=u.dtype), []
    for t in range(l):
        write = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]  # (b, h, p, n)
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + write
        ys.append((h * C[:, t, :, None, :]).sum(-1) + D * x[:, t])
    y = torch.stack(ys, dim=1).reshape(b, l, m.d_ssm)
    if m.rmsnorm:
        y = gated_rms(y, m.norm.weight, z, m.d_ssm // m.ngroups, m.norm_before_gate)
    else:
        y = y * F.silu(z)
    if d_mlp:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


def rotate_pairs(v, phi, pairs):
    """Rotate (v[a], v[c]) by phi[i] for the i-th pair (a, c): (cos a - sin c, sin a + cos c)."""
    out = v.clone()
    for i, (a, c) in enumerate(pairs):
        cos, sin = torch.cos(phi[..., i]), torch.sin(phi[..., i])
        out[..., a] = cos * v[..., a] - sin * v[..., c]
        out[..., c] = sin * v[..., a] + cos * v[..., c]
    return out


def mamba3_loop(m: Mamba3, u):
    """The official step reference (tests/ops/triton/test_mamba3_siso.py, tests/ops/tilelang/
    test_mamba3_mimo.py) around the module's projections (mamba3.py), one token at a time."""
    b, l, _ = u.shape
    r, g, h, p, n, na = m.mimo_rank, m.num_bc_heads, m.nheads, m.headdim, m.d_state, m.num_rope_angles
    z, x, B, C, dd_dt, dd_A, trap, ang = torch.split(
        u @ m.in_proj.weight.T, [m.d_inner, m.d_inner, r * g * n, r * g * n, h, h, h, na], dim=-1)
    z, x = z.reshape(b, l, h, p), x.reshape(b, l, h, p)

    def norm_heads(t, w, bias):  # (b, l, r g n) -> RMS over n, head j reads group j // (h / g), + bias
        t = t.reshape(b, l, r, g, n)
        t = t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-5) * w
        return t.repeat_interleave(h // g, dim=3).permute(0, 1, 3, 2, 4) + bias  # (b, l, h, r, n)

    K_raw, Q_raw = norm_heads(B, m.B_norm.weight, m.B_bias), norm_heads(C, m.C_norm.weight, m.C_bias)
    A = torch.minimum(-F.softplus(dd_A), torch.tensor(-m.A_floor, dtype=u.dtype))
    dt = F.softplus(dd_dt + m.dt_bias)
    lam = torch.sigmoid(trap)
    pairs = [(2 * i, 2 * i + 1) for i in range(na)] if not m.is_mimo else [(i, i + n // 2) for i in range(na)]
    mx = m.mimo_x if m.is_mimo else torch.ones(h, 1, p, dtype=u.dtype)
    mz = m.mimo_z if m.is_mimo else torch.ones(h, 1, p, dtype=u.dtype)
    mo = m.mimo_o if m.is_mimo else torch.ones(h, 1, p, dtype=u.dtype)

    phi = torch.zeros(b, h, na, dtype=u.dtype)
    H = torch.zeros(b, h, p, n, dtype=u.dtype)
    K_prev = torch.zeros(b, h, r, n, dtype=u.dtype)
    v_prev = torch.zeros(b, h, r, p, dtype=u.dtype)
    outs = []
    for t in range(l):
        phi = phi + math.pi * torch.tanh(ang[:, t, None, :]) * dt[:, t, :, None]
        K = rotate_pairs(K_raw[:, t], phi[:, :, None], pairs)  # (b, h, r, n)
        Q = rotate_pairs(Q_raw[:, t], phi[:, :, None], pairs)
        v = x[:, t, :, None, :] * mx  # (b, h, r, p)
        alpha = torch.exp(dt[:, t] * A[:, t])
        beta, gamma = (1 - lam[:, t]) * dt[:, t] * alpha, lam[:, t] * dt[:, t]
        H = (alpha[..., None, None] * H
             + beta[..., None, None] * torch.einsum("bhrp,bhrn->bhpn", v_prev, K_prev)
             + gamma[..., None, None] * torch.einsum("bhrp,bhrn->bhpn", v, K))
        y = torch.einsum("bhpn,bhrn->bhrp", H, Q) + m.D[:, None, None] * v  # (b, h, r, p)
        zr = z[:, t, :, None, :] * mz  # (b, h, r, p)
        if m.is_outproj_norm:
            y = gated_rms(y.transpose(1, 2).reshape(b, r, h * p), m.norm.weight,
                          zr.transpose(1, 2).reshape(b, r, h * p), p, True)
            y = y.reshape(b, r, h, p).transpose(1, 2)
        else:
            y = y * F.silu(zr)
        outs.append((y * mo).sum(2).reshape(b, h * p))
        K_prev, v_prev = K, v
    return torch.stack(outs, dim=1) @ m.out_proj.weight.T


MAMBA3_CASES = {
    "siso": dict(d_state=16, headdim=16, chunk_size=4),
    "siso-rope1-groups2-outnorm": dict(d_state=16, headdim=8, rope_fraction=1.0, ngroups=2,
                                       is_outproj_norm=True, chunk_size=4),
    "mimo2": dict(d_state=16, headdim=16, is_mimo=True, mimo_rank=2, chunk_size=4),
    "mimo4-groups2-outnorm": dict(d_state=8, headdim=16, is_mimo=True, mimo_rank=4, ngroups=2,
                                  is_outproj_norm=True, chunk_size=3),
}

LOOP_CASES = [
    pytest.param(Mamba1, dict(d_state=8), mamba1_loop, id="mamba1"),
    pytest.param(Mamba1, dict(d_state=4, dt_rank=3, bias=True, conv_bias=False, d_conv=3), mamba1_loop,
                 id="mamba1-bias"),
    pytest.param(Mamba2, dict(d_state=8, headdim=8, ngroups=2, d_ssm=48, chunk_size=4), mamba2_loop,
                 id="mamba2-groups2-dssm"),
    pytest.param(Mamba2, dict(d_state=8, headdim=16, rmsnorm=False, D_has_hdim=True, dt_limit=(0.01, 0.5),
                              norm_before_gate=True, chunk_size=5, bias=True), mamba2_loop,
                 id="mamba2-nonorm-hdimD-dtlimit"),
    pytest.param(Mamba2, dict(d_state=8, headdim=16, norm_before_gate=True, chunk_size=5), mamba2_loop,
                 id="mamba2-norm-before-gate"),
] + [pytest.param(Mamba3, kw, mamba3_loop, id=f"mamba3-{name}") for name, kw in MAMBA3_CASES.items()]


@pytest.mark.parametrize("cls, kwargs, loop", LOOP_CASES)
def test_forward_matches_token_loop(cls, kwargs, loop):
    layer = perturb(cls(D_MODEL, **kwargs).double(), seed=1)
    u = inputs(2, l=11)
    with torch.no_grad():
        assert_close(layer(u), loop(layer, u), 1e-10, cls.__name__)


# ----------------------------------------------------------------------------------------------
# Prefill + decode through the cache
# ----------------------------------------------------------------------------------------------

CACHE_CASES = [
    pytest.param(Mamba1, dict(d_state=8), id="mamba1"),
    pytest.param(Mamba2, dict(d_state=8, headdim=8, ngroups=2, d_ssm=48, chunk_size=4), id="mamba2"),
] + [pytest.param(Mamba3, kw, id=f"mamba3-{name}") for name, kw in MAMBA3_CASES.items()]


@pytest.mark.parametrize("cls, kwargs", CACHE_CASES)
@pytest.mark.parametrize("k", [1, 5])
def test_prefill_then_decode_matches_full_forward(cls, kwargs, k):
    layer = perturb(cls(D_MODEL, layer_idx=3, **kwargs).double(), seed=3)
    u = inputs(4, l=11)
    cache = InferenceCache(max_batch_size=2, max_seqlen=16)
    with torch.no_grad():
        full = layer(u)
        outs = [layer(u[:, :k], inference_params=cache)]
        stored = cache.states[3]
        ptrs = [t.data_ptr() for t in stored]
        for t in range(k, u.shape[1]):
            cache.seqlen_offset = t
            outs.append(layer(u[:, t : t + 1], inference_params=cache))
    assert_close(torch.cat(outs, dim=1), full, 1e-10, "prefill + decode")
    assert cache.states[3] is stored and [t.data_ptr() for t in stored] == ptrs


@pytest.mark.parametrize("cls, kwargs", CACHE_CASES)
def test_chunks_and_step_continue_the_cache(cls, kwargs):
    """Multi-token continuation (seqlen_offset > 0, l > 1) and step() give the full forward; a
    cache with more rows than the batch is filled in its first rows only."""
    layer = perturb(cls(D_MODEL, layer_idx=0, **kwargs).double(), seed=5)
    u = inputs(6, l=12)
    cache = InferenceCache(max_batch_size=3, max_seqlen=16)
    with torch.no_grad():
        full = layer(u)
        a = layer(u[:, :3], inference_params=cache)
        cache.seqlen_offset = 3
        bb = layer(u[:, 3:10], inference_params=cache)
        states = tuple(t[:2] for t in cache.states[0])
        steps = [layer.step(u[:, t : t + 1], *states) for t in range(10, 12)]
    assert all(s[1 + i] is states[i] for s in steps for i in range(len(states)))
    got = torch.cat([a, bb] + [s[0] for s in steps], dim=1)
    assert_close(got, full, 1e-10, "chunks + step")
    assert all((t[2:] == 0).all() for t in cache.states[0])


@pytest.mark.parametrize("cls, kwargs", CACHE_CASES[:2])
def test_decoding_follows_in_place_parameter_updates(cls, kwargs):
    """Decode steps remember A = -exp(A_log) (and Mamba-1's fp32 D and dt bias) between tokens;
    an in-place update of the parameters (an optimizer step) must reach the next step."""
    layer = perturb(cls(D_MODEL, layer_idx=0, **kwargs).double(), seed=7)
    u = inputs(8, l=3)

    def decode():
        cache = InferenceCache(max_batch_size=2, max_seqlen=4)
        with torch.no_grad():
            layer(u[:, :2], inference_params=cache)
            cache.seqlen_offset = 2
            stepped = layer(u[:, 2:], inference_params=cache)
        return stepped, layer(u)[:, 2:].detach()  # with autograd on: nothing remembered

    stepped, full = decode()
    assert_close(stepped, full, 1e-10, "before the update")
    remembered = dict(layer._derived_parameters)
    assert decode()[0].equal(stepped) and all(layer._derived_parameters[k][1] is v[1] for k, v in remembered.items())
    with torch.no_grad():
        layer.A_log.add_(0.5)
        layer.D.mul_(2.0)
    stepped_after, full_after = decode()
    assert_close(stepped_after, full_after, 1e-10, "after the update")
    assert not torch.allclose(stepped_after, stepped)


def test_a_new_tensor_at_a_reused_address_is_not_taken_for_the_old():
    """A remembered value belongs to its source tensors, not to their address: a parameter
    replaced by a new one that the allocator put at the old one's address (same dtype, version 0)
    must be derived anew."""
    module = nn.Module()
    memory = bytearray(struct.pack("2f", 1.0, 2.0))
    first = torch.frombuffer(memory, dtype=torch.float32)
    with torch.no_grad():
        assert derived_parameter(module, "neg", lambda: -first, first).tolist() == [-1.0, -2.0]
        memory[:] = struct.pack("2f", 3.0, 4.0)  # written outside torch: no version bump
        second = torch.frombuffer(memory, dtype=torch.float32)
        assert (second.data_ptr(), second._version) == (first.data_ptr(), first._version)
        assert derived_parameter(module, "neg", lambda: -second, second).tolist() == [-3.0, -4.0]
        assert derived_parameter(module, "neg", lambda: -second * 0, second).tolist() == [-3.0, -4.0]  # kept


@pytest.mark.parametrize("cls, kwargs", CACHE_CASES)
def test_allocated_cache_layout(cls, kwargs):
    layer = cls(D_MODEL, **kwargs)
    states = layer.allocate_inference_cache(3, 10)
    assert all((t == 0).all() for t in states)
    if cls is Mamba1:
        expected = [((3, 64, 3), torch.float32), ((3, 64, 8), torch.float32)]
    elif cls is Mamba2:
        expected = [((3, 48 + 2 * 2 * 8, 3), torch.float32), ((3, 6, 8, 8), torch.float32)]
    else:
        h, p, n, r = layer.nheads, layer.headdim, layer.d_state, layer.mimo_rank
        expected = [((3, h, layer.num_rope_angles), torch.float32), ((3, h, p, n), torch.float32),
                    ((3, r, h, n), torch.float32), ((3, h, p), torch.float32)]
    assert [(tuple(t.shape), t.dtype) for t in states] == expected
    bf16 = layer.allocate_inference_cache(1, 10, dtype=torch.bfloat16)
    ssm_index = {Mamba1: [1], Mamba2: [1], Mamba3: [0, 1]}[cls]
    assert [t.dtype for t in bf16] == [torch.float32 if i in ssm_index else torch.bfloat16 for i in range(len(bf16))]


def test_prefill_resets_and_cache_without_layer_idx_is_rejected():
    layer = perturb(Mamba2(D_MODEL, d_state=8, headdim=8, layer_idx=0).double(), seed=7)
    u = inputs(8, l=6)
    cache = InferenceCache(2, 16)
    with torch.no_grad():
        layer(u, inference_params=cache)
        again = layer(u, inference_params=cache)  # seqlen_offset still 0: a fresh prefill
        assert_close(again, layer(u), 1e-12, "second prefill")
    with pytest.raises(ValueError, match="layer_idx"):
        Mamba1(D_MODEL)(u.float(), inference_params=InferenceCache(2, 16))


# ----------------------------------------------------------------------------------------------
# Packed sequences (Mamba-2 seq_idx)
# ----------------------------------------------------------------------------------------------


def test_mamba2_seq_idx_packs_independent_sequences():
    layer = perturb(Mamba2(D_MODEL, d_state=8, headdim=8, ngroups=2, chunk_size=4).double(), seed=9)
    u = inputs(10, b=1, l=13)
    seq_idx = torch.tensor([[0] * 6 + [1] * 7])
    with torch.no_grad():
        packed = layer(u, seq_idx=seq_idx)
        apart = torch.cat([layer(u[:, :6]), layer(u[:, 6:])], dim=1)
    assert_close(packed, apart, 1e-10, "packed")


@pytest.mark.parametrize("kwargs", [MAMBA3_CASES["siso"], MAMBA3_CASES["mimo4-groups2-outnorm"]], ids=["siso", "mimo"])
def test_mamba3_seq_idx_packs_independent_sequences(kwargs):
    """Packed rows equal separate calls, and a cache filled by a packed prefill continues the
    row's last sequence."""
    layer = perturb(Mamba3(D_MODEL, layer_idx=0, **kwargs).double(), seed=9)
    u = inputs(11, b=1, l=14)
    seq_idx = torch.tensor([[0] * 6 + [1] * 5 + [0] * 3])
    with torch.no_grad():
        packed = layer(u, seq_idx=seq_idx)
        apart = torch.cat([layer(u[:, :6]), layer(u[:, 6:11]), layer(u[:, 11:])], dim=1)
        cache = InferenceCache(max_batch_size=1, max_seqlen=16)
        layer(u[:, :13], inference_params=cache, seq_idx=seq_idx[:, :13])
        cache.seqlen_offset = 13
        last = layer(u[:, 13:], inference_params=cache)
    assert_close(packed, apart, 1e-10, "packed")
    assert_close(last, apart[:, 13:], 1e-10, "cache after a packed prefill")


# ----------------------------------------------------------------------------------------------
# bf16 against fp32
# ----------------------------------------------------------------------------------------------

BF16_CASES = [
    pytest.param(Mamba1, dict(d_state=8), id="mamba1"),
    pytest.param(Mamba2, dict(d_state=16, headdim=16, chunk_size=8), id="mamba2"),
    pytest.param(Mamba3, dict(d_state=16, headdim=16, chunk_size=8), id="mamba3-siso"),
    pytest.param(Mamba3, dict(d_state=16, headdim=16, is_mimo=True, mimo_rank=2, is_outproj_norm=True,
                              chunk_size=8), id="mamba3-mimo-outnorm"),
]


@pytest.mark.parametrize("cls, kwargs", BF16_CASES)
def test_bf16_matches_fp32(cls, kwargs):
    ref = perturb(cls(D_MODEL, layer_idx=0, **kwargs), seed=11, scale=0.1)
    low = cls(D_MODEL, layer_idx=0, **kwargs).to(torch.bfloat16)
    low.load_state_dict(ref.state_dict())
    u = inputs(12, l=20, dtype=torch.float32)
    with torch.no_grad():
        y_ref = ref(u)
        y = low(u.to(torch.bfloat16))
        cache = InferenceCache(2, 32)
        y_cached = torch.cat([low(u[:, :15].to(torch.bfloat16), cache)]
                             + [_decode(low, cache, u, t) for t in range(15, 20)], dim=1)
    assert y.dtype == torch.bfloat16 and y_cached.dtype == torch.bfloat16
    assert_close(y, y_ref, 3e-2, "bf16 forward")
    assert_close(y_cached, y_ref, 3e-2, "bf16 cached")


def _decode(layer, cache, u, t):
    cache.seqlen_offset = t
    return layer(u[:, t : t + 1].to(torch.bfloat16), cache)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, kwargs", [pytest.param(Mamba1, {}, id="mamba1"),
                                         pytest.param(Mamba2, dict(d_state=8, headdim=16), id="mamba2"),
                                         pytest.param(Mamba3, dict(d_state=8, headdim=16), id="mamba3")])
@pytest.mark.parametrize("shape", [(2, 5, 31), (5, 32), (1, 2, 5, 32), (2, 0, 32)], ids=str)
def test_bad_hidden_states(cls, kwargs, shape):
    layer = cls(D_MODEL, **kwargs)
    with pytest.raises(ValueError, match="hidden_states"):
        layer(torch.randn(shape))


def test_step_takes_one_token():
    layer = Mamba2(D_MODEL, d_state=8, headdim=16)
    with pytest.raises(ValueError, match="hidden_states"):
        layer.step(torch.randn(2, 3, D_MODEL), *layer.allocate_inference_cache(2, 8))


@pytest.mark.parametrize("cls, kwargs, match", [
    pytest.param(Mamba2, dict(headdim=16, d_ssm=40), "d_ssm", id="mamba2-dssm-not-multiple"),
    pytest.param(Mamba2, dict(headdim=16, d_ssm=80), "d_ssm", id="mamba2-dssm-too-large"),
    pytest.param(Mamba2, dict(headdim=16, ngroups=3), "ngroups", id="mamba2-groups"),
    pytest.param(Mamba2, dict(A_init_range=(0, 4)), "A_init_range", id="mamba2-A-range"),
    pytest.param(Mamba2, dict(process_group=object()), "process_group", id="mamba2-process-group"),
    pytest.param(Mamba1, dict(dt_init="xavier"), "dt_init", id="mamba1-dt-init"),
    pytest.param(Mamba3, dict(headdim=24), "headdim", id="mamba3-headdim"),
    pytest.param(Mamba3, dict(headdim=16, rope_fraction=0.25), "rope_fraction", id="mamba3-rope"),
    pytest.param(Mamba3, dict(headdim=16, ngroups=3), "ngroups", id="mamba3-groups"),
    pytest.param(Mamba3, dict(headdim=16, d_state=2, rope_fraction=0.5), "d_state", id="mamba3-no-angle"),
])
def test_bad_constructor_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(D_MODEL, **kwargs)
