"""Export -> load of the DFQ-ViT activation correction and the SULQ probability quantizer, against the
fake-quant model in ``"int"`` mode (bit-equal, as in ``test_export.test_parity_with_fake_quant``)."""
import pytest
import torch

import export
from export import CheckpointError
from export import format as fmt
from export.runtime import BlockCorrection
from lowbit import primitives as P
from lowbit.primitives import SULQParams
from quant.modules import SULQuantizer, set_mode
from quant.surgery import blocks
from tests.quant.ptq_utils import one_thread  # noqa: F401

from .export_utils import arch, corrected, quantized

SWIN_IMAGES = 300


def _export(tmp_path, kind, bits, correction, sulq, **over):
    """``sulq``: False (uniform), True / "sulq" (published) or "sulq-learned"."""
    _, q = quantized(kind, bits, softmax_quantizer=(sulq if isinstance(sulq, str) else "sulq") if sulq else "uniform",
                     **over)
    if correction:
        corrected(q)
    name, kw = arch(kind, **over)
    path = export.export_model(q, tmp_path / f"{kind}.lowbit", arch=name, config=kw, bits=bits)
    return q, path


def _int_forward(q, x):
    set_mode(q, "int")
    try:
        return q(x)
    finally:
        set_mode(q, "quant")


def _assert_parity(a, b):
    """The issue's bar (top-1 identical on >= 99.9%, max logit difference <= 1e-3 of the range) and bit equality."""
    assert (a.argmax(1) == b.argmax(1)).float().mean().item() >= 0.999
    assert ((a - b).abs().amax(1) / (a.max() - a.min())).max() <= 1e-3
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["vit", "swin"])
@pytest.mark.parametrize("correction,sulq", [(True, False), (False, True), (True, True), (False, "sulq-learned")],
                         ids=["act_correction", "sulq", "both", "sulq_learned"])
def test_parity_with_fake_quant(tmp_path, folder_images, kind, correction, sulq):
    q, path = _export(tmp_path, kind, "w4a4", correction, sulq)
    m = export.load(path)
    x = folder_images[:SWIN_IMAGES] if kind == "swin" else folder_images
    with torch.no_grad():
        a, b = _int_forward(q, x), m(x)
    _assert_parity(a, b)


def test_parity_published_sulq_at_8_bits(tmp_path, folder_images):
    """W1.58A8 with the published SULQ: 257 probability levels (codes 0..256, no int8 storage) through export, the
    manifest's grid width and the CPU backend's table."""
    q, path = _export(tmp_path, "vit", "w1.58a8", False, True)
    _, man = fmt.load(path)
    widths = {e["p_bits"] for e in man["modules"] if e["kind"] == "vit_attention"}
    assert widths == {P.sulq_grid_bits(8)} and P.n_levels(widths.pop()) == 257
    m = export.load(path)
    with torch.no_grad():
        a, b = _int_forward(q, folder_images), m(folder_images)
    _assert_parity(a, b)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_act_correction_survives_export_and_load(tmp_path, folder_images, kind):
    """The fp32 matrices are stored and loaded bit-exactly, one per block, and they matter: the loaded model with
    its corrections reset to identity no longer matches the fake-quant model."""
    q, path = _export(tmp_path, kind, "w4a4", correction=True, sulq=False)
    names = [n for n, b in q.named_modules() if b in set(blocks(q))]
    tensors, man = fmt.load(path)
    assert man["act_correction"] == names and len(names) >= 2
    m = export.load(path)
    for n in names:
        want = q.get_submodule(n).act_correction.matrix.detach()
        assert not torch.equal(want, torch.eye(want.shape[0]))
        t = tensors[f"quant.{n}.act_correction.matrix"]
        assert t.dtype == torch.float32 and torch.equal(t, want)
        got = m.get_submodule(n).act_correction
        assert isinstance(got, BlockCorrection) and torch.equal(got.matrix, want)
    assert f"float.{names[0]}.act_correction.matrix" not in tensors
    x = folder_images[:64]
    with torch.no_grad():
        a, b = _int_forward(q, x), m(x)
        for n in names:
            mat = m.get_submodule(n).act_correction.matrix
            mat.copy_(torch.eye(mat.shape[0]))
        c = m(x)
    _assert_parity(a, b)
    assert ((a - c).abs().amax(1) / (a.max() - a.min())).median() > 1e-3


