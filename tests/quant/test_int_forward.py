"""The integer forward of ``"quant"`` mode (:mod:`quant.int_forward`): bit-equal to ``"int"`` mode, gradients of the
fake-quant forward, on the reference and the Triton (interpreter) paths, and training with it.

Gradient comparisons use inputs built away from rounding boundaries: every quantized value ``x / s + z`` (after the
rescale) is an integer plus ``u`` with ``|u| <= 0.4`` (:func:`_off_tie`), so float rounding differences between the
two forwards cannot move a code; where the values come out of a LayerNorm, rows with a value within 1e-3 of a tie
are redrawn (:func:`_ln_input_off_ties`).
"""
import copy

import pytest
import torch
from torch import nn

from kernels import ops
from lowbit import primitives as P
from quant.calibrate import calibrate
from quant.modules import QuantAttentionCore, QuantConv2dPatch, QuantLayerNorm, QuantLinear, set_forward, set_mode
from quant.optimize import OptimConfig, evaluate_loss, optimize
from quant.surgery import quantize_model
from tests.images import folder_images, natural_images

from .ptq_utils import images, make_model, one_thread  # noqa: F401


def _off_tie(shape, s, z, bits, gen, clip=2):
    """Values ``(c + u - z) * s`` with integer codes ``c`` in ``[-clip, qmax + clip]`` (some clipped) and
    ``|u| <= 0.4``: ``round(x / s) + z`` sits at least 0.1 away from a rounding tie."""
    c = torch.randint(-clip, P.qmax(bits) + clip + 1, shape, generator=gen).float()
    u = (torch.rand(shape, generator=gen) - 0.5) * 0.8
    return (c + u - P.round_zero_point(z, bits)) * s


def _grads(module, run):
    """Gradients of ``run()`` (a scalar) w.r.t. every trainable parameter of ``module``."""
    module.zero_grad()
    run().backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_grads_close(a, b, rtol=1e-5):
    assert a.keys() == b.keys() and a
    for n in a:
        scale = float(b[n].abs().max())
        if not n.endswith("z"):  # a zero point gets gradient only from clipped values
            assert scale > 0, f"{n}: zero gradient, the test would be vacuous"
        assert torch.allclose(a[n], b[n], rtol=rtol, atol=rtol * scale), (n, float((a[n] - b[n]).abs().max()), scale)


def _both(module, run):
    """``(integer-forward grads, fake-forward grads)`` of ``run`` on ``module`` in ``"quant"`` mode."""
    set_mode(module, "quant")
    set_forward(module, "int")
    gi = _grads(module, run)
    set_forward(module, "fake")
    gf = _grads(module, run)
    set_forward(module, "int")
    return gi, gf


def _linear(gen, w_bits, a_bits, rescale, n=24, k=40):
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.1)
        lin.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    m = QuantLinear(lin, w_bits, a_bits, rescale=rescale)
    x = torch.randn(6, 5, k, generator=gen) * torch.linspace(0.1, 4, k) + torch.linspace(-1, 1, k)
    m.set_mode("calib")
    m(x)
    with torch.no_grad():
        m.dW.copy_(torch.randn(m.dW.shape, generator=gen) * 0.01)
        if rescale:
            m.shift.add_(torch.randn(k, generator=gen) * 0.05)
    return m, x


def _linear_off_ties(gen, w_bits, a_bits, rescale):
    """A calibrated QuantLinear whose folded weight and input ``x`` both quantize away from ties."""
    m, x = _linear(gen, w_bits, a_bits, rescale)
    with torch.no_grad():
        n, k = m.weight.shape
        r = m.r if rescale else torch.ones(k)
        wf = _off_tie((n, k), m.ws, m.wz, w_bits, gen, clip=0 if w_bits == P.TERNARY else 1)
        m.weight.copy_(wf / r - m.dW)  # W' = (W + dW) * r = wf up to rounding
        xs = _off_tie(x.shape, m.act.s, m.act.z, a_bits, gen)
        x = xs * r + (m.shift if rescale else 0)
    return m, x


BITS = [(4, 4), (1.58, 8), (3, 3), (8, 8), (6, 6)]


