"""The residual-fused LayerNorm-quantize (``kernels.ops.add_layernorm_quantize``): Triton (interpreter) and the CPU
backend against kernels.reference, bit for bit."""
import pytest
import torch

from kernels import configs as C
from kernels import library as L
from kernels import ops
from kernels import reference as R
from kernels.ops import _act_qparams
from lowbit import primitives as P
from lowbit.primitives import QParams

from ._triton_util import poisoned, triton_path

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TARGETS = {"sm_90": C.Target(interpreted=False, arch=90),
           "sm_90 one SM": C.Target(interpreted=False, arch=90, num_sms=1)}


def _params(gen, c, affine, rescale):
    lw = torch.rand(c, generator=gen) + 0.5 if affine else None
    lb = torch.randn(c, generator=gen) * 0.3 if affine else None
    r = torch.rand(c, generator=gen) + 0.5 if rescale else None
    sh = torch.randn(c, generator=gen) * 0.2 if rescale else None
    return lw, lb, r, sh


def _qp(x, lw, lb, r, sh, bits=4):
    return QParams(*P.init_act_qparams(P.apply_rescale(R.layernorm(x, lw, lb, 1e-6), r, sh), bits), bits)


def _fused(x, d, lw, lb, qp, r, sh):
    """``ops.add_layernorm_quantize`` on the Triton path with every output allocation poisoned (NaN / 99, then NaN
    / -99): both results must not depend on the poison."""
    outs = []
    for v in (99, -99):
        with triton_path(), poisoned(v):
            outs.append(ops.add_layernorm_quantize(x, d, lw, lb, 1e-6, qp, r, sh))
    (xn, codes), (xn2, codes2) = outs
    assert torch.equal(codes, codes2) and torch.equal(xn, xn2), "some outputs were never written"
    assert bool(torch.isfinite(xn.float()).all())
    return xn, codes


def _launch(x, d, lw, lb, qp, r, sh, target):
    """``(x_new, codes)`` of the launch that ``target`` would make, run by the interpreter."""
    s, zr = _act_qparams(x, qp)
    xn = torch.full(x.shape, float("nan"), dtype=x.dtype)
    out = torch.full(x.shape, 99, dtype=torch.int8)
    L.layernorm_quantize_launch(x, out, lw, lb, 1e-6, r, sh, s, zr, float(qp.bits), target, delta=d, x_new=xn)()
    return xn, out


@pytest.mark.parametrize("c", (384, 768, 200, 760))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine,rescale", [(True, False), (False, True), (True, True), (False, False)])
def test_bit_exact(gen, ieee_sqrt, c, dtype, affine, rescale):
    """``x_new = x + delta`` of exact-sum rows (:func:`kernels.reference.exact_sum_rows`; ``delta`` and ``x`` never
    0): ``x_new`` and the codes equal the reference's (its square root IEEE, as on a GPU) bit for bit on the Triton
    path (37 rows: a partial last tile, under the interpreter's and the sm_90 layouts) and on the CPU backend."""
    xn_ref = R.exact_sum_rows(37, c, dtype, gen)
    k = torch.randint(1, 17, (37, c), generator=gen) * (torch.randint(0, 2, (37, c), generator=gen) * 2 - 1)
    d = (k.float() / 16).to(dtype)  # x_new: odd multiples of 1/32, d: of 1/16, so x = x_new - d is never 0 either
    x = (xn_ref.float() - d.float()).to(dtype)
    assert torch.equal((x.float() + d.float()).to(dtype), xn_ref) and bool((x != 0).all())
    lw, lb, r, sh = _params(gen, c, affine, rescale)
    qp = _qp(xn_ref, lw, lb, r, sh)
    ref_xn, ref = R.add_layernorm_rescale_quantize(x, d, lw, lb, 1e-6, qp, r, sh)
    assert torch.equal(ref_xn, xn_ref) and len(torch.unique(ref)) > 8
    xn, codes = _fused(x, d, lw, lb, qp, r, sh)
    assert xn.dtype == dtype and codes.dtype == torch.int8
    assert torch.equal(xn, ref_xn) and torch.equal(codes, ref)
    for name, target in TARGETS.items():
        got = _launch(x, d, lw, lb, qp, r, sh, target)
        assert torch.equal(got[0], ref_xn) and torch.equal(got[1], ref), name
    with ops.using_backend("cpu"):
        cpu_xn, cpu_codes = ops.add_layernorm_quantize(x, d, lw, lb, 1e-6, qp, r, sh)
    assert torch.equal(cpu_xn, ref_xn) and torch.equal(cpu_codes, ref)


