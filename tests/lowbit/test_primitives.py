import pytest
import torch

from lowbit import primitives as P

BITS = [1.58, 2, 3, 4, 6, 8]


def _qparams(gen, bits, shape=()):
    s = torch.rand(shape, generator=gen) * 0.2 + 0.05
    z = torch.ones(shape) if bits == 1.58 else torch.randint(0, P.qmax(bits) + 1, shape, generator=gen).float()
    return s, z


@pytest.mark.parametrize("bits", BITS)
def test_codes_in_range_and_error_bounded(gen, bits):
    x = torch.randn(64, 96, generator=gen) * 2
    s, z = _qparams(gen, bits, (64, 1))
    q = P.quantize(x, s, z, bits)
    assert q.dtype == torch.uint8 and int(q.max()) <= P.qmax(bits)
    xh = P.dequantize(q, s, z, bits)
    lo, hi = -z * s, (P.qmax(bits) - z) * s
    inside = (x >= lo - s / 2) & (x <= hi + s / 2)
    assert inside.any()
    err = (xh - x).abs()
    assert bool((err[inside] <= (s.expand_as(x)[inside] / 2) * (1 + 1e-6)).all())
    # outside the range the value is clipped to the nearest level
    assert torch.equal(xh[~inside], torch.where(x < lo, lo, hi).expand_as(x)[~inside])


@pytest.mark.parametrize("bits", BITS)
def test_signed_storage_roundtrip(gen, bits):
    x = torch.randn(32, 40, generator=gen)
    s, z = _qparams(gen, bits)
    qu, qs = P.quantize(x, s, z, bits), P.quantize(x, s, z, bits, signed=True)
    assert qs.dtype == torch.int8
    assert torch.equal(qs.to(torch.int32) + P.code_offset(bits), qu.to(torch.int32))
    assert torch.equal(P.dequantize(qu, s, z, bits), P.dequantize(qs, s, z, bits))
    lo, hi = P.signed_range(bits)
    assert int(qs.min()) >= lo and int(qs.max()) <= hi


def test_ternary_levels(gen):
    w = torch.randn(16, 50, generator=gen)
    s, z = P.init_weight_qparams(w, 1.58)
    assert torch.equal(z, torch.ones_like(z))
    wh = P.fake_quantize(w, s, z, 1.58)
    assert set(torch.unique(torch.round(wh / s)).tolist()) <= {-1.0, 0.0, 1.0}
    # the searched step beats the plain max-abs step
    s0 = w.abs().amax(1, keepdim=True)
    assert (P.fake_quantize(w, s, z, 1.58) - w).pow(2).sum() < (P.fake_quantize(w, s0, z, 1.58) - w).pow(2).sum()


