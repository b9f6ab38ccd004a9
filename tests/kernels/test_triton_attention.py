"""Triton quantized attention against kernels.reference.quant_attention (interpreter on CPU).

The kernel normalises P with its own (online) sums, so a probability code may differ from the reference's by
one where ``P / sp`` sits within 1e-3 of a rounding tie; each such flip moves an output by at most
``sp * sv * max|v - zv|``. Everything else must agree to float32 rounding.
"""
import pytest
import torch

from kernels import ops
from kernels import reference as R
from lowbit import primitives as P
from lowbit.primitives import QParams

from ._triton_util import run_poisoned, triton_path


def _codes(gen, shape, bits):
    xs = [torch.randn(*shape, generator=gen) * (1.0 + i) for i in range(3)]
    qps = [QParams(*P.init_act_qparams(t, bits), bits) for t in xs]
    return [P.quantize(t, qp.s, qp.z, bits, signed=True) for t, qp in zip(xs, qps)], qps


@pytest.mark.parametrize("b,h,l,bits,swin", [
    (4, 2, 49, 8, True),
    (2, 3, 50, 4, False),
    (1, 2, 197, 8, False),
    (2, 1, 197, 3, False),
    (1, 2, 128, 8, False),  # whole key tiles only: no masked last tile
])
def test_quant_attention_matches_reference(gen, passes, b, h, l, bits, swin):
    kind, asked = passes
    _matches_reference(gen, b, h, l, bits, swin)
    assert asked and {t for t, _ in asked} == {"one" if kind == "one pass" else "two"}


def test_quant_attention_long_sequence_runs_two_passes(gen, monkeypatch):
    """577 tokens (ViT at 384 px) exceed one key tile: the two-pass kernel, by default."""
    from kernels import configs as C
    asked = []
    real = C.attention_config
    monkeypatch.setattr(C, "attention_config", lambda *a, **k: asked.append(a[0]) or real(*a, **k))
    _matches_reference(gen, 1, 1, 577, 8, False)
    assert asked == [577]


@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("spread", ["random", "large and tiny"])
def test_quant_attention_head_dims_and_extreme_rows(gen, passes, d, spread):
    """Every head dim the package takes; rows whose scores span a wide range (a few keys dominate: most codes 0, one
    near qmax) next to rows of near-equal scores (every P tiny)."""
    _matches_reference(gen, 2, 2, 197, 8, False, d=d, spread=spread)
    _matches_reference(gen, 8, 2, 49, 4, True, d=d, spread=spread)


