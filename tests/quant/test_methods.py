"""The seed papers' other methods: SULQ in the attention core and SOS (``--method is-vit``) of I&S-ViT; DFQ-ViT's
activation correction."""
import copy
import math

import pytest
import torch

from kernels import ops
from kernels import reference as R
from lowbit import primitives as P
from lowbit.errors import UserError
from quant.calibrate import calibrate
from quant.correction import add_act_correction, intermediate_mse, train_act_correction
from quant.modules import QuantAttentionCore, QuantLinear, SULQuantizer, set_mode
from quant.optimize import OptimConfig, evaluate_loss, optimize
from quant.saved import load_quantized
from quant.sos import fold_into_layernorms, init_channelwise, post_ln_pairs
from quant.surgery import quantize_model
from tests.images import natural_images

from .ptq_utils import images, make_model, one_thread  # noqa: F401


def test_sulq_attention_core_matches_integer_reference(gen):
    core = QuantAttentionCore(4, softmax_quantizer="sulq")
    assert isinstance(core.p_quant, SULQuantizer)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=gen) for _ in range(3))
    bias = torch.randn(3, 16, 16, generator=gen)
    core.set_mode("calib")
    core(q, k, v, 0.35, rel_bias=bias)
    core.set_mode("quant")
    o = core(q, k, v, 0.35, rel_bias=bias)
    qp = core.deploy()
    assert isinstance(qp["p"], P.SULQParams) and float(qp["p"].eta) > 0
    codes = [ops.quantize(t, qp[n]) for t, n in ((q, "q"), (k, "k"), (v, "v"))]
    ref = R.quant_attention(*codes, qp["q"], qp["k"], qp["v"], 0.35, p_qp=qp["p"], rel_bias=bias)
    table = P.sulq_table(*qp["p"])
    step = float((table[:-1] - table[1:]).abs().max() * qp["v"].s) * 4 * 16  # a few tie flips at most
    assert (o.detach() - ref).abs().max() <= step
    assert (o.detach() - ref).abs().mean() < 1e-4
    o.sum().backward()
    assert core.p_quant.log_s.grad is not None and float(core.p_quant.log_s.grad.abs()) > 0


def test_sulq_model_and_bad_choice():
    fp = make_model("swin")
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4", softmax_quantizer="sulq"), images(8))
    cores = [m for m in q.modules() if isinstance(m, QuantAttentionCore)]
    assert cores and all(isinstance(c.p_quant, SULQuantizer) and bool(c.p_quant.initialised) for c in cores)
    with torch.no_grad():
        assert torch.isfinite(q(images(2))).all()
    with pytest.raises(ValueError, match="softmax quantizer must be one of"):
        quantize_model(copy.deepcopy(fp), "w4a4", softmax_quantizer="log2")


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_sos_fold_preserves_float_output_exactly(kind):
    fp = make_model(kind).double()
    q = quantize_model(copy.deepcopy(fp), "w4a4")
    x = images(4).double()
    init_channelwise(q, x)
    pairs = post_ln_pairs(q)
    assert len(pairs) == (9 if kind == "swin" else 4)
    assert any(not torch.allclose(m.r, torch.ones_like(m.r)) for _, m in pairs)
    gammas = [ln.weight.detach().clone() for ln, _ in pairs]
    with torch.no_grad():
        ref = fp(x)
        fold_into_layernorms(q)
        out = q(x)
    assert (out - ref).abs().max() <= 1e-12 * ref.abs().max()
    assert all(not torch.equal(g, ln.weight) for g, (ln, _) in zip(gammas, pairs))
    assert all(torch.equal(m.r, torch.ones_like(m.r)) and torch.equal(m.shift, torch.zeros_like(m.shift))
               for _, m in pairs)


def test_sos_fold_keeps_fake_quant_output():
    fp = make_model("vit")
    x = images(8)
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), x)
    init_channelwise(q, x)
    with torch.no_grad():
        before = q(x)
        fold_into_layernorms(q)
        after = q(x)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