@pytest.mark.parametrize("w_bits,a_bits", BITS)
@pytest.mark.parametrize("rescale", [True, False])
def test_linear_forward_is_int_mode_and_gradients_are_fake_quant(gen, w_bits, a_bits, rescale):
    m, x = _linear_off_ties(gen, w_bits, a_bits, rescale)
    x.requires_grad_(True)
    g_out = torch.rand(6, 5, 24, generator=gen) + 0.5
    m.set_mode("int")
    y_int = m(x)
    assert not y_int.requires_grad
    m.set_mode("quant")
    y = m(x)
    assert y.requires_grad and y.dtype == torch.float32 and torch.equal(y.detach(), y_int)
    set_forward(m, "fake")
    y_fake = m(x).detach()
    assert not torch.equal(y_fake, y_int) and torch.allclose(y_fake, y_int, rtol=1e-4, atol=1e-5)

    def run():
        x.grad = None
        return (m(x) * g_out).sum()
    gi, gf = _both(m, run)
    gi["x"], gf["x"] = (_grads_x(m, x, run, f) for f in ("int", "fake"))
    want = {"dW", "log_ws", "act.log_s", "act.z"} | ({"log_r", "shift"} if rescale else set()) \
        | ({"wz"} if w_bits != P.TERNARY else set())
    assert want <= set(gi)
    _assert_grads_close(gi, gf)


def _grads_x(m, x, run, forward):
    set_forward(m, forward)
    run().backward()
    set_forward(m, "int")
    return x.grad.clone()


@pytest.mark.parametrize("w_bits", [4, 1.58])
def test_patch_embedding(gen, w_bits):
    conv = nn.Conv2d(3, 16, 4, stride=4)
    m = QuantConv2dPatch(conv, w_bits, 8)
    x = torch.randn(3, 3, 16, 16, generator=gen)
    m.set_mode("calib")
    m(x)
    with torch.no_grad():
        m.weight.copy_(_off_tie((16, 48), m.ws, m.wz, w_bits, gen, clip=0 if w_bits == P.TERNARY else 1)
                       .reshape(m.weight.shape))
        x = _off_tie(x.shape, m.act.s, m.act.z, 8, gen, clip=1).requires_grad_(True)
    g_out = torch.rand(3, 16, 4, 4, generator=gen) + 0.5
    m.set_mode("int")
    y_int = m(x)
    m.set_mode("quant")
    assert y_int.shape == (3, 16, 4, 4) and torch.equal(m(x).detach(), y_int)

    def run():
        x.grad = None
        return (m(x) * g_out).sum()
    gi, gf = _both(m, run)
    gi["x"], gf["x"] = (_grads_x(m, x, run, f) for f in ("int", "fake"))
    _assert_grads_close(gi, gf)


def _attention(gen, a_bits, sulq, swin, b=4, h=2, l=16, d=32):
    core = QuantAttentionCore(a_bits, "sulq" if sulq else "uniform")
    q, k, v = (torch.randn(b, h, l, d, generator=gen) * c for c in (1.0, 0.8, 1.2))
    bias = torch.randn(h, l, l, generator=gen) if swin else None
    mask = torch.where(torch.rand(2, l, l, generator=gen) < 0.2, -100.0, 0.0) if swin else None
    core.set_mode("calib")
    core(q, k, v, 0.3, rel_bias=bias, mask=mask)
    with torch.no_grad():
        q, k, v = (_off_tie(t.shape, qt.s, qt.z, a_bits, gen, clip=1)
                   for t, qt in ((q, core.q_quant), (k, core.k_quant), (v, core.v_quant)))
    return core, [t.requires_grad_(True) for t in (q, k, v)], bias, mask


@pytest.mark.parametrize("a_bits,sulq,swin", [(8, False, False), (4, False, True), (4, True, False),
                                              (8, True, True)])
def test_attention_core(gen, a_bits, sulq, swin):
    core, qkv, bias, mask = _attention(gen, a_bits, sulq, swin)
    g_out = torch.rand(qkv[0].shape, generator=gen) + 0.5
    core.set_mode("int")
    o_int = core(*qkv, 0.3, rel_bias=bias, mask=mask)
    core.set_mode("quant")
    o = core(*qkv, 0.3, rel_bias=bias, mask=mask)
    assert o.requires_grad and torch.equal(o.detach(), o_int)

    def run():
        for t in qkv:
            t.grad = None
        return (core(*qkv, 0.3, rel_bias=bias, mask=mask) * g_out).sum()
    gi, gf = _both(core, run)
    for f, g in (("int", gi), ("fake", gf)):
        set_forward(core, f)
        run().backward()
        g.update({n: t.grad.clone() for n, t in zip("qkv", qkv)})
    set_forward(core, "int")
    assert {"q_quant.log_s", "q_quant.z", "p_quant.log_s", "p_quant.z", "q", "k", "v"} <= set(gi)
    _assert_grads_close(gi, gf)


