"""Optimiser: e2e / blockwise lower the distillation loss below the rtn start; bit-exact resume; sampler."""
import copy

import pytest
import torch

from lowbit.errors import UserError
from quant.calibrate import calibrate
from quant.optimize import LOSS_READ_EVERY, EpochSampler, OptimConfig, e2e_loss, evaluate_loss, optimize
from quant.surgery import quantize_model
from tests.images import folder_images, natural_images

from .ptq_utils import images, make_model, one_thread  # noqa: F401


def _setup(kind, bits, n=32):
    fp = make_model(kind)
    x = images(n)
    return fp, calibrate(quantize_model(copy.deepcopy(fp), bits), x[:32]), x


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("source", ["generated", pytest.param("cifar10", marks=pytest.mark.data)])
@pytest.mark.parametrize("bits", ["w4a4", "w1.58a8"])
def test_e2e_lowers_distillation_loss_below_rtn(bits, source, request):
    """On generated images, and (with a data folder) on 64 real CIFAR-10 training images: the distillation loss
    on held-out images halves."""
    fp = make_model("vit")
    data = (natural_images(64) if source == "generated"
            else folder_images(request.getfixturevalue("real_data") / "cifar10" / "train", 64))
    x, held = data[:32], data[32:]
    q = calibrate(quantize_model(copy.deepcopy(fp), bits), x)
    cfg = OptimConfig(method="e2e", iters=250, batch_size=8, progress=False, seed=3)
    rtn_train, rtn_held = evaluate_loss(q, fp, x, cfg), evaluate_loss(q, fp, held, cfg)
    hist = optimize(q, fp, x, cfg)
    assert hist["steps"] == 250 and len(hist["losses"]) == 250 and hist["completed"]
    after_train, after_held = evaluate_loss(q, fp, x, cfg), evaluate_loss(q, fp, held, cfg)
    assert after_train < 0.5 * rtn_train
    assert after_held < 0.5 * rtn_held
    assert any(float(m.detach().abs().sum()) > 0 for n, m in q.named_parameters() if n.endswith("dW"))


def test_loss_terms_and_refinement_l2():
    fp, q, x = _setup("swin", "w4a4")
    cfg = OptimConfig(progress=False, l2=0.5)
    with torch.no_grad():
        terms = e2e_loss(q, fp, x[:8], cfg)
    assert float(terms["mse"]) > 0 and float(terms["kl"]) > 0 and float(terms["l2"]) == 0
    for n, p in q.named_parameters():
        if n.endswith("dW"):
            with torch.no_grad():
                p.fill_(0.01)
            break
    with torch.no_grad():
        terms2 = e2e_loss(q, fp, x[:8], cfg)
    assert torch.isclose(terms2["l2"], torch.tensor(p.numel() * 1e-4))
    assert torch.isclose(terms2["total"], terms2["mse"] + terms2["kl"] + 0.5 * terms2["l2"])


def test_blockwise_lowers_loss_and_rtn_trains_nothing():
    fp = make_model("swin")
    x = natural_images(32)
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), x)
    cfg = OptimConfig(method="blockwise", iters=25, batch_size=8, progress=False)
    before = evaluate_loss(q, fp, x, cfg)
    hist = optimize(q, fp, x, cfg)
    assert hist["steps"] == 25 * (4 + 1)  # 4 blocks + the head unit
    assert evaluate_loss(q, fp, x, cfg) < before
    snap = _trainable(q)
    assert optimize(q, fp, x, OptimConfig(method="rtn", progress=False))["steps"] == 0
    assert all(torch.equal(v, dict(q.named_parameters())[n]) for n, v in snap.items())


@pytest.mark.parametrize("method,iters,stop,forward,extra", [
    ("e2e", 8, 4, "int", {}), ("blockwise", 3, 7, "int", {}), ("e2e", 6, 3, "fake", {}),
    ("e2e", 6, 3, "int", {"augment": ("shift", "flip", "mix"), "hard_steps": 1})])
def test_interrupt_and_resume_is_bit_exact(tmp_path, method, iters, stop, forward, extra):
    """Both ``"quant"`` forwards (integer, the default, and float fake-quant) resume bit-exactly, with and without
    batch augmentation and hard samples."""
    from quant.modules import set_forward
    kind = "swin" if method == "blockwise" else "vit"
    fp, q_ref, x = _setup(kind, "w4a4", n=20)
    set_forward(q_ref, forward)
    q_run = copy.deepcopy(q_ref)
    q_res = copy.deepcopy(q_ref)
    base = dict(method=method, iters=iters, batch_size=6, progress=False, seed=5, warmup=2, **extra)
    ref = optimize(q_ref, fp, x, OptimConfig(**base))
    for k in extra:
        plain = optimize(copy.deepcopy(q_run), fp, x, OptimConfig(**{**base, k: OptimConfig.__dataclass_fields__[k].default}))
        assert plain["losses"] != ref["losses"], f"{k} must change the batches"
    state = str(tmp_path / "state.pt")
    part = optimize(q_run, fp, x, OptimConfig(**base, save_every=stop, state_path=state, stop_after=stop))
    assert not part["completed"] and part["steps"] == stop
    res = optimize(q_res, fp, x, OptimConfig(**base, save_every=stop, state_path=state, resume=True))
    assert res["completed"] and res["losses"] == ref["losses"]
    a, b = _trainable(q_ref), _trainable(q_res)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], _trainable(q_run)[n]) for n in a), "the interrupted run must differ"