@pytest.mark.parametrize("method", ["is-vit", "is-vit-quant"])
def test_is_vit_method_lowers_loss_and_folds(method):
    fp = make_model("vit")
    data = natural_images(32)
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), data)
    cfg = OptimConfig(method=method, iters=15, batch_size=8, progress=False)
    before = evaluate_loss(q, fp, data, cfg)
    hist = optimize(q, fp, data, cfg)
    units = 3 + (method == "is-vit")  # 2 blocks, the head; as published the patch embedding on its own too
    assert hist["stage_steps"] == [15 * units, 15 * units] and hist["completed"]
    assert evaluate_loss(q, fp, data, cfg) < before
    for _, m in post_ln_pairs(q):
        assert torch.equal(m.r, torch.ones_like(m.r)) and not m.log_r.requires_grad
        assert m.quantize_weights
    set_mode(q, "float")
    with torch.no_grad():
        for n, p in q.named_parameters():
            if n.endswith("dW"):
                p.zero_()  # stage 3's refinement; the fold itself keeps the float model
        if method == "is-vit-quant":
            torch.testing.assert_close(q(data[:4]), fp(data[:4]), rtol=1e-4, atol=1e-4)
        else:  # stage 1 trained the float weights and biases, folded in at stage 2
            assert not torch.allclose(q(data[:4]), fp(data[:4]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["is-vit", "is-vit-quant"])
def test_is_vit_stages_train_what_each_variant_trains(method, monkeypatch):
    import quant.optimize as O
    stages = []
    real = O._units

    def spy(student, cfg, example):
        units = real(student, cfg, example)
        stages.append(sorted({n for u in units for n in u.params}))
        return units

    monkeypatch.setattr(O, "_units", spy)
    fp = make_model("vit")
    data = images(8)
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), data)
    optimize(q, fp, data, OptimConfig(method=method, iters=1, batch_size=4, progress=False))
    assert len(stages) == 2
    for i, names in enumerate(stages):
        if method == "is-vit":  # the authors: linear weights (dW) and biases, every quantizer parameter frozen
            assert names and all(n.endswith(("dW", ".bias")) for n in names)
            assert any(n.endswith(".bias") for n in names) and any(n.endswith("dW") for n in names)
        else:
            assert not any(n.endswith(".bias") for n in names)
            assert any(n.endswith(("log_s", ".z")) for n in names)
            assert any(n.endswith("dW") for n in names) == (i == 1)  # stage 1: float weights, quantizers only
            assert any(n.endswith(("log_r", "shift")) for n in names) == (i == 0)


@pytest.mark.parametrize("method", ["is-vit", "is-vit-quant"])
def test_is_vit_block_inputs_and_head_loss(method, monkeypatch):
    """As published (``is-vit``): stage 1 feeds each block the FP model's input, stage 3 the quantized model's, and
    the head unit's loss is the logit MSE; the package's variant keeps the student's inputs and the KL."""
    import quant.optimize as O
    seen = []
    real = O._unit_loss
    monkeypatch.setattr(O, "_unit_loss", lambda s, t, x, unit, cfg, *a: seen.append(
        (cfg.block_inputs, cfg.head_loss, cfg.layer_units)) or real(s, t, x, unit, cfg, *a))
    fp = make_model("vit")
    data = images(8)
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), data)
    hist = optimize(q, fp, data, OptimConfig(method=method, iters=1, batch_size=4, progress=False))
    n1, n3 = hist["stage_steps"]
    if method == "is-vit":
        assert set(seen[:n1]) == {("teacher", "mse", True)} and set(seen[n1:n1 + n3]) == {("student", "mse", True)}
    else:
        assert set(seen) == {("student", "kl", False)}


