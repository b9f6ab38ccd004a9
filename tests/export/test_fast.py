"""The CPU fast path of loaded checkpoints (:mod:`export.fast`): bit for bit the reference integer arithmetic
(:mod:`kernels.reference` through ``kernels.ops`` with ``fast=False``, and the optimiser's model in ``"int"`` mode),
for both GEMM backends, several bit widths, ViT and Swin; load-time validation; tracing without graph breaks."""
import pytest
import torch

import export
from export import CheckpointError
from export import fast as FA
from export.loader import resident_bytes
from export.runtime import PackedLinear, drop_fast, is_fast
from quant.modules import set_mode
from tests.quant.ptq_utils import one_thread  # noqa: F401

from .export_utils import arch, quantized


def _export(tmp_path, kind, bits, **over):
    _, q = quantized(kind, bits, **over)
    name, kw = arch(kind, **over)
    return q, export.export_model(q, tmp_path / f"{kind}_{bits}.lowbit", arch=name, config=kw, bits=bits)


def _inputs(n=6, seed=5, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g) * 1.5


@pytest.mark.parametrize("kind,bits,over", [
    ("vit", "w1.58a8", {}), ("vit", "w3a3", {}), ("vit", "w4a4", {}), ("vit", "w6a6", {}),
    # 8-bit weights (rowsum term) and K * 255 * 255 >= 2^24 in fc2 (float backend: float64 GEMM)
    ("vit", "w8a8", {"embed_dim": 192, "num_heads": 3}),
    ("swin", "w4a8", {}), ("swin", "w3a3", {}),
])
def test_fast_path_is_the_reference(tmp_path, kind, bits, over):
    q, path = _export(tmp_path, kind, bits, **over)
    ref = export.load(path, fast=False)
    assert not is_fast(ref)
    x = _inputs()
    set_mode(q, "int")
    with torch.no_grad():
        want = ref(x)
        assert torch.equal(q(x), want)
        for backend in FA.BACKENDS:
            m = export.load(path, fast=backend)
            assert is_fast(m) and {x.fast.backend for x in m.modules() if isinstance(x, PackedLinear)} == {backend}
            for xb in (x, x[:1]):  # batch 1 too
                assert torch.equal(m(xb), want[: len(xb)]), backend
    if bits == "w8a8":  # the float64 branch ran
        fc2 = export.load(path, fast="float").blocks[0].mlp.fc2
        assert fc2.fast.dtype == torch.float64 and fc2.fast_w.dtype == torch.float64, fc2.fast


def test_default_backend_and_probe(monkeypatch):
    assert FA.int_mm_exact()  # this CPU's torch._int_mm is exact; the probe can say no:
    assert FA.default_backend() == "int8"
    monkeypatch.setattr(FA, "int_mm_exact", lambda: False)
    assert FA.default_backend() == "float"
    with pytest.raises(ValueError, match="not exact on this CPU"):
        FA.check_backend("int8")
    with pytest.raises(ValueError, match="backend must be one of"):
        FA.check_backend("fp8")


def test_exact_matmul_switches_to_float64():
    """Integer products whose partial sums pass 2^24 are inexact in float32; gemm_dtype picks float64 there."""
    k = 300
    a = torch.full((4, k), 255.0)
    a[:, ::7] = 253.0
    b = torch.full((k, 5), 255.0)
    b[::5] = 251.0
    exact = (a.long() @ b.long()).float()
    assert FA.gemm_dtype(k, 255, 255) == torch.float64 and FA.gemm_dtype(k, 15, 15) == torch.float32
    assert not torch.equal(torch.matmul(a, b), (a.double() @ b.double()).float())  # float32 really is inexact here
    assert torch.equal(FA.exact_matmul(a, b, FA.gemm_dtype(k, 255, 255)), exact)


def test_resident_bytes_of_the_fast_path(tmp_path):
    """The fast path adds, per packed linear, its weight codes unpacked (1 byte each, or the float GEMM's 4/8),
    the ``[N]`` fp32 scale and the int32 column terms it needs; the packed buffers stay."""
    _, path = _export(tmp_path, "vit", "w4a8")
    lean, m = export.load(path, fast=False), export.load(path, fast="int8")
    extra = 0
    for x in m.modules():
        if isinstance(x, PackedLinear):
            n, k = x.out_features, x.in_features
            extra += n * k + 4 * n + 4 * n * (x.fast.col + x.fast.rowsum)
        elif hasattr(x, "fast_s3"):
            extra += 3 * 3 * 4
    assert resident_bytes(m) == resident_bytes(lean) + extra
    assert all(x.fast_w.dtype == torch.int8 for x in m.modules() if isinstance(x, PackedLinear))