def test_divergence_stops_with_the_step_and_writes_no_checkpoint(tmp_path):
    """Losses are read back every LOSS_READ_EVERY steps, not every step; a non-finite one ends the run with one
    UserError naming its step, before a checkpoint with broken parameters is written."""
    fp, q, x = _setup("vit", "w4a4", n=12)
    hist = optimize(copy.deepcopy(q), fp, x, OptimConfig(method="e2e", iters=LOSS_READ_EVERY + 3, batch_size=4,
                                                         progress=False))
    assert len(hist["losses"]) == LOSS_READ_EVERY + 3 and all(isinstance(v, float) for v in hist["losses"])
    with torch.no_grad():
        next(p for n, p in q.named_parameters() if n.endswith("log_s")).fill_(float("nan"))
    cfg = OptimConfig(method="e2e", iters=40, batch_size=4, progress=False, save_every=30,
                      state_path=str(tmp_path / "state.pt"))
    with pytest.raises(UserError, match=r"diverged: the loss is nan at step 1; lower the learning rates \(--lr-q"):
        optimize(q, fp, x, cfg)
    assert not (tmp_path / "state.pt").exists()


def test_hard_batch_raises_the_disagreement_within_its_steps():
    from quant.optimize import _pixel_range, hard_batch, kl_logits
    fp = make_model("vit")
    x = natural_images(16)
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), x)
    keep = x.clone()
    lo, hi = _pixel_range(fp, "cpu")
    assert bool((x >= lo).all() and (x <= hi).all())
    cfg = OptimConfig(hard_steps=2, hard_step_size=0.05)
    xa = hard_batch(q, fp, x, cfg, lo, hi)
    with torch.no_grad():
        before, after = kl_logits(q(x), fp(x), cfg.temperature), kl_logits(q(xa), fp(xa), cfg.temperature)
    assert after > 1.2 * before
    assert torch.equal(x, keep) and not xa.requires_grad
    assert 0.05 < float((xa - x).abs().max()) <= 2 * 0.05 + 1e-6
    assert bool((xa >= lo).all() and (xa <= hi).all())
    assert all(p.grad is None for p in list(q.parameters()) + list(fp.parameters()))
    with pytest.raises(UserError, match="hard steps"):
        OptimConfig(hard_steps=-1)
    with pytest.raises(UserError, match="hard step size"):
        OptimConfig(hard_steps=1, hard_step_size=0.0)


def test_resume_rejects_other_run(tmp_path):
    fp, q, x = _setup("vit", "w4a4", n=8)
    state = str(tmp_path / "s.pt")
    cfg = OptimConfig(iters=2, batch_size=4, progress=False, save_every=1, state_path=state)
    optimize(copy.deepcopy(q), fp, x, cfg)
    with pytest.raises(UserError, match=r"written with other settings: iters: 2 -> 3; resume with the"):
        optimize(q, fp, x, OptimConfig(iters=3, batch_size=4, progress=False, state_path=state, resume=True))
    with pytest.raises(UserError, match=r"other settings: augment: unset -> \['flip'\];"):
        optimize(q, fp, x, OptimConfig(iters=2, batch_size=4, progress=False, state_path=state, resume=True,
                                       augment=("flip",)))
    with pytest.raises(UserError, match="no checkpoint"):
        optimize(q, fp, x, OptimConfig(iters=3, progress=False, state_path=str(tmp_path / "none.pt"), resume=True))
    with pytest.raises(UserError, match="unknown method"):
        OptimConfig(method="adaround")


def test_sampler_covers_each_epoch_and_restores_position():
    s = EpochSampler(10, 4, seed=2)
    first = torch.cat([s.next() for _ in range(5)])  # 20 draws = exactly two epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert not torch.equal(first[:10], first[10:])
    t = EpochSampler(10, 4, seed=2)
    t.next()
    u = EpochSampler(10, 4, seed=2)
    u.load_state_dict(t.state_dict())
    assert torch.equal(torch.cat([t.next() for _ in range(3)]), torch.cat([u.next() for _ in range(3)]))