@pytest.mark.parametrize("method", ["is-vit", "is-vit-quant"])
def test_is_vit_reinitialises_weight_quantizers_before_stage_3(method):
    """As published, one quantized forward before stage 3 initialises every weight quantizer (qkv, proj, fc1, fc2,
    the head, the patch embedding) on the weights stage 1 refined; the package's variant re-initialises only the
    folded post-LayerNorm linears."""
    from quant.modules import QuantConv2dPatch
    from quant.sos import sos
    fp = make_model("vit")
    data = images(8)
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), data)
    weighted = [m for m in q.modules() if isinstance(m, (QuantLinear, QuantConv2dPatch))]
    folded = {id(m) for _, m in post_ln_pairs(q)}
    before, at_stage3 = {}, {}

    def fake_optimize(student, teacher, images, cfg):  # stage 1 "trains" every refinement; stage 3 looks
        if not before:
            for m in weighted:
                before[id(m)] = m.log_ws.detach().clone()
                m.dW.data.add_(torch.randn_like(m.dW) * 0.05)
        else:
            at_stage3.update({id(m): m.log_ws.detach().clone() for m in weighted})
        return {"losses": [], "steps": 0}

    sos(q, fp, data, OptimConfig(method=method, iters=1, batch_size=4, progress=False), fake_optimize,
        train="weights" if method == "is-vit" else "quantizers")
    for m in weighted:
        w = (m.weight_2d() if isinstance(m, QuantConv2dPatch) else m.folded()[0]).detach().float()
        expect = (P.init_qparams_searched(w, m.w_bits, P.PUBLISHED_WEIGHT_PCTS) if method == "is-vit"
                  else P.init_weight_qparams(w, m.w_bits))[0].log()
        if method == "is-vit" or id(m) in folded:
            torch.testing.assert_close(at_stage3[id(m)], expect.reshape(at_stage3[id(m)].shape), rtol=0, atol=0)
        else:
            assert torch.equal(at_stage3[id(m)], before[id(m)])  # stale: the variant keeps them
    assert len(weighted) > len(folded) + 1


def test_is_vit_initialises_activations_by_the_authors_search():
    """As published every uniform activation quantizer is initialised by the percentile search on the init images
    (float statistics), the post-LN inputs per channel; the variant keeps the calibration's 0.01/99.99."""
    from quant.modules import ActQuantizer
    from quant.sos import sos
    fp = make_model("vit")
    data = images(8)
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), data)
    head = q.head.act
    seen = {}
    hook = q.head.register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0].detach().clone()))
    set_mode(q, "float")
    q(data)
    hook.remove()
    set_mode(q, "quant")
    s_pct = head.s.detach().clone()
    sos(q, fp, data, OptimConfig(method="is-vit", iters=1, batch_size=4, progress=False),
        lambda *a: {"losses": [], "steps": 0})
    s_search, z_search = P.init_qparams_searched(seen["x"].reshape(1, -1), 4, P.PUBLISHED_ACT_PCTS)
    assert float(head.s) == pytest.approx(float(s_search), rel=1e-6) and float(head.z) == float(z_search)
    assert float(head.s) != pytest.approx(float(s_pct), rel=1e-6)
    assert all(m.search for m in q.modules() if isinstance(m, ActQuantizer))