def _ln_input_off_ties(ln, lin, x, gen, tol=1e-3):
    """``x`` with every row redrawn until ``(LN(x) - shift) / r / s + z`` is at least ``tol`` from a tie, computed
    both fused (as the integer forward) and unfused (as the fake-quant forward)."""
    from quant.int_forward import fused_layernorm
    for _ in range(200):
        with torch.no_grad():
            parts = (fused_layernorm(x, ln.weight, ln.bias, lin.r, lin.shift, ln.eps),
                     P.apply_rescale(nn.functional.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps),
                                     lin.r, lin.shift))
            bad = torch.zeros(x.shape[:-1], dtype=torch.bool)
            for xs in parts:
                t = xs / lin.act.s
                bad |= ((t - t.floor() - 0.5).abs() < tol).any(-1)
        if not bad.any():
            return x
        x = torch.where(bad[..., None], torch.randn(x.shape, generator=gen) * 2 + 0.3, x)
    raise AssertionError("could not draw LayerNorm inputs away from rounding ties")


@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (1.58, 8)])
def test_fused_layernorm_and_linear(gen, w_bits, a_bits):
    """LayerNorm -> rescaled linear: the integer forward runs the deployed fused LayerNorm (``gamma / r``,
    ``(beta - shift) / r``); gradients reach x, r, shift and the quantizers as through the fake-quant pair."""
    m, _ = _linear(gen, w_bits, a_bits, rescale=True)
    ln = nn.LayerNorm(40)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(40, generator=gen) + 0.5)
        ln.bias.copy_(torch.randn(40, generator=gen) * 0.2)
    qln = QuantLayerNorm(ln, m)
    pair = nn.Sequential(qln, m)
    x = _ln_input_off_ties(ln, m, torch.randn(4, 3, 40, generator=gen) * 2 + 0.3, gen).requires_grad_(True)
    g_out = torch.rand(4, 3, 24, generator=gen) + 0.5
    set_mode(pair, "int")
    with torch.no_grad():
        y_int = pair(x)
    set_mode(pair, "quant")
    assert torch.equal(pair(x).detach(), y_int)

    def run():
        x.grad = None
        return (pair(x) * g_out).sum()
    gi, gf = _both(pair, run)
    for f, g in (("int", gi), ("fake", gf)):
        set_forward(pair, f)
        run().backward()
        g["x"] = x.grad.clone()
    set_forward(pair, "int")
    assert {"1.log_r", "1.shift", "1.act.log_s", "x"} <= set(gi)
    _assert_grads_close(gi, gf, rtol=1e-4)


@pytest.mark.parametrize("kind,bits,sulq", [("vit", "w4a4", False), ("swin", "w3a3", True),
                                            ("deit", "w1.58a8", False)])
def test_model_quant_forward_is_int_mode(kind, bits, sulq):
    """Whole models: the ``"quant"`` logits equal the ``"int"`` logits bit for bit, differ from the fake-quant
    forward's (by float rounding), and every trainable parameter gets a gradient."""
    fp = make_model(kind)
    q = calibrate(quantize_model(copy.deepcopy(fp), bits, softmax_quantizer="sulq" if sulq else "uniform"),
                  images(16))
    x = images(3, seed=5)
    set_mode(q, "int")
    with torch.no_grad():
        want = q(x)
    set_mode(q, "quant")
    y = q(x)
    assert torch.equal(y.detach(), want)
    y.pow(2).sum().backward()
    missing = [n for n, p in q.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
               and n.rsplit(".", 1)[-1] not in ("z", "wz")]  # zero points: gradient only where clipped
    assert not missing, missing
    set_forward(q, "fake")
    with torch.no_grad():
        fake = q(x)
    assert not torch.equal(fake, want) and (fake - want).abs().max() < 0.2 * float(want.max() - want.min())


