"""Quantized modules and timm surgery: exact float replication, fake-quant vs integer forms, W8A8 fidelity."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops
from kernels import reference as R
from lowbit import packing
from lowbit import primitives as P
from quant.calibrate import calibrate
from quant.modules import ActQuantizer, QuantAttentionCore, QuantConv2dPatch, QuantLinear, set_mode
from quant.surgery import QuantViTAttention, QuantWindowAttention, blocks, quantize_model

from .ptq_utils import images, make_model, one_thread  # noqa: F401


def _linear(gen, n=24, k=40):
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.1)
        lin.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return lin


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 4), (1.58, 8), (3, 3)])
def test_quant_linear_matches_formula_and_integer_form(gen, w_bits, a_bits):
    lin = _linear(gen)
    m = QuantLinear(lin, w_bits, a_bits, rescale=True)
    x = torch.randn(6, 5, 40, generator=gen) * torch.linspace(0.1, 4, 40) + torch.linspace(-1, 1, 40)
    m.set_mode("calib")
    assert torch.allclose(m(x), lin(x), atol=1e-5)
    m.set_mode("quant")
    with torch.no_grad():
        m.dW.copy_(torch.randn(m.dW.shape, generator=gen) * 0.01)
    r, shift = m.r.detach(), m.shift.detach()
    assert not torch.allclose(r, torch.ones_like(r)) and shift.abs().max() > 0
    w_fold = (lin.weight + m.dW.detach()) * r
    b_fold = lin.bias + (lin.weight + m.dW.detach()) @ shift
    xs = (x - shift) / r
    x_hat = P.fake_quantize(xs, m.act.s.detach(), m.act.z.detach(), a_bits)
    w_hat = P.fake_quantize(w_fold, m.ws.detach(), m.wz.detach(), w_bits)
    y = m(x)
    assert torch.allclose(y, x_hat @ w_hat.T + b_fold, atol=1e-5)
    d = m.deploy()
    assert d["codes"].dtype == torch.uint8 and d["codes"].shape == (24, 40)
    assert int(d["codes"].max()) <= P.qmax(w_bits)
    a = ops.quantize(x, d["input"], d["r"], d["shift"])
    z_a = P.round_zero_point(m.act.z.detach(), a_bits)
    assert torch.equal(a.int() + P.code_offset(a_bits), (torch.round(x_hat / m.act.s.detach()) + z_a).int())
    assert torch.equal(d["codes"].int(), (torch.round(w_hat / m.ws.detach()) + d["w_zero"][:, None]).int())
    y_int = ops.packed_linear(a, d["input"], packing.pack(d["codes"], w_bits), d["w_scale"], d["w_zero"], d["bias"])
    assert torch.allclose(y_int, y.detach(), atol=1e-4, rtol=1e-4)


def test_ternary_zero_point_is_fixed(gen):
    m = QuantLinear(_linear(gen), 1.58, 8)
    assert "wz" not in dict(m.named_parameters()) and "wz" in dict(m.named_buffers())
    m.set_mode("calib")
    m(torch.randn(4, 40, generator=gen))
    assert torch.equal(m.wz, torch.ones(24, 1))


def test_gradients_reach_every_quant_parameter(gen):
    m = QuantLinear(_linear(gen), 4, 4, rescale=True)
    x = torch.randn(8, 40, generator=gen) * 2
    m.set_mode("calib")
    m(x)
    m.set_mode("quant")
    with torch.no_grad():
        m.log_ws.sub_(0.7)  # clip some weights: z only gets (LSQ) gradient from clipped values
    m(x).pow(2).sum().backward()
    for name in ("dW", "log_ws", "wz", "log_r", "shift", "act.log_s", "act.z"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_a16_leaves_activations_float(gen):
    m = QuantLinear(_linear(gen), 4, 16, rescale=False)
    x = torch.randn(8, 40, generator=gen)
    m.set_mode("calib")
    m(x)
    m.set_mode("quant")
    w_hat = P.fake_quantize(m.weight, m.ws.detach(), m.wz.detach(), 4)
    assert torch.allclose(m(x), F.linear(x, w_hat, m.bias), atol=1e-6)
    assert m.deploy()["input"] is None


def test_attention_core_matches_integer_reference(gen):
    core = QuantAttentionCore(8)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=gen) for _ in range(3))
    bias = torch.randn(3, 16, 16, generator=gen)
    core.set_mode("calib")
    core(q, k, v, 0.35, rel_bias=bias)
    core.set_mode("quant")
    o = core(q, k, v, 0.35, rel_bias=bias)
    qp = core.deploy()
    codes = [ops.quantize(t, qp[n]) for t, n in ((q, "q"), (k, "k"), (v, "v"))]
    ref = R.quant_attention(*codes, qp["q"], qp["k"], qp["v"], 0.35, p_qp=qp["p"], rel_bias=bias)
    step = float(qp["p"].s * qp["v"].s) * 4  # at most a few probability codes may sit on a rounding tie
    assert (o.detach() - ref).abs().max() <= step
    assert (o.detach() - ref).abs().mean() < 1e-4


@pytest.mark.parametrize("kind", ["vit", "deit", "swin"])
def test_surgery_replaces_all_layers_and_float_mode_is_exact(kind):
    fp = make_model(kind)
    q = quantize_model(copy.deepcopy(fp), "w4a4")
    assert not [n for n, m in q.named_modules() if type(m) is nn.Linear or type(m) is nn.Conv2d]
    att = QuantWindowAttention if kind == "swin" else QuantViTAttention
    assert len([m for m in q.modules() if isinstance(m, att)]) == len(blocks(q)) == (4 if kind == "swin" else 2)
    assert isinstance(q.patch_embed.proj, QuantConv2dPatch)
    rescaled = sorted(n for n, m in q.named_modules() if isinstance(m, QuantLinear) and m.rescale)
    assert rescaled and all(n.endswith(("attn.qkv", "mlp.fc1", "downsample.reduction")) for n in rescaled)
    if kind == "swin":
        assert any(n.endswith("downsample.reduction") for n in rescaled)
        assert any(any(b.shift_size) for b in blocks(q))
    x = images(4)
    with torch.no_grad():
        assert torch.allclose(q(x), fp(x), atol=1e-5)
        calibrate(q, x)
        set_mode(q, "calib")
        assert torch.allclose(q(x), fp(x), atol=1e-4), "rescale/shift folding must keep the float output"


@pytest.mark.parametrize("kind", ["vit", "deit", "swin"])
def test_w8a8_logits_close_to_float(kind):
    fp = make_model(kind)
    q = calibrate(quantize_model(copy.deepcopy(fp), "w8a8"), images(32))
    x = images(16, seed=7)
    with torch.no_grad():
        cos = F.cosine_similarity(q(x).flatten(), fp(x).flatten(), dim=0)
    assert cos > 0.99
    with torch.no_grad():
        low = F.cosine_similarity(calibrate(quantize_model(copy.deepcopy(fp), "w3a3"), images(32))(x).flatten(),
                                  fp(x).flatten(), dim=0)
    assert low < cos, "coarser quantization must move the logits further from float"


def test_quantize_model_rejects_bad_input():
    with pytest.raises(ValueError, match="bit spec"):
        quantize_model(make_model("vit"), "w4a5")
    with pytest.raises(ValueError, match="only timm ViT"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "w4a4")
    q = quantize_model(make_model("vit"), "w4a4")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, "w4a4")
    with pytest.raises(ValueError, match="mode must be"):
        ActQuantizer(8).set_mode("fast")
    set_mode(q, "quant")
    with pytest.raises(RuntimeError, match="before initialisation"):
        q(images(2))


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 4), (1.58, 8), (3, 3)])
def test_int_mode_is_the_integer_form(gen, w_bits, a_bits):
    """``"int"`` mode = quantize -> int32 GEMM -> scale + bias of the deployed values, and within float rounding of
    the fake-quant forward (one activation code step where a rounding boundary is crossed)."""
    lin = _linear(gen)
    m = QuantLinear(lin, w_bits, a_bits, rescale=True)
    x = torch.randn(6, 5, 40, generator=gen) * torch.linspace(0.1, 4, 40) + torch.linspace(-1, 1, 40)
    m.set_mode("calib")
    m(x)
    with torch.no_grad():
        m.dW.copy_(torch.randn(m.dW.shape, generator=gen) * 0.01)
    m.set_mode("quant")
    y_fake = m(x).detach()
    m.set_mode("int")
    y = m(x)
    assert not y.requires_grad and y.dtype == torch.float32
    d = m.deploy()
    a = P.quantize(P.apply_rescale(x, d["r"], d["shift"]), d["input"].s, d["input"].z, a_bits).long()
    za = P.round_zero_point(d["input"].z, a_bits)
    acc = (a - za).double() @ (d["codes"].long() - d["w_zero"].long()[:, None]).double().T
    want = acc * (d["input"].s.double() * d["w_scale"].double()) + d["bias"].double()
    assert torch.allclose(y.double(), want, rtol=1e-6, atol=1e-6)
    step = float(d["input"].s) * float((lin.weight.abs() * m.r).detach().sum(1).max()) * 2
    assert (y - y_fake).abs().max() <= step and (y - y_fake).abs().median() <= 1e-5


def test_patchify_is_the_conv_im2col(gen):
    x = torch.randn(2, 3, 18, 17, generator=gen)
    w = torch.randn(5, 3, 4, 4, generator=gen)
    y = P.patchify(x, (4, 4)) @ w.reshape(5, -1).T
    want = F.conv2d(x, w, stride=4)
    assert torch.allclose(y.reshape(2, 4, 4, 5).permute(0, 3, 1, 2), want, atol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_fused_layernorm_marks_and_int_mode(kind):
    """Surgery turns each LayerNorm feeding one rescaled linear into a QuantLayerNorm (same parameters, same
    state-dict keys); in ``"int"`` mode it emits ``(LN(x) - shift) / r`` and the model stays within rounding of the
    fake-quant model on images (top-1 agreement)."""
    from quant.modules import QuantLayerNorm
    fp = make_model(kind)
    q = quantize_model(copy.deepcopy(fp), "w8a8")
    fsd, qsd = fp.state_dict(), q.state_dict()
    assert all(torch.equal(qsd[k], v) for k, v in fsd.items() if "norm" in k)
    norms = {n: m for n, m in q.named_modules() if isinstance(m, QuantLayerNorm)}
    names = {n.rpartition(".")[2] for n in norms}
    assert names == ({"norm1", "norm2", "norm"} if kind == "swin" else {"norm1", "norm2"})
    x = images(16)
    calibrate(q, x)
    ln = next(iter(norms.values()))
    c = ln._consumer[0]
    assert c.norm_fused and c.rescale
    h = torch.randn(3, 7, ln.normalized_shape[0])
    with torch.no_grad():
        c.shift.add_(0.1)
        set_mode(q, "int")
        want = (F.layer_norm(h, ln.normalized_shape, ln.weight, ln.bias, ln.eps) - c.shift) / c.r
        assert torch.allclose(ln(h), want, atol=1e-5)
        set_mode(q, "quant")
        a = q(x)
        set_mode(q, "int")
        b = q(x)
        qc = copy.deepcopy(q)
        assert torch.equal(qc(x), b)
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.9
    assert ((a - b).abs().amax(1) / (a.max() - a.min())).median() <= 1e-3
