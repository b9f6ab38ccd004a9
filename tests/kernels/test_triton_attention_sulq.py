"""Triton SULQ attention (table-dequantized P, float P V) against kernels.reference.quant_attention.

As for the uniform kernel, a probability code may flip by one where ``-log2(P + eta) / sp`` sits within 1e-3 of a
rounding tie (the kernel's own online softmax sums and log2); each flip moves an output by at most
``sv * max|table step| * max|v - zv|``.
"""
import pytest
import torch

from kernels import ops
from kernels import reference as R
from lowbit import primitives as P
from lowbit.primitives import QParams

from ._triton_util import run_poisoned, triton_path


def _setup(gen, shape, bits):
    xs = [torch.randn(*shape, generator=gen) * (1.0 + i) for i in range(3)]
    qps = [QParams(*P.init_act_qparams(t, bits), bits) for t in xs]
    codes = [P.quantize(t, qp.s, qp.z, bits, signed=True) for t, qp in zip(xs, qps)]
    return codes, qps


@pytest.mark.parametrize("b,h,l,bits,swin,published", [(4, 2, 49, 4, True, False), (2, 1, 50, 3, False, False),
                                                        (1, 2, 197, 8, False, False), (4, 2, 49, 4, True, True),
                                                        (2, 1, 50, 3, False, True), (1, 2, 197, 8, False, True)])
def test_sulq_attention_matches_reference(gen, passes, b, h, l, bits, swin, published):
    _sulq_matches_reference(gen, b, h, l, bits, swin, published)
    kind, asked = passes
    assert asked and {t for t, _ in asked} == {"one" if kind == "one pass" else "two"}


@pytest.mark.parametrize("d", [32, 128])
def test_sulq_attention_other_head_dims(gen, passes, d):
    """Head dims 32 and 128 (64: above) on both paths; the comparisons with the reference are in the helper."""
    _sulq_matches_reference(gen, 2, 2, 197, 4, False, True, d=d)
    _sulq_matches_reference(gen, 4, 2, 49, 8, True, True, d=d)
    kind, asked = passes
    assert sorted({l for _, l in asked}) == [49, 197] and {t for t, _ in asked} == {"one" if kind == "one pass"
                                                                                   else "two"}


def _sulq_matches_reference(gen, b, h, l, bits, swin, published, d=64):
    (q, k, v), qps = _setup(gen, (b, h, l, d), bits)
    scale = d ** -0.5
    bias = torch.randn(h, l, l, generator=gen) if swin else None
    mask = torch.where(torch.rand(2, l, l, generator=gen) < 0.3, -100.0, 0.0) if swin else None
    ref_p = torch.softmax(torch.randn(256, l, generator=gen) * 2, -1)
    sq = P.init_sulq_published(ref_p, bits) if published else P.init_sulq_params(ref_p, bits)
    assert sq.pow2 == published and (float(sq.x0) != 0) == published
    ref, pc = R.quant_attention(q, k, v, *qps, scale=scale, p_qp=sq, rel_bias=bias, mask=mask, return_codes=True)

    # the reference's own P codes and P V, from plain pieces
    zq, zk = (P.signed_zero_point(qp.z, bits) for qp in qps[:2])
    sc = P.int_gemm(q, k, zq, zk).float() * (scale * float(qps[0].s) * float(qps[1].s))
    if swin:
        sc = sc + bias[None]
        sc = (sc.view(b // 2, 2, h, l, l) + mask[None, :, None]).view(b, h, l, l)
    prob = torch.softmax(sc, -1)
    # the published grid has 2^bits + 1 levels (257 at 8 bits: unsigned int16 codes)
    assert P.n_levels(sq.bits) == 2 ** bits + published
    signed = P.n_levels(sq.bits) <= 256
    assert torch.equal(pc, P.sulq_quantize(prob, sq.eta, sq.s, sq.z, sq.bits, signed=signed, x0=sq.x0))
    uc = P.unsigned_codes(pc, sq.bits)
    assert int(uc.max()) == P.qmax(sq.bits)  # the top code (p near 0 or 1, by the direction) is reached
    sv, zv = float(qps[2].s), float(P.signed_zero_point(qps[2].z, bits))
    table = P.sulq_table(*sq)
    plain = (table[uc].double() @ (v.double() - zv)) * sv
    torch.testing.assert_close(ref.double(), plain, rtol=1e-5, atol=1e-5)

    with triton_path():
        out = run_poisoned(lambda: ops.quant_attention(q, k, v, *qps, scale=scale, p_qp=sq, rel_bias=bias,
                                                       mask=mask))
    assert out.dtype == torch.float32 and out.shape == (b, h, l, d)
    pre = (-torch.log2(torch.softmax(sc.double(), -1) + float(sq.eta)) - float(sq.x0)) / float(sq.s)
    ties = ((pre - torch.floor(pre) - 0.5).abs() < 1e-3).sum(-1, keepdim=True).double()
    step = float((table[:-1] - table[1:]).abs().max())
    flip = (v.double() - zv).abs().amax(-2, keepdim=True) * sv * step
    mag = (table[uc].double().abs() @ (v.double() - zv).abs()) * sv
    fp = 1e-5 * (mag + sv)  # float P V: rounding scales with sum |P_hat| |v - zv|, not with |O|
    err = (out.double() - ref.double()).abs()
    assert bool((err <= ties * flip + fp).all()), f"max error {float(err.max()):.3g} beyond tie flips"
    assert float((err > fp).double().mean()) < 0.02


def test_sulq_attention_bad_eta(gen):
    (q, k, v), qps = _setup(gen, (1, 1, 16, 32), 4)
    bad = P.SULQParams(torch.tensor(0.0), torch.tensor(0.3), torch.tensor(0.0), 4)
    with triton_path(), pytest.raises(ValueError, match="eta must be > 0"):
        ops.quant_attention(q, k, v, *qps, scale=0.25, p_qp=bad)
    with pytest.raises(ValueError, match="eta must be"):
        R.quant_attention(q, k, v, *qps, scale=0.25, p_qp=bad)


@pytest.mark.parametrize("b,h,l,bits,swin", [(4, 2, 49, 4, True), (2, 1, 50, 3, False)])
@pytest.mark.parametrize("one_pass", [True, False])
def test_sulq_attention_gpu_tiles(gen, monkeypatch, b, h, l, bits, swin, one_pass):
    """The tiles chosen for a GPU (:func:`kernels.configs.one_pass_config` / ``attention_config``), run by the
    interpreter."""
    from kernels import configs as C
    used = []
    name = "one_pass_config" if one_pass else "attention_config"
    real = getattr(C, name)
    monkeypatch.setattr(C, "ONE_PASS_SULQ", one_pass)
    gpu = C.Target(interpreted=False, arch=90)
    monkeypatch.setattr(C.Target, "of", staticmethod(lambda t: gpu))
    monkeypatch.setattr(C, name, lambda *a, **k: used.append(real(*a, **k)) or used[-1])
    _sulq_matches_reference(gen, b, h, l, bits, swin, published=False)
    assert used and all(u == real(l, 64, gpu, swin, True) for u in used)
    assert used[0][2].get("num_stages") == 1  # nothing loops (one pass) / SULQ's unpipelined loops
    if not one_pass:
        assert used[0][2].get("num_warps") == 4  # the GPU tiles (D = 64), not the interpreter's
        assert used[0][2].get("maxnreg") == (168 if swin else None)  # biased: ptxas would stop at 128 and spill