def test_triton_path_gives_the_reference_gradients(gen):
    """The Triton kernels (interpreter) and the references: same integer-forward outputs and the same gradients
    for a rescaled linear and a Swin-style attention core (head dim 32, the Triton attention's smallest)."""
    m, x = _linear_off_ties(gen, 4, 4, True)
    x = x.requires_grad_(True)
    core, qkv, bias, mask = _attention(gen, 4, False, True, b=2, l=8)
    set_mode(m, "quant")
    set_mode(core, "quant")
    g_lin = torch.rand(6, 5, 24, generator=gen) + 0.5
    g_att = torch.rand(qkv[0].shape, generator=gen) + 0.5
    res = {}
    for triton in (False, True):
        ops.set_backend("triton" if triton else "cpu")
        try:
            for t in [x, *qkv]:
                t.grad = None
            m.zero_grad()
            core.zero_grad()
            y = m(x)
            o = core(*qkv, 0.3, rel_bias=bias, mask=mask)
            ((y * g_lin).sum() + (o * g_att).sum()).backward()
            with torch.no_grad():
                set_mode(m, "int")
                set_mode(core, "int")
                same = torch.equal(m(x), y.detach()) and torch.equal(core(*qkv, 0.3, rel_bias=bias, mask=mask),
                                                                     o.detach())
                set_mode(m, "quant")
                set_mode(core, "quant")
        finally:
            ops.set_backend(None)
        assert same, "'int' mode and the integer forward must run the same arithmetic"
        grads = {f"lin.{n}": p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        grads.update({f"attn.{n}": p.grad.clone() for n, p in core.named_parameters() if p.grad is not None})
        grads.update({n: t.grad.clone() for n, t in zip(("x", "q", "k", "v"), [x, *qkv])})
        res[triton] = (y.detach(), o.detach(), grads)
    (y0, o0, g0), (y1, o1, g1) = res[False], res[True]
    assert torch.allclose(y1, y0, rtol=1e-5, atol=1e-5) and torch.allclose(o1, o0, rtol=1e-5, atol=1e-5)
    _assert_grads_close(g1, g0, rtol=1e-4)


@pytest.mark.parametrize("source", ["generated", pytest.param("cifar10", marks=pytest.mark.data)])
@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_e2e_with_integer_forward_lowers_loss_like_fake(kind, source, request):
    """200 e2e steps (batch 8, Swin 4) with each forward from the same start: both halve the distillation loss
    (evaluated in ``"int"`` arithmetic on 16 held-out images), and the integer forward ends no more than 25% above
    the fake one. Trained on 48 generated images (more varied than CIFAR-10's: with 32, Swin's held-out loss falls
    to 0.49-0.54 of the start), or on 32 real CIFAR-10 training images."""
    fp = make_model(kind)
    if source == "generated":
        data = natural_images(64)
    else:
        data = folder_images(request.getfixturevalue("real_data") / "cifar10" / "train", 48)
    x, held = data[:-16], data[-16:]
    start = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), x)
    cfg = OptimConfig(method="e2e", iters=200, batch_size=8 if kind == "vit" else 4, progress=False, seed=3)
    rtn = evaluate_loss(start, fp, held, cfg)
    after = {}
    for forward in ("int", "fake"):
        q = copy.deepcopy(start)
        set_forward(q, forward)
        hist = optimize(q, fp, x, cfg)
        assert hist["completed"] and len(hist["losses"]) == 200
        set_forward(q, "int")
        after[forward] = evaluate_loss(q, fp, held, cfg)
    assert after["int"] < 0.5 * rtn and after["fake"] < 0.5 * rtn, (rtn, after)
    assert after["int"] < 1.25 * after["fake"], after


def test_integer_forward_is_batch_invariant():
    """Each image's output of the integer forward does not depend on the rest of the batch (exact integer GEMMs,
    row-wise float epilogues), so data-parallel shards compute exactly the full batch's forward."""
    fp = make_model("deit")
    x = images(7, seed=2)
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), x)
    set_mode(q, "quant")
    with torch.no_grad():
        full = q(x)
        assert torch.equal(torch.cat([q(x[:4]), q(x[4:])]), full)


def test_overlapping_patches_keep_the_fake_forward(gen):
    """A patch conv with stride < kernel has no deployed form: ``"quant"`` trains it with the fake forward,
    ``"int"`` refuses it."""
    m = QuantConv2dPatch(nn.Conv2d(3, 8, 4, stride=2), 4, 8)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    m.set_mode("calib")
    m(x)
    m.set_mode("quant")
    y = m(x)
    set_forward(m, "fake")
    assert torch.equal(m(x), y) and y.shape == (2, 8, 7, 7)
    m.set_mode("int")
    with pytest.raises(NotImplementedError, match="non-overlapping"):
        m(x)