def test_searched_init_picks_the_percentile_of_least_error():
    # one row 0, 1, ..., 8 and an outlier 100, 2 bits (s = range / 3); quantiles by linear interpolation:
    #  pct 1: range [0, 100], s = 33.3: 0..8 -> 0, 100 -> 100: error 0^2 + ... + 8^2 = 204
    #  pct .5: the median 4.5 (lo = hi = 4.5: range [0, 4.5]), s = 1.5: codes clamp(round(x / 1.5), 0, 3),
    #          x_hat = 0, 1.5, 1.5, 3, 4.5, 4.5, 4.5, 4.5, 4.5, 4.5: error .25*... + (100 - 4.5)^2 = 9120.25 + ...
    #  pct .9: quantile(.9) = 8 + .1 * 92 = 17.2 (pos 8.1), quantile(.1) = .9: range [0, 17.2], s = 5.733:
    #          0..8 -> 0, 0, 0, 5.73, 5.73, 5.73, 5.73, 5.73, 5.73 and 100 -> 17.2: error > 6800
    x = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7, 8, 100]])
    s, z = P.init_qparams_searched(x, 2, (0.5, 0.9, 1.0))
    assert float(s) == pytest.approx(100 / 3) and float(z) == 0
    # per row: a row without the outlier takes a clipped range (here pct .9: 0..8.1 against 0..9's error)
    rows = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7, 8, 100], [0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    s2, _ = P.init_qparams_searched(rows, 2, (0.9, 1.0))
    for r, sr in zip(rows, s2.reshape(-1)):
        errs = []
        for pct in (0.9, 1.0):
            lo, hi = torch.quantile(r, 1 - pct), torch.quantile(r, pct)
            st, zt = P.qparams_from_range(lo, hi, 2)
            errs.append((float((P.fake_quantize(r, st, zt, 2) - r).pow(2).sum()), float(st)))
        assert float(sr) == pytest.approx(min(errs)[1])
    assert float(s2[0]) != float(s2[1])


def test_is_vit_schedule_defaults_are_the_authors():
    """``is-vit``: Adam at 4e-5 with cosine decay over the stage and no warm-up (``block_recon.py``); the other
    methods keep 1e-4 and the 5/24 warm-up; an explicit value wins."""
    from quant.optimize import _make_optim
    pub, own = OptimConfig(method="is-vit", iters=8), OptimConfig(method="e2e", iters=24)
    assert (pub.lr_w, pub.warmup_steps) == (4e-5, 0) and (own.lr_w, own.warmup_steps) == (1e-4, 5)
    assert OptimConfig(method="is-vit", lr_w=1e-3, warmup=2).lr_w == 1e-3
    w = torch.nn.Parameter(torch.zeros(2))

    class Unit:
        params = {"blocks.0.attn.qkv.dW": w}
    opt, sched = _make_optim(Unit(), pub)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expect = [4e-5 * 0.5 * (1 + math.cos(math.pi * t / 8)) for t in range(8)]
    assert lrs == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_layer_units_reconstruct_the_layers_between_blocks_alone(kind):
    """``layer_units`` (is-vit as published): the patch embedding and Swin's patch-merging reductions are units of
    their own, before the block they feed, reconstructed on their own output: MSE of the student's layer on the
    teacher's input to it against the teacher's layer output (stage 1), or on the student's input (stage 3)."""
    from quant.optimize import _unit_loss, _units
    fp = make_model(kind)
    data = images(4)
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), data)
    base = _units(q, OptimConfig(method="blockwise", iters=1), data[:1])
    units = _units(q, OptimConfig(method="blockwise", iters=1, layer_units=True), data[:1])
    layers = [u.layer for u in units if u.layer is not None]
    assert layers[0] == "patch_embed.proj" and units[0].layer == "patch_embed.proj" and units[0].block == 0
    if kind == "swin":
        assert any(name.endswith("downsample.reduction") for name in layers)
    assert len(units) == len(base) + len(layers)
    assert sum(len(u.params) for u in units) == sum(len(u.params) for u in base)  # every parameter, once
    assert not any(n.startswith("patch_embed") for u in units if u.layer is None for n in u.params)
    fp.eval()
    for inputs in ("teacher", "student"):
        cfg = OptimConfig(method="blockwise", iters=1, layer_units=True, block_inputs=inputs, l2=0.0)
        for u in (units[0], next(u for u in units if u.layer is not None and u.layer != "patch_embed.proj")
                  if kind == "swin" else units[0]):
            got = _unit_loss(q, fp, data, u, cfg)
            seen = {}
            def grab(key):
                def hook(mod, a, o):
                    seen.setdefault(key, (a[0], o))
                return hook
            hooks = [m.get_submodule(u.layer).register_forward_hook(grab(k)) for k, m in (("t", fp), ("s", q))]
            with torch.no_grad():
                fp(data)
                q(data)
            for h in hooks:
                h.remove()
            inp = seen["t"][0] if inputs == "teacher" else seen["s"][0]
            want = torch.nn.functional.mse_loss(q.get_submodule(u.layer)(inp), seen["t"][1])
            torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-7)