def test_sulq_params_reach_the_attention_kernel(tmp_path, monkeypatch):
    q, path = _export(tmp_path, "vit", "w4a4", correction=False, sulq=True, embed_dim=64, num_heads=2)  # head dim 32
    tensors, man = fmt.load(path)
    sulq = {n.rpartition(".core.")[0]: mod for n, mod in q.named_modules() if isinstance(mod, SULQuantizer)}
    assert len(sulq) == 2
    attn = {e["name"]: e for e in man["modules"] if e["kind"] == "vit_attention"}
    assert set(attn) == set(sulq)
    for n, mod in sulq.items():
        qp = mod.qparams()
        assert attn[n]["p_quantizer"] == "sulq" and attn[n]["p_bits"] == qp.bits
        for k in ("eta", "s", "z"):
            assert torch.equal(tensors[f"quant.{n}.p_{k}"], getattr(qp, k).float().reshape(()))
    from kernels import ops
    seen = []
    orig = ops.quant_attention

    def spy(*a, **k):
        seen.append(k.get("p_qp", a[7] if len(a) > 7 else None))
        return orig(*a, **k)
    monkeypatch.setattr(ops, "quant_attention", spy)
    m = export.load(path)  # through the Triton backend's single ops (the CPU backend's SULQ: test_parity_with_fake_quant)
    with torch.no_grad(), ops.using_backend("triton"):
        m(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    etas = sorted(float(mod.eta) for mod in sulq.values())
    assert len(seen) == 2 and all(isinstance(p, SULQParams) for p in seen)
    assert sorted(float(p.eta) for p in seen) == etas


@pytest.mark.parametrize("form", ["sulq", "sulq-learned"])
def test_sulq_forms_in_the_file(tmp_path, form):
    """The manifest names the form; ``p_x0`` and the power-of-two rounding travel; a file written before ``p_x0``
    existed (``p_quantizer: "sulq"``, no ``p_x0``) loads as the learned form it was."""
    from .test_errors import _rewrite
    q, path = _export(tmp_path, "vit", "w4a4", correction=False, sulq=form)
    tensors, man = fmt.load(path)
    mods = {n.rpartition(".core.")[0]: mod for n, mod in q.named_modules() if isinstance(mod, SULQuantizer)}
    attn = {e["name"]: e for e in man["modules"] if e["kind"] == "vit_attention"}
    for n, mod in mods.items():
        assert attn[n]["p_quantizer"] == form and mod.published == (form == "sulq")
        assert torch.equal(tensors[f"quant.{n}.p_x0"], mod.x0.float().reshape(()))
        assert (float(mod.x0) != 0) == (form == "sulq")
    m = export.load(path)
    got = [a.qp("p") for a in m.modules() if hasattr(a, "sulq") and a.sulq]
    assert len(got) == 2 and all(p.pow2 == (form == "sulq") for p in got)
    if form == "sulq-learned":
        def old(man_, t):
            for e in man_["modules"]:
                if e["kind"] == "vit_attention":
                    e["p_quantizer"] = "sulq"
                    del t[f"quant.{e['name']}.p_x0"]
                    del man_["tensors"][f"quant.{e['name']}.p_x0"]
        legacy = _rewrite(path, tmp_path / "legacy.lowbit", old)
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(export.load(legacy)(x), export.load(path)(x))


def test_act_correction_manifest_errors(tmp_path):
    from .test_errors import _rewrite
    _, path = _export(tmp_path, "vit", "w4a4", correction=True, sulq=False)
    bad = _rewrite(path, tmp_path / "a.lowbit", lambda m, t: m.update(act_correction=["head"]))
    with pytest.raises(CheckpointError, match="not a ViT/Swin block"):
        export.load(bad)
    bad = _rewrite(path, tmp_path / "b.lowbit", lambda m, t: m.update(act_correction=[]))
    with pytest.raises(CheckpointError, match="belong to no layer"):
        export.load(bad)

    def drop(m, t):
        del t["quant.blocks.1.act_correction.matrix"]
        del m["tensors"]["quant.blocks.1.act_correction.matrix"]
    bad = _rewrite(path, tmp_path / "c.lowbit", drop)
    with pytest.raises(CheckpointError, match="act_correction.matrix' is missing"):
        export.load(bad)


def test_triton_path_matches_reference(tmp_path):
    """A loaded SULQ + activation-correction model through the Triton kernels (interpreter on CPU) and the
    references (head dim 32: the Triton attention takes 32, 64, 128)."""
    from kernels import ops
    _, path = _export(tmp_path, "vit", "w4a8", correction=True, sulq=True, embed_dim=64, num_heads=2)
    m = export.load(path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = m(x)
        ops.set_backend("triton")
        try:
            tri = m(x)
        finally:
            ops.set_backend(None)
    assert torch.allclose(tri, ref, atol=1e-3 * float(ref.max() - ref.min()))
