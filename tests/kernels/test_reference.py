"""The references are oracles: check them against independent float64 formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import reference as R
from lowbit import packing
from lowbit import primitives as P
from lowbit.primitives import QParams


def _act_qp(x, bits):
    s, z = P.init_act_qparams(x, bits)
    return QParams(s, z, bits)


def test_layernorm_matches_torch(gen):
    x = torch.randn(5, 7, 48, generator=gen) * 3 + 1
    w, b = torch.randn(48, generator=gen), torch.randn(48, generator=gen)
    torch.testing.assert_close(R.layernorm(x, w, b, 1e-6), F.layer_norm(x, (48,), w, b, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_rescale_quantize_and_ln_variant(gen, bits):
    x = torch.randn(6, 32, generator=gen) * torch.linspace(0.1, 8, 32)
    r, shift = torch.rand(32, generator=gen) + 0.5, torch.randn(32, generator=gen)
    qp = _act_qp((x - shift) / r, bits)
    codes = R.rescale_quantize(x.half(), qp, r, shift)
    ref = torch.clamp(torch.round((x.half().double() - shift.double()) / r.double() / qp.s.double()) + qp.z, 0,
                      P.qmax(bits)) - P.code_offset(bits)
    assert codes.dtype == torch.int8
    assert (codes.double() != ref).float().mean() < 0.01  # float32 vs float64 only at exact rounding ties
    lw, lb = torch.rand(32, generator=gen) + 0.5, torch.randn(32, generator=gen)
    c2 = R.layernorm_rescale_quantize(x, lw, lb, 1e-5, qp, r, shift)
    c_torch = R.rescale_quantize(F.layer_norm(x, (32,), lw, lb, 1e-5), qp, r, shift)
    diff = (c2.int() - c_torch.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # two LayerNorm implementations: ties only
    with pytest.raises(ValueError, match="one per channel"):
        R.rescale_quantize(x, qp, torch.ones(31))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        R.rescale_quantize(x.double(), qp)


def test_rescale_fake_quantize_gradients_reach_all(gen):
    x = torch.randn(6, 16, generator=gen, requires_grad=True)
    r = (torch.rand(16, generator=gen) + 0.5).requires_grad_()
    sh = torch.randn(16, generator=gen).requires_grad_()
    s, z = torch.tensor(0.05, requires_grad=True), torch.tensor(7.0, requires_grad=True)
    y = R.rescale_fake_quantize(x, QParams(s, z, 4), r, sh)
    y.pow(2).sum().backward()
    for t in (x, r, sh, s, z):
        assert t.grad is not None and t.grad.abs().sum() > 0


@pytest.mark.parametrize("wbits", [1.58, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("abits", [4, 8])
@pytest.mark.parametrize("m,n,k", [(3, 7, 48), (197, 10, 200)])
def test_packed_linear_equals_float64(gen, wbits, abits, m, n, k):
    x, w, bias = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    qp = _act_qp(x, abits)
    sw, zw = P.init_weight_qparams(w, wbits)
    a = P.quantize(x, qp.s, qp.z, abits, signed=True)
    qw = P.quantize(w, sw, zw, wbits)
    pw = packing.pack(qw, wbits)
    y = R.packed_linear(a, qp, pw, sw.reshape(-1), zw.reshape(-1), bias)
    acc = (a.double() + P.code_offset(abits) - qp.z.double()) @ (qw.double() - zw.double()).T
    ref = acc * qp.s.double() * sw.double().reshape(1, -1) + bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    # epilogue options
    yg = R.packed_linear(a, qp, pw, sw.reshape(-1), zw.reshape(-1), bias, gelu=True, out_dtype=torch.float16)
    assert yg.dtype == torch.float16
    torch.testing.assert_close(yg.double(), F.gelu(ref), rtol=1e-2, atol=1e-2)
    rq = _act_qp(F.gelu(ref.float()), abits)
    codes = R.packed_linear(a, qp, pw, sw.reshape(-1), zw.reshape(-1), bias, gelu=True, requant=rq)
    assert codes.dtype == torch.int8
    assert (codes.int() - P.quantize(F.gelu(ref.float()), rq.s, rq.z, abits, signed=True).int()).abs().max() <= 1


def test_packed_linear_bad_input(gen):
    pw = packing.pack(torch.zeros(4, 8, dtype=torch.uint8), 4)
    qp = QParams(torch.tensor(0.1), torch.tensor(0.0), 8)
    with pytest.raises(TypeError, match="int8"):
        R.packed_linear(torch.zeros(2, 8), qp, pw, torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="K=9"):
        R.packed_linear(torch.zeros(2, 9, dtype=torch.int8), qp, pw, torch.ones(4), torch.zeros(4))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("l,swin", [(50, False), (49, True)])
def test_quant_attention_equals_float64(gen, bits, l, swin):
    b, h, d = (4, 3, 64)
    xs = [torch.randn(b, h, l, d, generator=gen) for _ in range(3)]
    qps = [_act_qp(t, bits) for t in xs]
    q, k, v = (P.quantize(t, qp.s, qp.z, bits, signed=True) for t, qp in zip(xs, qps))
    scale = d ** -0.5
    bias = torch.randn(h, l, l, generator=gen) if swin else None
    mask = torch.where(torch.rand(2, l, l, generator=gen) < 0.3, -100.0, 0.0) if swin else None
    o, pc = R.quant_attention(q, k, v, *qps, scale=scale, rel_bias=bias, mask=mask, return_codes=True)
    dq = [P.dequantize(t, qp.s, qp.z, bits).double() for t, qp in zip((q, k, v), qps)]
    sc = dq[0] @ dq[1].transpose(-1, -2) * scale
    if swin:
        sc = sc + bias.double()[None]
        sc = (sc.view(2, 2, h, l, l) + mask.double()[None, :, None]).view(b, h, l, l)
    p = torch.softmax(sc, -1)
    sp = 1.0 / P.qmax(bits)
    pq = torch.clamp(torch.round(p / sp), 0, P.qmax(bits))
    ties = (p / sp - torch.floor(p / sp) - 0.5).abs() < 1e-4
    assert torch.equal((pc.double() + P.code_offset(bits))[~ties], pq[~ties])
    ref = (pq * sp) @ dq[2]
    torch.testing.assert_close(o.double(), ref, rtol=1e-3, atol=float(qps[2].s) * 0.02)
    assert o.shape == (b, h, l, d)
    with pytest.raises(ValueError, match="rel_bias"):
        R.quant_attention(q, k, v, *qps, scale=scale, rel_bias=torch.zeros(h, l, l + 1))
    with pytest.raises(TypeError, match="int8"):
        R.quant_attention(q.float(), k, v, *qps, scale=scale)