def test_drop_fast_goes_back_to_the_kernels(tmp_path, monkeypatch):
    _, path = _export(tmp_path, "vit", "w4a4")
    m = export.load(path)
    x = _inputs(2)
    with torch.no_grad():
        fast_out = m(x)
    from kernels import ops
    calls = []
    orig = ops.packed_linear
    monkeypatch.setattr(ops, "packed_linear", lambda *a, **k: calls.append(1) or orig(*a, **k))
    with torch.no_grad():
        m(x)
        assert not calls
        drop_fast(m)
        assert not is_fast(m) and not any(n.startswith("fast_") for n, _ in m.named_buffers())
        assert torch.equal(m(x), fast_out) and calls


def test_quantizers_are_checked_at_load(tmp_path):
    from .test_errors import _rewrite
    _, path = _export(tmp_path, "vit", "w4a4")
    for key, value, what in (("quant.blocks.0.attn.proj.in_s", 0.0, "step size"),
                             ("quant.blocks.1.attn.p_s", float("nan"), "NaN"),
                             ("quant.blocks.0.mlp.fc1.w_scale", float("inf"), "weight scale")):
        bad = _rewrite(path, tmp_path / "bad.lowbit", lambda m, t: t[key].fill_(value))
        with pytest.raises(CheckpointError, match=what):
            export.load(bad, verify=False)
        assert export.load(bad, verify=False, fast=False) is not None  # the kernels path checks per call instead


def test_bad_images_are_refused(tmp_path):
    _, path = _export(tmp_path, "vit", "w4a4")
    m = export.load(path)
    x = _inputs(2)
    x[1, 0, 3, 4] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match="NaN or inf"):
        m(x)
    with torch.no_grad(), pytest.raises(TypeError, match="float32/float16/bfloat16"):
        m(torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8))
    with pytest.raises(ValueError, match="fast must be"):
        export.load(path, fast="fp8")


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_fast_path_traces_without_graph_breaks(tmp_path, kind):
    """``torch.compile(fullgraph=True)`` traces the whole CPU fast path (one graph); with the eager backend the
    compiled model computes the same logits bit for bit. ``export.load(compile=...)`` wraps it."""
    import torch._dynamo
    _, path = _export(tmp_path, kind, "w4a4")
    m = export.load(path, compile={"backend": "eager", "fullgraph": True})
    assert hasattr(m, "_orig_mod") and is_fast(m._orig_mod) and m.lowbit_manifest["bits"] == "w4a4"
    x = _inputs(2)
    torch._dynamo.reset()
    with torch.no_grad():
        explain = torch._dynamo.explain(m._orig_mod)(x)
        assert explain.graph_break_count == 0 and explain.graph_count == 1
        assert torch.equal(m(x), m._orig_mod(x))


@pytest.mark.parametrize("bits", [1.58, 3, 4, 8])
def test_codes_are_primitives_quantize(bits):
    """The fast path's codes of every kind (int8 ``a - c``, float centred ``a - z``) against
    ``primitives.quantize``: exact ties (round half to even), saturation, huge values, random values."""
    from lowbit import primitives as P
    s = torch.tensor(0.0625 if bits != 8 else 0.03)
    qmax = P.qmax(bits)
    g = torch.Generator().manual_seed(int(bits * 10))
    ties = (torch.arange(-2 * qmax, 2 * qmax + 1, dtype=torch.float32) + 0.5) * s
    x = torch.cat([ties, torch.randn(4000, generator=g) * qmax * s, torch.tensor([1e30, -1e30, 3e38, -3e38])])
    for z in sorted({0, 1, qmax // 2, qmax}):
        zt = torch.tensor(float(z))
        want = P.quantize(x, s, zt, bits).long()  # unsigned codes
        for int8 in (True, False):
            c = FA.act_codes(s, zt, bits, int8, "t")
            got = FA.codes_(x.clone(), s, c)
            assert got.dtype == (torch.int8 if int8 else torch.float32)  # int8: torch._int_mm's operand
            assert torch.equal(got.long() - int(c.add) + z if int8 else got.long() + z, want), (z, int8)


def test_large_batches_run_in_chunks(tmp_path, monkeypatch):
    """Batches whose temporaries pass ``CHUNK_BYTES`` run chunk by chunk with the same logits bit for bit; models
    with float GEMMs whose results may depend on the batch shape (SULQ, activation correction) are never chunked."""
    from export import runtime
    from export.runtime import PackedPatchEmbed

    from .export_utils import corrected
    _, path = _export(tmp_path, "vit", "w4a4")
    m, ref = export.load(path), export.load(path, fast=False)
    assert m.lowbit_chunk_plan[:2] == (8, 8)
    seen = []
    pe = next(x for x in m.modules() if isinstance(x, PackedPatchEmbed))
    pe.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].shape[0]))
    x = _inputs(7)
    with torch.no_grad():
        want = ref(x)
        assert torch.equal(m(x), want) and seen == [7]
        monkeypatch.setattr(runtime, "CHUNK_BYTES", 3 * 4 * 16 * 192)  # 3 images of 16 tokens x 192 wide
        seen.clear()
        assert torch.equal(m(x), want) and seen == [3, 3, 1]
        drop_fast(m)
        seen.clear()
        assert torch.equal(m(x), want) and seen == [7] and not hasattr(m, "lowbit_chunk_plan")
    _, q = quantized("vit", "w4a4", softmax_quantizer="sulq")
    corrected(q)
    name, kw = arch("vit")
    both = export.export_model(q, tmp_path / "both.lowbit", arch=name, config=kw, bits="w4a4")
    assert not hasattr(export.load(both), "lowbit_chunk_plan")