def test_rounding_is_half_to_even():
    s, z = torch.tensor(1.0), torch.tensor(8.0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    assert P.quantize(x, s, z, 4).tolist() == [8, 10, 10, 8, 6]


@pytest.mark.parametrize("bits", [1.58, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_gradients_match_formulas(gen, bits, per_channel):
    x = (torch.randn(8, 33, generator=gen) * 1.5).requires_grad_()
    shape = (8, 1) if per_channel else ()
    s, z = _qparams(gen, bits, shape)
    s.requires_grad_(); z.requires_grad_()
    g = torch.randn(8, 33, generator=gen)
    P.fake_quantize(x, s, z, bits).backward(g)
    # closed forms
    qm = P.qmax(bits)
    r = torch.round(x.detach() / s.detach())
    v = r + z.detach()
    inside = (v >= 0) & (v <= qm)
    below = v < 0
    assert torch.equal(x.grad, g * inside)
    ds = torch.where(inside, r - x.detach() / s.detach(), torch.where(below, -z.detach(), qm - z.detach()))
    dz = torch.where(inside, torch.zeros_like(r), -s.detach().expand_as(r))
    red = (lambda t: t.sum()) if not per_channel else (lambda t: t.sum(1, keepdim=True))
    torch.testing.assert_close(s.grad, red(g * ds))
    torch.testing.assert_close(z.grad, red(g * dz))
    # and the same as autograd through a round-STE composition (clamp written with where: inclusive bounds)
    x2, s2, z2 = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    zi = P.round_ste(z2)
    v2 = P.round_ste(x2 / s2) + zi
    y2 = (torch.where(v2 < 0, torch.zeros_like(v2), torch.where(v2 > qm, torch.full_like(v2, qm), v2)) - zi) * s2
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(s2.grad, s.grad, rtol=1e-4, atol=1e-5)  # float32 sums in another order
    torch.testing.assert_close(z2.grad, z.grad, rtol=1e-4, atol=1e-5)


def test_step_gradient_matches_finite_difference_where_clipped(gen):
    """Clipped elements are linear in s, so finite differences are exact there."""
    x = torch.randn(200, generator=gen, dtype=torch.float64) * 4
    s, z, bits = torch.tensor(0.1, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64), 3
    clip = (torch.round(x / s) + z < 0) | (torch.round(x / s) + z > P.qmax(bits))
    assert clip.sum() > 10
    sg = s.clone().requires_grad_()
    P.fake_quantize(x[clip], sg, z, bits).sum().backward()
    h = 1e-6
    fd = (P.fake_quantize(x[clip], s + h, z, bits).sum() - P.fake_quantize(x[clip], s - h, z, bits).sum()) / (2 * h)
    torch.testing.assert_close(sg.grad, fd)


def test_percentile_init(gen):
    x = torch.randn(10000, generator=gen)
    s, z = P.init_act_qparams(x, 8, (1.0, 99.0))
    lo, hi = torch.quantile(x, 0.01), torch.quantile(x, 0.99)
    assert abs(float(s) - float(hi - lo) / 255) < 2e-3
    assert abs(float(-z * s) - float(lo)) <= float(s)
    relu = torch.relu(x)  # all >= 0: zero point 0 keeps zero exact
    s, z = P.init_act_qparams(relu, 4)
    assert float(z) == 0.0
    w = torch.randn(7, 300, generator=gen)
    s, z = P.init_weight_qparams(w, 4)
    assert s.shape == (7, 1) and z.shape == (7, 1)
    torch.testing.assert_close(s, (w.amax(1, keepdim=True) - w.amin(1, keepdim=True)) / 15)


def test_rescale_fold_preserves_linear(gen):
    lin = torch.nn.Linear(48, 20).double()
    x = torch.randn(5, 48, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 30, 48, dtype=torch.float64)
    lo, hi = x.amin(0), x.amax(0)
    r, shift = P.smooth_rescale_shift(lo, hi, lin.weight)
    assert not torch.allclose(r, torch.ones_like(r))
    w2, b2 = P.fold_rescale(lin.weight, lin.bias, r, shift)
    y = lin(x)
    y2 = P.apply_rescale(x, r, shift) @ w2.T + b2
    torch.testing.assert_close(y2, y, rtol=1e-12, atol=1e-10)
    # the rescaled channels are more even than the raw ones
    xr = P.apply_rescale(x, r, shift)
    ratio = lambda t: float(t.abs().amax(0).max() / t.abs().amax(0).min())
    assert ratio(xr) < ratio(x)


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 5, 64), (33, 17, 770)])
def test_int_gemm_equals_float64(gen, m, n, k):
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    za = int(torch.randint(-128, 128, (1,), generator=gen))
    zw = torch.randint(-128, 128, (n,), generator=gen)
    got = P.int_gemm(a, w, za, zw)
    ref = (a.double() - za) @ (w.double() - zw.double()[:, None]).T
    assert got.dtype == torch.int32
    assert torch.equal(got.double(), ref)
    sa, sw = torch.tensor(0.02), torch.rand(n, generator=gen) + 0.01
    bias = torch.randn(n, generator=gen)
    y = P.int_linear(a, sa, za, w, sw, zw, bias)
    torch.testing.assert_close(y.double(), ref * float(sa) * sw.double() + bias.double(), rtol=1e-6, atol=1e-5)


