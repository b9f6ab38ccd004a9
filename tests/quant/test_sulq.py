"""SULQ (I&S-ViT shift-uniform-log2 quantizer) against plain per-element Python math."""
import math

import pytest
import torch

from lowbit import primitives as P


def _probs(gen, shape=(6, 40), temp=3.0):
    return torch.softmax(torch.randn(*shape, generator=gen) * temp, -1)


def _plain_code(p, eta, s, z, bits):
    v = -math.log2(p + eta) / s
    return min(max(round(v) + z, 0), P.qmax(bits)), v


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_sulq_codes_and_values_match_plain_math(gen, bits):
    p = _probs(gen)
    eta, s, z = 2.0 ** -6, 0.37, 1.0
    codes = P.sulq_quantize(p, eta, s, z, bits)
    signed = P.sulq_quantize(p, eta, s, z, bits, signed=True)
    assert codes.dtype == torch.uint8 and signed.dtype == torch.int8
    assert torch.equal(signed.int(), codes.int() - P.code_offset(bits))
    checked = 0
    for pv, c in zip(p.double().flatten().tolist(), codes.flatten().tolist()):
        want, pre = _plain_code(pv, eta, s, int(z), bits)
        if abs(pre - math.floor(pre) - 0.5) > 1e-4:
            assert c == want
            checked += 1
    assert checked > 0.99 * p.numel()
    deq = P.sulq_dequantize(signed, eta, s, z, bits)
    plain = torch.tensor([2.0 ** (-(c - z) * s) - eta for c in codes.flatten().tolist()]).view_as(p)
    torch.testing.assert_close(deq, plain.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(P.sulq_dequantize(codes, eta, s, z, bits), deq, rtol=0, atol=0)
    table = P.sulq_table(eta, s, z, bits)
    assert table.shape == (P.n_levels(bits),)
    torch.testing.assert_close(table, torch.tensor([2.0 ** (-(q - z) * s) - eta for q in range(P.n_levels(bits))],
                                                   dtype=torch.float32), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(P.sulq_fake_quantize(p, eta, torch.tensor(s), torch.tensor(z), bits), deq,
                               rtol=1e-6, atol=1e-7)


def test_sulq_fake_quantize_gradients(gen):
    p = _probs(gen).double().requires_grad_()
    s = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    eta, bits = 0.01, 4
    ph = P.sulq_fake_quantize(p, eta, s, z, bits)
    g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    (ph * g).sum().backward()
    t = -torch.log2(p.detach() + eta) / 0.4
    inside = (torch.round(t) >= 0) & (torch.round(t) <= P.qmax(bits))
    want = torch.where(inside, g * (ph.detach() + eta) / (p.detach() + eta), torch.zeros_like(g))
    torch.testing.assert_close(p.grad, want)
    assert float(s.grad.abs()) > 0


def test_sulq_search_beats_uniform_on_softmax(gen):
    p = _probs(gen, (64, 64), temp=4.0)
    sp = P.init_sulq_params(p, 4)
    assert isinstance(sp, P.SULQParams) and float(sp.eta) > 0
    s_u, z_u = P.init_act_qparams(p, 4)
    err_sulq = float((P.sulq_fake_quantize(p, sp.eta, sp.s, sp.z, 4) - p).pow(2).mean())
    err_unif = float((P.fake_quantize(p, s_u, z_u, 4) - p).pow(2).mean())
    assert err_sulq < err_unif


def test_sulq_bad_input(gen):
    p = _probs(gen)
    with pytest.raises(ValueError, match="after the softmax"):
        P.sulq_quantize(p - 0.5, 0.01, 0.3, 0, 4)
    with pytest.raises(ValueError, match="eta must be"):
        P.sulq_quantize(p, 0.0, 0.3, 0, 4)
    with pytest.raises(TypeError, match="integer"):
        P.sulq_dequantize(p, 0.01, 0.3, 0, 4)


# I&S-ViT's SULQ as published (power-of-two levels minus eta), from the paper's formulas


def test_published_sulq_hand_computed():
    # The authors' forward at b = 2 bits, eta = 1 (values from their formula, in their log domain y = log2(p + 1)):
    # y of p = 1, 0.5, 0.25, 0 is 1, 0.585, 0.322, 0; minv = 0, maxv = 1, delta = (maxv - minv) / 2^b = 1/4;
    # k = clamp(round((y - minv) / delta), 0, 2^b) = 4, 2, 1, 0 (five codes 0..4);
    # p_hat = 2^round(k delta + minv) - eta = 2^round(1, .5, .25, 0) - 1 = 2^(1, 0, 0, 0) - 1 = 1, 0, 0, 0.
    # Here t = -y: x0 = min t = -1, s = 1/4, codes round((t - x0) / s) = 2^b - k = 0, 2, 3, 4, same levels.
    p = torch.tensor([1.0, 0.5, 0.25, 0.0])
    sp = P.init_sulq_published(p, 2, etas=(1.0,))
    grid = P.sulq_grid_bits(2)
    assert float(sp.eta) == 1.0 and float(sp.x0) == -1.0 and float(sp.z) == 0 and sp.pow2
    assert sp.bits == grid and P.n_levels(grid) == 5 and float(sp.s) == 0.25
    codes = P.sulq_quantize(p, sp.eta, sp.s, sp.z, grid, x0=sp.x0)
    assert codes.tolist() == [0, 2, 3, 4]
    assert P.sulq_dequantize(codes, sp.eta, sp.s, sp.z, grid, sp.x0, True).tolist() == [1.0, 0.0, 0.0, 0.0]
    # table[q] = 2^-round(x0 + q s) - 1: exponents -1, -0.75, -0.5, -0.25, 0 round to -1, -1, 0, 0, 0
    assert P.sulq_table(sp.eta, sp.s, sp.z, grid, sp.x0, True).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    ph = P.sulq_fake_quantize(p, sp.eta, sp.s, sp.z, grid, x0=sp.x0, pow2=True)
    assert ph.tolist() == [1.0, 0.0, 0.0, 0.0]
    # without the rounded exponent (the learned-step form at the same grid): 2^(3/4) - 1, ...
    smooth = P.sulq_table(sp.eta, sp.s, sp.z, grid, sp.x0, False)
    torch.testing.assert_close(smooth, torch.tensor([1.0, 2 ** 0.75 - 1, 2 ** 0.5 - 1, 2 ** 0.25 - 1, 0.0]))


def test_published_sulq_eta_search_on_the_2b_level_grid():
    # The authors choose eta with the 2^b-level grid (delta = range / (2^b - 1)) and then run 2^b + 1 levels.
    # b = 2, p = 1, 0.5, 0.25, 0, candidates eta = 1 and 0.5:
    #  eta = 1: y = 1, .585, .322, 0, delta = 1/3, k = 3, 2, 1, 0, p_hat = 2^round(1, 2/3, 1/3, 0) - 1 = 1, 1, 0, 0,
    #           squared error (0 + .25 + .0625 + 0) / 4 = .078125;
    #  eta = .5: y = log2(1.5, 1, .75, .5) = .585, 0, -.415, -1, delta = 1.585 / 3 = .528,
    #           k = round((y + 1) / delta) = 3, 2, 1, 0, p_hat = 2^round(.585, .057, -.472, -1) - .5 = 1.5, .5, .5, 0,
    #           squared error (.25 + 0 + .0625 + 0) / 4 = .078125: a tie, the first candidate (eta = 1) stays.
    p = torch.tensor([1.0, 0.5, 0.25, 0.0])
    assert float(P.init_sulq_published(p, 2, etas=(1.0, 0.5)).eta) == 1.0
    # eta = .25 (y = log2(1.25, .75, .5, .25) = .32, -.415, -1, -2, delta = .774, k = 3, 2, 1, 0,
    # p_hat = 2^round(.32, -.454, -1.23, -2) - .25 = .75, .75, .25, 0): error (.0625 + .0625 + 0 + 0) / 4 = .03125
    assert float(P.init_sulq_published(p, 2, etas=(1.0, 0.5, 0.25)).eta) == 0.25


def test_published_sulq_levels_are_powers_of_two_and_eta_is_searched(gen):
    p = torch.softmax(torch.randn(128, 50, generator=gen) * 3, -1)
    sp = P.init_sulq_published(p, 4)
    assert any(float(sp.eta) == pytest.approx(e) for e in P.PUBLISHED_SULQ_ETAS) and sp.pow2
    assert sp.bits == P.sulq_grid_bits(4) and P.n_levels(sp.bits) == 17
    t = torch.log2(P.sulq_table(sp.eta, sp.s, sp.z, sp.bits, sp.x0, True).double() + float(sp.eta))
    torch.testing.assert_close(t, torch.round(t), rtol=0, atol=1e-6)  # every level is 2^k - eta (fp32)
    x = -torch.log2(p + sp.eta)
    assert float(sp.x0) == pytest.approx(float(x.min())) and float(sp.s) == pytest.approx(float(x.max() - x.min()) / 16)
    errs = {}  # the search's error: the 2^b-level grid spanning the data
    for eta in P.PUBLISHED_SULQ_ETAS:
        t = -torch.log2(p + eta)
        s16 = (t.max() - t.min()) / 15
        errs[eta] = float((P.sulq_fake_quantize(p, eta, s16, 0.0, 4, x0=t.min(), pow2=True) - p).pow(2).mean())
    assert min(errs, key=errs.get) == pytest.approx(float(sp.eta))


def test_published_sulq_gradients_straight_through(gen):
    p = torch.softmax(torch.randn(8, 20, generator=gen) * 2, -1).requires_grad_(True)
    sp = P.init_sulq_published(p.detach(), 4)
    s = sp.s.clone().requires_grad_(True)
    ph = P.sulq_fake_quantize(p, sp.eta, s, sp.z, 4, x0=sp.x0, pow2=True)
    ph.sum().backward()
    inside = ((-torch.log2(p.detach() + sp.eta) - sp.x0) / sp.s).round().clamp(0, 15) == (
        (-torch.log2(p.detach() + sp.eta) - sp.x0) / sp.s).round()
    want = (ph.detach() + sp.eta) / (p.detach() + sp.eta)  # STE through both roundings
    torch.testing.assert_close(p.grad[inside], want[inside], rtol=1e-5, atol=1e-6)
    assert s.grad is not None and bool(torch.isfinite(s.grad))