@pytest.mark.parametrize("dtype,ddtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                          (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                          (torch.float16, torch.float32)])
def test_rounding_of_the_sum(gen, ieee_sqrt, dtype, ddtype):
    """Random ``x`` and ``delta`` whose sums round: ``x_new`` is torch's ``(x + delta).to(x.dtype)`` bit for bit
    (the bfloat16 rounding too, which the interpreter's own cast truncates), and the codes are those of
    ``layernorm_quantize(x_new)`` (the same kernel and layout: bit for bit) and the reference's up to rounding ties
    (the row sums' order differs from torch's)."""
    c = 768
    x = (torch.randn(3, 41, c, generator=gen) * 3 + 0.5).to(dtype)
    d = (torch.randn(3, 41, c, generator=gen) * 0.37).to(ddtype)
    lw, lb, r, sh = _params(gen, c, True, True)
    want = (x + d).to(dtype)
    assert not torch.equal(want.double(), x.double() + d.double())  # the sums do round
    qp = _qp(want, lw, lb, r, sh)
    xn, codes = _fused(x, d, lw, lb, qp, r, sh)
    assert xn.shape == x.shape and torch.equal(xn, want)
    with triton_path():
        assert torch.equal(codes, ops.layernorm_quantize(want, lw, lb, 1e-6, qp, r, sh))
    ref_xn, ref = R.add_layernorm_rescale_quantize(x, d, lw, lb, 1e-6, qp, r, sh)
    assert torch.equal(ref_xn, want)
    pre = P.apply_rescale(R.layernorm(want, lw, lb, 1e-6), r, sh) / qp.s
    diff = (codes.int() - ref.int()).abs()
    frac = pre.double() - torch.floor(pre.double())
    assert int(diff.max()) <= 1 and bool(((frac - 0.5).abs() < 1e-3)[diff > 0].all())
    with ops.using_backend("cpu"):
        cpu_xn, cpu_codes = ops.add_layernorm_quantize(x, d, lw, lb, 1e-6, qp, r, sh)
    assert torch.equal(cpu_xn, want) and torch.equal(cpu_codes, ref)


def test_bad_inputs(gen):
    x = torch.randn(4, 16, generator=gen)
    qp = QParams(torch.tensor(0.1), torch.tensor(3.0), 4)
    for backend in ("triton", "cpu"):
        with ops.using_backend(backend):
            with pytest.raises(ValueError, match="delta must have x's shape"):
                ops.add_layernorm_quantize(x, x[:, :8], None, None, 1e-6, qp)
            with pytest.raises(TypeError, match="delta must be a float32/float16/bfloat16"):
                ops.add_layernorm_quantize(x, x.to(torch.int32), None, None, 1e-6, qp)
            with pytest.raises(TypeError, match="x must be a float32/float16/bfloat16"):
                ops.add_layernorm_quantize(x.double(), x, None, None, 1e-6, qp)
            with pytest.raises(ValueError, match="one per channel"):
                ops.add_layernorm_quantize(x, x, torch.ones(8), None, 1e-6, qp)
            with pytest.raises(ValueError, match="is on meta"):
                ops.add_layernorm_quantize(x, x.to("meta"), None, None, 1e-6, qp)


def test_opcheck_and_empty(gen):
    x, d = torch.randn(3, 20, generator=gen), torch.randn(3, 20, generator=gen)
    f = torch.tensor([0.1]), torch.tensor([7.0])
    torch.library.opcheck(L.add_layernorm_quantize.op, (x, d, None, torch.ones(20), 1e-6, None, None, *f, 4.0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    e = torch.empty(0, 5, 20)
    qp = QParams(torch.tensor(0.1), torch.tensor(3.0), 4)
    with triton_path():
        xn, codes = ops.add_layernorm_quantize(e, e, None, None, 1e-6, qp)
    assert xn.shape == codes.shape == e.shape and codes.dtype == torch.int8