def _matches_reference(gen, b, h, l, bits, swin, d=64, spread="random"):
    (q, k, v), qps = _codes(gen, (b, h, l, d), bits)
    if spread != "random":  # query rows alternately scaled up (peaked softmax) and to zero codes (flat softmax)
        zq = P.signed_zero_point(qps[0].z, bits)
        big = torch.arange(l) % 2 == 0
        q = torch.where(big[None, None, :, None], q, torch.full_like(q, int(zq)))
        qps[0] = QParams(qps[0].s * 8, qps[0].z, bits)
    scale = d ** -0.5
    bias = torch.randn(h, l, l, generator=gen) if swin else None
    mask = torch.where(torch.rand(2, l, l, generator=gen) < 0.3, -100.0, 0.0) if swin else None
    ref, pc = R.quant_attention(q, k, v, *qps, scale=scale, rel_bias=bias, mask=mask, return_codes=True)
    with triton_path():
        out = run_poisoned(lambda: ops.quant_attention(q, k, v, *qps, scale=scale, rel_bias=bias, mask=mask))
    assert out.dtype == torch.float32 and out.shape == (b, h, l, d)

    # near-ties of the reference's P / sp, counted per query row
    zq, zk = (P.signed_zero_point(qp.z, bits) for qp in qps[:2])
    sc = P.int_gemm(q, k, zq, zk).float() * (scale * float(qps[0].s) * float(qps[1].s))
    if swin:
        sc = sc + bias[None]
        sc = (sc.view(b // 2, 2, h, l, l) + mask[None, :, None]).view(b, h, l, l)
    pre = torch.softmax(sc.double(), -1) * P.qmax(bits)
    ties = ((pre - torch.floor(pre) - 0.5).abs() < 1e-3).sum(-1, keepdim=True).double()
    sv, zv = float(qps[2].s), P.signed_zero_point(qps[2].z, bits)
    flip = (v.double() - float(zv)).abs().amax(-2, keepdim=True) * sv / P.qmax(bits)
    fp = 1e-5 * (ref.abs().double() + sv)
    err = (out.double() - ref.double()).abs()
    assert bool((err <= ties * flip + fp).all()), f"max error {float(err.max()):.3g} beyond tie flips"
    assert float((err > fp).double().mean()) < 0.02


def test_quant_attention_custom_p_quantizer(gen, passes):
    (q, k, v), qps = _codes(gen, (2, 2, 50, 64), 8)
    p_qp = QParams(torch.tensor(1.0 / 200), torch.tensor(3.0), 8)
    ref = R.quant_attention(q, k, v, *qps, scale=0.125, p_qp=p_qp)
    with triton_path():
        out = ops.quant_attention(q, k, v, *qps, scale=0.125, p_qp=p_qp)
    assert float((out - ref).abs().max()) <= 0.05 * float(ref.abs().max())
    assert float((out - ref).abs().gt(1e-5 * (ref.abs() + 1)).double().mean()) < 0.02


def test_quant_attention_bad_input(gen):
    (q, k, v), qps = _codes(gen, (2, 2, 49, 64), 4)
    with triton_path():
        with pytest.raises(TypeError, match="int8"):
            ops.quant_attention(q.float(), k, v, *qps, scale=0.125)
        with pytest.raises(ValueError, match="shapes differ"):
            ops.quant_attention(q, k[:, :, :10], v, *qps, scale=0.125)
        with pytest.raises(ValueError, match="head dim"):
            ops.quant_attention(q[..., :48], k[..., :48], v[..., :48], *qps, scale=0.125)
        with pytest.raises(ValueError, match=r"head dim 16 is not supported.*supported: 32, 64, 128"):
            ops.quant_attention(q[..., :16], k[..., :16], v[..., :16], *qps, scale=0.125)
        with pytest.raises(ValueError, match="rel_bias"):
            ops.quant_attention(q, k, v, *qps, scale=0.125, rel_bias=torch.zeros(2, 49, 50))
        with pytest.raises(ValueError, match="mask"):
            ops.quant_attention(q, k, v, *qps, scale=0.125, mask=torch.zeros(3, 49, 49))
        with pytest.raises(ValueError, match="bits must be one of"):
            ops.quant_attention(q, k, v, qps[0], qps[1], QParams(qps[2].s, qps[2].z, 10), scale=0.125)
        with pytest.raises(ValueError, match="is on meta"):
            ops.quant_attention(q, k, v, *qps, scale=0.125, rel_bias=torch.zeros(2, 49, 49, device="meta"))


@pytest.mark.parametrize("b,h,l,bits,swin", [(4, 2, 49, 8, True), (2, 3, 50, 4, False), (1, 2, 197, 8, False)])
@pytest.mark.parametrize("one_pass", [True, False])
def test_quant_attention_gpu_tiles(gen, monkeypatch, b, h, l, bits, swin, one_pass):
    """The tiles chosen for a GPU (:func:`kernels.configs.one_pass_config` / ``attention_config``), run by the
    interpreter."""
    from kernels import configs as C
    used = []
    name = "one_pass_config" if one_pass else "attention_config"
    real = getattr(C, name)
    if not one_pass:
        monkeypatch.setattr(C, "ONE_PASS_MAX_L", 0)
    gpu = C.Target(interpreted=False, arch=90)
    monkeypatch.setattr(C.Target, "of", staticmethod(lambda t: gpu))
    monkeypatch.setattr(C, name, lambda *a, **k: used.append(real(*a, **k)) or used[-1])
    _matches_reference(gen, b, h, l, bits, swin)
    assert used and all(u == real(l, 64, gpu, swin) for u in used)
    if one_pass:  # the whole key row in one tile
        assert used[0][1] == C.pow2(l, 32) and used[0][2].get("num_stages") == 1
    else:
        assert used[0][2].get("num_warps") == (8 if swin else 4)  # the GPU tiles (D = 64), not the interpreter's


def test_one_pass_refuses_long_sequences():
    from kernels import configs as C
    from kernels import library as L
    q = torch.zeros(1, 1, 300, 64, dtype=torch.int8)
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="at most 256 tokens"):
        L.quant_attention_launch(q, q, q, torch.zeros(1, 1, 300, 64), None, None, z, z, z, z,
                                 dict(sp_ptr=z, zp_ptr=z, pv_scale_ptr=z), 8.0, C.Target(interpreted=True),
                                 one_pass=True)
    assert C.attention_one_pass(197) and C.attention_one_pass(256) and not C.attention_one_pass(577)
    assert not C.attention_one_pass(197, sulq=True)  # SULQ: two passes unless ONE_PASS_SULQ (fewer instructions)