def test_fused_vit_blocks_run_as_one_function(tmp_path, monkeypatch):
    """A timm ViT block with fused LayerNorms runs :func:`export.fast.vit_block` (no submodule calls) with the
    reference's logits bit for bit (SULQ, activation correction); a forward hook on a submodule sends that block
    back through its modules; ``drop_fast`` removes the block forwards."""
    from timm.models.vision_transformer import Block

    from export import runtime

    from .export_utils import corrected
    _, q = quantized("vit", "w4a4", softmax_quantizer="sulq")
    corrected(q)  # a block-level forward hook (the activation correction) and SULQ probabilities
    name, kw = arch("vit")
    path = export.export_model(q, tmp_path / "sulq.lowbit", arch=name, config=kw, bits="w4a4")
    m, ref = export.load(path), export.load(path, fast=False)
    blocks = [b for b in m.modules() if isinstance(b, Block)]
    assert blocks and all("forward" in b.__dict__ and b.lowbit_block.attn.sulq for b in blocks)
    x = _inputs(3)
    calls = []
    monkeypatch.setattr(FA, "vit_block", lambda *a, orig=FA.vit_block: calls.append(1) or orig(*a))
    with torch.no_grad():
        want = ref(x)
        assert torch.equal(m(x), want) and len(calls) == len(blocks)
        seen = []
        h = blocks[0].attn.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
        calls.clear()
        assert torch.equal(m(x), want) and len(seen) == 1 and len(calls) == len(blocks) - 1
        h.remove()
        for b in (x, x[:1]):
            assert torch.equal(m(b), want[: len(b)])
        drop_fast(m)
        assert not any("forward" in b.__dict__ or hasattr(b, "lowbit_block") for b in blocks)
        calls.clear()
        assert torch.equal(m(x), want) and not calls
    assert runtime.is_fast(export.load(path))


def test_layernorm_is_the_reference():
    """:func:`export.fast.layernorm` (the mean as the sum over the width, 0-d tensor constants, in place) against
    ``kernels.reference.layernorm`` bit for bit, widths that are and are not powers of two, with and without affine."""
    from kernels import reference as R
    g = torch.Generator().manual_seed(3)
    for k in (5, 48, 100, 128, 192, 768):
        x = torch.randn(257, k, generator=g) * 3 + torch.randn(257, 1, generator=g) * 50
        w, b = torch.randn(k, generator=g), torch.randn(k, generator=g)
        for eps in (1e-6, 1e-5):
            for ww, bb in ((w, b), (None, None), (w, None)):
                got = FA.layernorm(x, FA.layernorm_plan(k, eps, ww, bb))
                assert torch.equal(got, R.layernorm(x, ww, bb, eps)), (k, eps, ww is None, bb is None)


def test_probability_codes_skip_a_clamp_only_when_in_bounds():
    """The clamp of the probability codes is left out only when every softmax output rounds into the bounds: then
    the codes equal ``primitives.quantize``'s, including ``P = 1`` and a one-hot row."""
    from lowbit import primitives as P
    for s, bits, in_bounds in ((1 / 15, 4, True), (1 / 255, 8, True), (0.0258, 4, False), (1 / 15.6, 4, False)):
        st, z = torch.tensor(s), torch.tensor(0.0)
        c = FA.act_codes(st, z, bits, False, "p")
        assert FA.probabilities_in_bounds(st, c) is in_bounds
        if in_bounds:
            logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(bits)) * 4
            logits[0] = -1e4
            logits[0, 3] = 0.0  # one-hot row: P = 1 exactly
            p = torch.softmax(logits, dim=-1)
            assert float(p.max()) == 1.0
            got = FA.codes_(p.clone(), st, c, clamp=False)
            assert torch.equal(got.long(), P.quantize(p, st, z, bits).long())
