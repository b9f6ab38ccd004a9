"""Triton rescale-quantize and LayerNorm-quantize against kernels.reference (interpreter on CPU)."""
import pytest
import torch

from kernels import ops
from kernels import reference as R
from lowbit import primitives as P
from lowbit.primitives import QParams

from ._triton_util import assert_codes_match_up_to_ties, run_poisoned, triton_path

CASES = [  # (shape, dtype, bits, rescale, shift)
    ((1, 48), torch.float32, 8, True, True),
    ((3, 64), torch.float16, 4, True, False),
    ((197, 200), torch.bfloat16, 3, False, True),
    ((2, 3, 768), torch.float32, 6, False, False),
    ((5, 7, 10), torch.float16, 1.58, True, True),
]


def _inputs(gen, shape, dtype, bits, with_r, with_shift):
    c = shape[-1]
    x = (torch.randn(*shape, generator=gen) * torch.linspace(0.2, 6, c) + 0.3).to(dtype)
    r = torch.rand(c, generator=gen) + 0.5 if with_r else None
    sh = torch.randn(c, generator=gen) if with_shift else None
    s, z = P.init_act_qparams(P.apply_rescale(x.float(), r, sh), bits)
    return x, QParams(s, z, bits), r, sh


@pytest.mark.parametrize("shape,dtype,bits,with_r,with_shift", CASES)
def test_rescale_quantize_exact(gen, shape, dtype, bits, with_r, with_shift):
    x, qp, r, sh = _inputs(gen, shape, dtype, bits, with_r, with_shift)
    ref = R.rescale_quantize(x, qp, r, sh)
    with triton_path():
        out = run_poisoned(lambda: ops.quantize(x, qp, r, sh), 99, -99)
    assert out.dtype == torch.int8 and out.shape == x.shape
    assert torch.equal(out, ref)
    lo, hi = P.signed_range(bits)
    assert int(ref.min()) == lo and int(ref.max()) == hi  # the test exercises both clamps


def test_rescale_quantize_strided_input(gen):
    big = torch.randn(9, 100, generator=gen) * 2
    x = big[::2, 10:74]
    qp = QParams(*P.init_act_qparams(x, 4), 4)
    with triton_path():
        out = run_poisoned(lambda: ops.quantize(x, qp))
    assert torch.equal(out, R.rescale_quantize(x, qp))


@pytest.mark.parametrize("shape,dtype,bits,with_r,with_shift", CASES[:4])
def test_layernorm_quantize_matches_up_to_ties(gen, shape, dtype, bits, with_r, with_shift):
    x, _, r, sh = _inputs(gen, shape, dtype, bits, with_r, with_shift)
    c = shape[-1]
    lw, lb = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.3
    pre = P.apply_rescale(R.layernorm(x, lw, lb, 1e-6), r, sh)
    qp = QParams(*P.init_act_qparams(pre, bits), bits)
    ref = R.layernorm_rescale_quantize(x, lw, lb, 1e-6, qp, r, sh)
    with triton_path():
        out = run_poisoned(lambda: ops.layernorm_quantize(x, lw, lb, 1e-6, qp, r, sh), 99, -99)
        no_affine = ops.layernorm_quantize(x, None, None, 1e-5, qp)
    assert out.dtype == torch.int8 and out.shape == x.shape
    assert_codes_match_up_to_ties(out, ref, pre / qp.s)
    pre2 = R.layernorm(x, None, None, 1e-5)
    assert_codes_match_up_to_ties(no_affine, R.layernorm_rescale_quantize(x, None, None, 1e-5, qp), pre2 / qp.s)


def test_quantize_bad_input(gen):
    x = torch.randn(4, 16, generator=gen)
    qp = QParams(torch.tensor(0.1), torch.tensor(3.0), 4)
    with triton_path():
        with pytest.raises(TypeError, match="float32/float16/bfloat16"):
            ops.quantize(x.double(), qp)
        with pytest.raises(TypeError, match="float32/float16/bfloat16"):
            ops.quantize(x.to(torch.int32), qp)
        with pytest.raises(ValueError, match="one per channel"):
            ops.quantize(x, qp, r=torch.ones(15))
        with pytest.raises(ValueError, match="bits must be one of"):
            ops.quantize(x, QParams(qp.s, qp.z, 5.5))
        with pytest.raises(ValueError, match="> 0"):
            ops.quantize(x, QParams(torch.tensor(-0.1), qp.z, 4))
        with pytest.raises(ValueError, match="per-tensor scalar"):
            ops.quantize(x, QParams(torch.ones(16), qp.z, 4))
        with pytest.raises(ValueError, match="is on meta"):
            ops.quantize(x, qp, shift=torch.zeros(16, device="meta"))
        with pytest.raises(ValueError, match="one per channel"):
            ops.layernorm_quantize(x, torch.ones(8), None, 1e-6, qp)


@pytest.mark.parametrize("bits,s", [(4, 0.25), (8, 0.25), (8, 0.3)])
def test_exact_ties_round_half_to_even(bits, s):
    """x / s at (or next to) .5 ties: half-to-even rounding and true division (not x * (1/s)) are both needed."""
    x = (torch.arange(-120, 120, dtype=torch.float32) + 0.5).reshape(2, 120) * s
    qp = QParams(torch.tensor(s), torch.tensor(float(P.qmax(bits) // 2)), bits)
    with triton_path():
        out = ops.quantize(x, qp)
        fq = ops.fake_quantize(x, qp)
    assert torch.equal(out, R.rescale_quantize(x, qp))
    assert torch.equal(fq, R.rescale_fake_quantize(x, qp))