def test_block_inputs_from_the_teacher_and_logit_mse():
    """``block_inputs="teacher"``: a block's loss does not depend on the student's earlier blocks (it runs on the
    FP input), ``"student"``: it does; ``head_loss="mse"`` is the MSE of the logits."""
    import quant.optimize as O
    fp = make_model("vit")
    data = images(4)
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), data)
    units = O._units(q, OptimConfig(method="blockwise"), data)
    cfgs = {k: OptimConfig(method="blockwise", block_inputs=k, l2=0.0) for k in ("student", "teacher")}
    with torch.no_grad():
        before = {k: float(O._unit_loss(q, fp, data, units[1], c)) for k, c in cfgs.items()}
        for n, p in q.blocks[0].named_parameters():
            if n.endswith("dW"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        after = {k: float(O._unit_loss(q, fp, data, units[1], c)) for k, c in cfgs.items()}
        assert after["teacher"] == before["teacher"] and after["student"] != before["student"]
        head = OptimConfig(method="blockwise", head_loss="mse", l2=0.0)
        want = torch.nn.functional.mse_loss(q(data), fp(data))
        assert float(O._unit_loss(q, fp, data, units[-1], head)) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(UserError, match="block inputs"):
        OptimConfig(block_inputs="fp")


def test_is_vit_refuses_resume_and_no_rescale():
    with pytest.raises(UserError, match="is-vit does not support"):
        OptimConfig(method="is-vit", stop_after=3)
    with pytest.raises(UserError, match="is-vit-quant does not support"):
        OptimConfig(method="is-vit-quant", resume=True, state_path="x")
    fp = make_model("vit")
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4", rescale=False), images(4))
    with pytest.raises(UserError, match="drop --no-rescale"):
        optimize(q, fp, images(4), OptimConfig(method="is-vit", iters=1, progress=False))


def test_act_correction_starts_as_identity_and_only_in_quant_mode():
    fp = make_model("swin")
    x = images(4)
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), x)
    with torch.no_grad():
        before = q(x)
        corr = add_act_correction(q)
        assert len(corr) == 4 and corr[-1].matrix.shape == (48, 48)
        assert torch.equal(q(x), before)
        corr[0].matrix.mul_(0.5)
        assert not torch.allclose(q(x), before)
        set_mode(q, "float")
        torch.testing.assert_close(q(x), fp(x), rtol=1e-5, atol=1e-5)
    dep = corr[0].deploy()
    assert dep["matrix"].dtype == torch.float32 and torch.equal(dep["matrix"], corr[0].matrix.detach())
    with pytest.raises(ValueError, match="already has"):
        add_act_correction(q)


def test_act_correction_reduces_intermediate_mse():
    fp = make_model("vit")
    data = natural_images(48)
    x, held = data[:32], data[32:]
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), x)
    add_act_correction(q)
    grads = {n: p.requires_grad for n, p in q.named_parameters()}
    with torch.no_grad():
        before, before_held = float(intermediate_mse(q, fp, x)), float(intermediate_mse(q, fp, held))
    hist = train_act_correction(q, fp, x, iters=40, batch_size=8, lr=2e-3, progress=False)
    assert hist["steps"] == 40 and len(hist["losses"]) == 40
    with torch.no_grad():
        after, after_held = float(intermediate_mse(q, fp, x)), float(intermediate_mse(q, fp, held))
    assert after < 0.9 * before and after_held < before_held
    assert grads == {n: p.requires_grad for n, p in q.named_parameters()}
    assert any(not torch.equal(p, torch.eye(p.shape[0])) for n, p in q.named_parameters() if n.endswith("matrix"))


def test_cli_data_free_is_vit_sulq_with_correction_reloads(tmp_path, capsys):
    import json

    import timm

    from quant.modules import ActCorrection
    from quant.run import main

    small = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
    torch.manual_seed(0)
    ckpt = tmp_path / "deit.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", pretrained=False, **small).state_dict(), ckpt)
    out = tmp_path / "run"
    base = ["--model", "deit_t", "--bits", "w4a4", "--out", str(out), "--checkpoint", str(ckpt),
            "--model-args", json.dumps(small), "--calib-size", "8", "--init-size", "8", "--iters", "2",
            "--batch-size", "4", "--no-progress", "--workers", "0"]
    rc = main(base + ["--method", "is-vit", "--act-correction",  # is-vit: SULQ by default
                      "--correction-iters", "3", "--invert-steps", "2"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["data_free"] and rep["method"] == "is-vit" and rep["act_correction"]["steps"] == 3
    assert rep["steps"] == 2 * 2 * 4 and rep["calib_images"] == 8  # 2 stages x 2 iters x (patch embed, 2 blocks, head)
    saved = torch.load(out / "quantized.pt", weights_only=False)
    assert saved["softmax_quantizer"] == "sulq" and saved["act_correction"]
    rebuilt = load_quantized(str(out / "quantized.pt"))
    sd = rebuilt.state_dict()
    assert sd.keys() == saved["state_dict"].keys()
    assert all(torch.equal(sd[k], v) for k, v in saved["state_dict"].items())
    mats = [m.matrix for m in rebuilt.modules() if isinstance(m, ActCorrection)]
    assert len(mats) == 2 and any(not torch.equal(m, torch.eye(48)) for m in mats)
    assert all(isinstance(c.p_quant, SULQuantizer) for c in rebuilt.modules() if isinstance(c, QuantAttentionCore))
    with torch.no_grad():
        assert torch.isfinite(rebuilt(torch.randn(2, 3, 32, 32))).all()
