"""Triton fake-quant forward and STE/LSQ backward against the reference autograd (interpreter on CPU)."""
import pytest
import torch

from kernels import ops
from kernels import reference as R
from lowbit import primitives as P
from lowbit.primitives import QParams

from ._triton_util import poisoned, run_poisoned, triton_path


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _assert_grads_close(a, b, g, name):
    assert (a is None) == (b is None), name
    if a is None:
        return
    scale = float(g.abs().sum()) * 1e-6 + 1e-6
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=scale, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("shape,dtype,bits,with_r,with_shift", [
    ((3, 64), torch.float32, 4, True, True),
    ((197, 48), torch.float32, 8, False, True),
    ((2, 5, 200), torch.float16, 3, True, False),
    ((1, 768), torch.bfloat16, 6, False, False),
    ((7, 10), torch.float32, 1.58, True, True),
])
def test_fake_quantize_forward_and_gradients(gen, shape, dtype, bits, with_r, with_shift):
    c = shape[-1]
    x0 = (torch.randn(*shape, generator=gen) * 2 + 0.2).to(dtype)
    r0 = torch.rand(c, generator=gen) + 0.5 if with_r else None
    sh0 = torch.randn(c, generator=gen) * 0.3 if with_shift else None
    s0, z0 = P.init_act_qparams(P.apply_rescale(x0.float(), r0, sh0), bits, percentiles=(2, 98))  # both clamps hit
    z0 = z0 + 0.3  # a non-integer zero point: the forward rounds it
    g = torch.randn(*shape, generator=gen)

    xr, rr, shr, sr, zr = _leaves(x0, r0, sh0, s0, z0)
    ref = R.rescale_fake_quantize(xr, QParams(sr, zr, bits), rr, shr)
    ref.backward(g)

    xt, rt, sht, st, zt = _leaves(x0, r0, sh0, s0, z0)
    with triton_path():
        out = run_poisoned(lambda: ops.fake_quantize(xt, QParams(st, zt, bits), rt, sht))
    assert out.dtype == torch.float32 and out.shape == x0.shape
    assert torch.equal(out, ref.detach())
    with triton_path(), torch.no_grad():
        assert torch.equal(run_poisoned(lambda: ops.fake_quantize(xt, QParams(st, zt, bits), rt, sht)), out)
    with triton_path(), poisoned():
        out.backward(g)
    for name, a, b in (("x", xt, xr), ("r", rt, rr), ("shift", sht, shr), ("s", st, sr), ("z", zt, zr)):
        _assert_grads_close(None if a is None else a.grad, None if b is None else b.grad, g, name)
    assert xt.grad.dtype == dtype and float(st.grad.abs()) > 0 and float(zt.grad.abs()) > 0


@pytest.mark.parametrize("bits,dtype", [(1.58, torch.float32), (4, torch.float16), (3, torch.float32)])
def test_fake_quantize_weight_per_channel(gen, bits, dtype):
    w0 = torch.randn(10, 200, generator=gen).to(dtype)
    s0, z0 = P.init_weight_qparams(w0.float(), bits, percentiles=(3, 97))
    g = torch.randn(10, 200, generator=gen)
    wr, sr, zr = _leaves(w0, s0, z0)
    ref = P.fake_quantize(wr, sr, zr, bits)
    ref.backward(g)
    wt, st, zt = _leaves(w0, s0, z0)
    with triton_path():
        out = run_poisoned(lambda: ops.fake_quantize_weight(wt, st, zt, bits))
    assert torch.equal(out, ref.detach())
    with triton_path(), poisoned():
        out.backward(g)
    assert st.grad.shape == (10, 1) and zt.grad.shape == (10, 1)
    for name, a, b in (("w", wt, wr), ("s", st, sr), ("z", zt, zr)):
        _assert_grads_close(a.grad, b.grad, g, name)


def test_fake_quantize_bad_input_and_identity(gen):
    x = torch.randn(4, 16, generator=gen)
    qp = QParams(torch.tensor(0.1), torch.tensor(3.0), 4)
    with triton_path():
        assert ops.fake_quantize(x, QParams(qp.s, qp.z, 16)) is x or torch.equal(ops.fake_quantize(x, QParams(
            qp.s, qp.z, 16)), x)
        with pytest.raises(TypeError, match="float32/float16/bfloat16"):
            ops.fake_quantize(x.to(torch.int8), qp)
        with pytest.raises(ValueError, match="one value"):
            ops.fake_quantize(x, QParams(torch.full((16,), 0.1), qp.z, 4))
        with pytest.raises(ValueError, match="NaN or inf"):
            ops.fake_quantize(x.masked_fill(x > 1, float("nan")), qp)
        with pytest.raises(ValueError, match=r"\[N, 1\]"):
            ops.fake_quantize_weight(x, torch.ones(3, 1), torch.zeros(3, 1), 4)
        with pytest.raises(ValueError, match="2-D"):
            ops.fake_quantize_weight(x[0], torch.ones(1), torch.zeros(1), 4)
        with pytest.raises(ValueError, match="bits must be one of"):
            ops.fake_quantize_weight(x, torch.ones(4, 1), torch.zeros(4, 1), 9)