def test_int_gemm_matches_dequantized_matmul(gen):
    """Integer semantics agree with the fake-quant float matmul the optimiser trains with."""
    x, w = torch.randn(9, 40, generator=gen), torch.randn(6, 40, generator=gen)
    sa, za = P.init_act_qparams(x, 8)
    sw, zw = P.init_weight_qparams(w, 4)
    qa, qw = P.quantize(x, sa, za, 8, signed=True), P.quantize(w, sw, zw, 4)
    y_int = P.int_linear(qa, sa, P.signed_zero_point(za, 8), qw, sw, zw)
    y_fq = P.fake_quantize(x, sa, za, 8) @ P.fake_quantize(w, sw, zw, 4).T
    torch.testing.assert_close(y_int, y_fq, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.tensor([1.0, float("nan")])), "NaN or inf"),
    (dict(x=torch.tensor([1.0, float("inf")])), "NaN or inf"),
    (dict(s=torch.tensor(0.0)), "must be > 0"),
    (dict(s=torch.tensor(-1.0)), "must be > 0"),
    (dict(x=torch.tensor([1, 2])), "floating-point"),
    (dict(bits=9), "bits must be one of"),
    (dict(bits=1), "bits must be one of"),
    (dict(s=torch.ones(3, 1)), "does not broadcast"),
])
def test_bad_input_raises(bad, match):
    args = dict(x=torch.randn(4, 5), s=torch.tensor(0.1), z=torch.tensor(3.0), bits=4)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        P.quantize(args["x"], args["s"], args["z"], args["bits"])
    with pytest.raises((ValueError, TypeError), match=match):
        P.fake_quantize(args["x"], args["s"], args["z"], args["bits"])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="equal K"):
        P.int_gemm(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 5, dtype=torch.int8), 0, torch.zeros(4))
    with pytest.raises(TypeError, match="integer codes"):
        P.int_gemm(torch.zeros(2, 3), torch.zeros(4, 3, dtype=torch.int8), 0, torch.zeros(4))
    with pytest.raises(ValueError, match="one per input channel"):
        P.fold_rescale(torch.randn(4, 5), None, torch.ones(4))
    with pytest.raises(ValueError, match="percentile"):
        P.percentile(torch.randn(10), 101)


@pytest.mark.parametrize("k,hi,a_lo", [(64, 2, -1), (64, 15, -8), (770, 255, -128), (4096, 255, -128)])
def test_int_linear_is_the_rounded_int_gemm(k, hi, a_lo):
    """``int_linear``'s centred float GEMM (float32, or float64 past 2^24) gives bit for bit
    ``sa * sw * float32(int_gemm) + bias``."""
    g = torch.Generator().manual_seed(k + hi)
    a = torch.randint(a_lo, -a_lo, (3, 9, k), generator=g, dtype=torch.int8)
    w = torch.randint(0, hi + 1, (11, k), generator=g, dtype=torch.uint8)
    zw = torch.randint(0, hi + 1, (11,), generator=g)
    za = int(torch.randint(a_lo, -a_lo, (1,), generator=g))
    sw, bias = torch.rand(11, generator=g) + 0.01, torch.randn(11, generator=g)
    y = P.int_linear(a.reshape(-1, k), 0.037, za, w, sw, zw, bias)
    want = P.int_gemm(a.reshape(-1, k), w, za, zw).float() * (0.037 * sw.reshape(1, -1)) + bias
    assert torch.equal(y, want)


@pytest.mark.parametrize("k,hi", [(64, 15), (1024, 255), (4096, 255)])
def test_int_gemm_exact_on_both_float_paths(k, hi):
    """Small products go through float32, large ones (``K max|a| max|w| >= 2^24``) through float64: exact either
    way, against an int64 sum."""
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-128, 128, (2, 5, k), generator=g, dtype=torch.int8)
    w = torch.randint(0, hi + 1, (7, k), generator=g, dtype=torch.uint8)
    zw = torch.randint(0, hi + 1, (7,), generator=g)
    got = P.int_gemm(a, w, -3, zw)
    want = ((a.long() + 3)[..., None, :] * (w.long() - zw[:, None])).sum(-1)
    assert got.dtype == torch.int32 and torch.equal(got.long(), want)


@pytest.mark.parametrize("hw", [(16, 24), (18, 27)])
def test_unpatchify_is_the_gradient_of_patchify(gen, hw):
    """``unpatchify`` inverts ``patchify`` and, where H, W leave a remainder, is exactly patchify's autograd
    gradient (zeros where the remainder was dropped)."""
    x = torch.randn(2, 3, *hw, generator=gen, requires_grad=True)
    y = P.patchify(x, (4, 3))
    g = torch.randn(y.shape, generator=gen)
    (ref,) = torch.autograd.grad(y, x, g)
    got = P.unpatchify(g, (4, 3), x.shape)
    assert torch.equal(got, ref)
    kh, kw = hw[0] // 4 * 4, hw[1] // 3 * 3
    assert torch.equal(P.unpatchify(y.detach(), (4, 3), x.shape)[:, :, :kh, :kw], x.detach()[:, :, :kh, :kw])
    assert bool((got[:, :, kh:] == 0).all() and (got[:, :, :, kw:] == 0).all())
    assert hw == (16, 24) or got[:, :, kh:].numel() > 0  # the second case has a dropped remainder
