"""The CPU backend (:mod:`kernels.cpu`): loaded checkpoints compute bit for bit what :mod:`kernels.reference`
computes layer by layer (and the optimiser's model in ``"int"`` mode), with both GEMMs, several bit widths, ViT and
Swin; its constants are cached per version of a layer's tensors; the GEMM choice; load-time validation; tracing
without graph breaks."""
import contextlib

import pytest
import torch

import export
from export import CheckpointError
from export.loader import resident_bytes
from export.runtime import PackedLinear
from kernels import cpu, ops
from kernels import reference as R
from quant.modules import set_mode
from tests.export.export_utils import arch, quantized
from tests.quant.ptq_utils import one_thread  # noqa: F401


def _ref_codes(x, layer):
    if layer.ln_eps is not None:
        return R.layernorm_rescale_quantize(x, layer.ln_weight, layer.ln_bias, layer.ln_eps, layer.in_qp)
    return R.rescale_quantize(x, layer.in_qp, layer.r, layer.shift)


def _ref_linear(x, layer, gelu=False, requant=None):
    return R.packed_linear(_ref_codes(x, layer), layer.in_qp, layer.packed(), layer.w_scale, layer.w_zero,
                           layer.bias, gelu=gelu, requant=requant)


def _ref_mlp(x, fc1, fc2):
    h = _ref_linear(x, fc1, gelu=True, requant=fc2.in_qp)
    return R.packed_linear(h, fc2.in_qp, fc2.packed(), fc2.w_scale, fc2.w_zero, fc2.bias)


def _ref_attention(x, attn, mask=None):
    b, n, _ = x.shape
    qkv = _ref_linear(x, attn.qkv).view(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = (R.rescale_quantize(t.contiguous(), attn.qp(name)) for t, name in zip(qkv.unbind(0), "qkv"))
    rel_bias = attn.rel_pos_bias() if hasattr(attn, "rel_pos_bias") else None
    o = R.quant_attention(q, k, v, attn.qp("q"), attn.qp("k"), attn.qp("v"), attn.scale, attn.qp("p"),
                          rel_bias=rel_bias, mask=None if mask is None else mask.float())
    return _ref_linear(o.transpose(1, 2).reshape(b, n, -1), attn.proj)


def _ref_block(x, attn, mlp):
    x = x + _ref_attention(x, attn)
    return x + _ref_mlp(x, mlp.fc1, mlp.fc2)


@contextlib.contextmanager
def reference_layers(monkeypatch):
    """Within the block the layer ops of a loaded model compute through :mod:`kernels.reference` (the oracle)."""
    with monkeypatch.context() as mp:
        mp.setattr(cpu, "linear_layer", _ref_linear)
        mp.setattr(cpu, "mlp_layer", _ref_mlp)
        mp.setattr(cpu, "attention_layer", _ref_attention)
        mp.setattr(ops, "vit_block", _ref_block)
        yield


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
def test_cpu_backend_is_the_reference(tmp_path, monkeypatch, kind, bits, over):
    q, path = _export(tmp_path, kind, bits, **over)
    x = _inputs()
    set_mode(q, "int")
    m = export.load(path)
    with torch.no_grad():
        with reference_layers(monkeypatch):
            want = m(x)
        assert torch.equal(q(x), want)
        try:
            for choice in cpu.GEMMS:
                cpu.set_gemm(choice)
                for xb in (x, x[:1]):  # batch 1 too
                    assert torch.equal(m(xb), want[: len(xb)]), choice
                plans = {cpu.linear_plan(x).gemm for x in m.modules() if isinstance(x, PackedLinear)}
                assert plans == {choice}
                if bits == "w8a8" and choice == "float":  # the float64 branch ran
                    p = cpu.linear_plan(m.blocks[0].mlp.fc2)
                    assert p.dtype == torch.float64 and p.w.dtype == torch.float64, p
        finally:
            cpu.set_gemm(None)


def test_gemm_choice(monkeypatch):
    """int8 ``torch._int_mm`` only where the CPU has an int8 dot product and the probe finds it exact; float
    otherwise; the override is checked."""
    assert cpu.gemm() == ("int8" if cpu.int8_dot() and cpu.int_mm_exact() else "float")
    monkeypatch.setattr(cpu, "int8_dot", lambda: True)
    monkeypatch.setattr(cpu, "int_mm_exact", lambda: True)
    assert cpu.gemm() == "int8"
    monkeypatch.setattr(cpu, "int8_dot", lambda: False)  # e.g. AVX2 without VNNI: int8 GEMMs are slow there
    assert cpu.gemm() == "float"
    monkeypatch.setattr(cpu, "int8_dot", lambda: True)
    monkeypatch.setattr(cpu, "int_mm_exact", lambda: False)
    assert cpu.gemm() == "float"
    with pytest.raises(ValueError, match="not exact on this CPU"):
        cpu.set_gemm("int8")
    with pytest.raises(ValueError, match="GEMM must be one of"):
        cpu.set_gemm("fp8")
    assert cpu.gemm() == "float"


def test_int8_dot_reads_the_cpu_flags(monkeypatch, tmp_path):
    import builtins
    real_open = builtins.open
    for flags, want in (("fpu sse avx2 fma", False), ("fpu avx2 avx512f avx512_vnni", True), ("avx2 avx_vnni", True),
                        ("fp asimd", False), ("fp asimd asimddp", True)):
        f = tmp_path / "cpuinfo"
        f.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, _f=f, **k: real_open(_f if p == "/proc/cpuinfo" else p,
                                                                                  *a, **k))
        cpu.int8_dot.cache_clear()
        assert cpu.int8_dot() is want, flags
    monkeypatch.setattr(builtins, "open", real_open)
    cpu.int8_dot.cache_clear()


def test_exact_matmul_switches_to_float64():
    """Integer products whose partial sums pass 2^24 are inexact in float32; gemm_dtype picks float64 there."""
    k = 300
    a = torch.full((4, k), 255.0)
    a[:, ::7] = 253.0
    b = torch.full((k, 5), 255.0)
    b[::5] = 251.0
    exact = (a.long() @ b.long()).float()
    assert cpu.gemm_dtype(k, 255, 255) == torch.float64 and cpu.gemm_dtype(k, 15, 15) == torch.float32
    assert not torch.equal(torch.matmul(a, b), (a.double() @ b.double()).float())  # float32 really is inexact here
    assert torch.equal(cpu.exact_matmul(a, b, cpu.gemm_dtype(k, 255, 255)), exact)


def test_resident_bytes_of_the_cached_constants(tmp_path):
    """The CPU backend adds, per packed linear, its weight codes unpacked (1 byte each with the int8 GEMM), the
    ``[N]`` fp32 scale and the int32 column terms it needs, and a few scalars per layer; the packed buffers stay."""
    _, path = _export(tmp_path, "vit", "w4a8")
    try:
        cpu.set_gemm("int8")
        m = export.load(path)
    finally:
        cpu.set_gemm(None)
    own = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    big = small = 0
    for x in m.modules():
        if isinstance(x, PackedLinear):
            p = cpu.linear_plan(x)  # (built by the load)
            n, k = x.out_features, x.in_features
            assert p.w.dtype == torch.int8 and p.w.shape == (k, n)
            big += n * k + 4 * n + 4 * n * (p.col + p.rowsum)
        small += 64 * bool(x.__dict__.get("_lowbit_cpu"))
    extra = resident_bytes(m) - own
    assert big <= extra <= big + small, (extra, big, small)


def test_constants_follow_the_layer_tensors(tmp_path, monkeypatch):
    """The cached constants are rebuilt when a weight plane or a quantizer changes in place or is replaced: the
    outputs follow the reference at every step."""
    _, path = _export(tmp_path, "vit", "w4a4")
    m = export.load(path)
    x = _inputs(2)
    fc1 = m.blocks[0].mlp.fc1
    with torch.no_grad():
        before = m(x)
        fc1.in_s.mul_(1.5)  # in place
        with reference_layers(monkeypatch):
            want = m(x)
        assert not torch.equal(want, before) and torch.equal(m(x), want)
        fc1.w_scale = fc1.w_scale * 0.5  # a new tensor
        with reference_layers(monkeypatch):
            want = m(x)
        assert torch.equal(m(x), want)
        m.blocks[1].attn.p_s.mul_(0.75)
        with reference_layers(monkeypatch):
            want2 = m(x)
        assert not torch.equal(want2, want) and torch.equal(m(x), want2)


def test_quantizers_are_checked_at_load(tmp_path):
    from tests.export.test_errors import _rewrite
    _, path = _export(tmp_path, "vit", "w4a4")
    for key, value, what in (("quant.blocks.0.attn.proj.in_s", 0.0, "step size"),
                             ("quant.blocks.1.attn.p_s", float("nan"), "NaN"),
                             ("quant.blocks.0.mlp.fc1.w_scale", float("inf"), "weight scale")):
        bad = _rewrite(path, tmp_path / "bad.lowbit", lambda m, t: t[key].fill_(value))
        with pytest.raises(CheckpointError, match=what):
            export.load(bad, verify=False)


def test_bad_images_are_refused(tmp_path):
    _, path = _export(tmp_path, "vit", "w4a4")
    m = export.load(path)
    x = _inputs(2)
    x[1, 0, 3, 4] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match="NaN or inf"):
        m(x)
    with torch.no_grad(), pytest.raises(TypeError, match="float32/float16/bfloat16"):
        m(torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8))


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_cpu_backend_traces_without_graph_breaks(tmp_path, kind):
    """``torch.compile(fullgraph=True)`` traces the whole CPU backend (one graph); with the eager backend the
    compiled model computes the same logits bit for bit. ``export.load(compile=...)`` wraps it."""
    import torch._dynamo
    _, path = _export(tmp_path, kind, "w4a4")
    m = export.load(path, compile={"backend": "eager", "fullgraph": True})
    assert hasattr(m, "_orig_mod") and m.lowbit_manifest["bits"] == "w4a4"
    x = _inputs(2)
    torch._dynamo.reset()
    with torch.no_grad():
        explain = torch._dynamo.explain(m._orig_mod)(x)
        assert explain.graph_break_count == 0 and explain.graph_count == 1
        assert torch.equal(m(x), m._orig_mod(x))


@pytest.mark.parametrize("bits", [1.58, 3, 4, 8])
def test_codes_are_primitives_quantize(bits):
    """The CPU backend's codes of every kind (int8 ``a - c``, float centred ``a - z``) against
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
            c = cpu.act_codes(s, zt, bits, int8, "t")
            got = cpu.codes_(x.clone(), s, c)
            assert got.dtype == (torch.int8 if int8 else torch.float32)  # int8: torch._int_mm's operand
            assert torch.equal(got.long() - int(c.add) + z if int8 else got.long() + z, want), (z, int8)


def test_large_batches_run_in_chunks(tmp_path, monkeypatch):
    """Batches whose temporaries pass ``CHUNK_BYTES`` run chunk by chunk with the same logits bit for bit; models
    with float GEMMs whose results may depend on the batch shape (SULQ, activation correction) are never chunked."""
    from export import runtime
    from export.runtime import PackedPatchEmbed
    from tests.export.export_utils import corrected
    _, path = _export(tmp_path, "vit", "w4a4")
    m = export.load(path)
    assert m.lowbit_chunk_plan[:2] == (8, 8)
    seen = []
    pe = next(x for x in m.modules() if isinstance(x, PackedPatchEmbed))
    pe.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].shape[0]))
    x = _inputs(7)
    with torch.no_grad():
        with reference_layers(monkeypatch):
            want = m(x)
        seen.clear()
        assert torch.equal(m(x), want) and seen == [7]
        monkeypatch.setattr(runtime, "CHUNK_BYTES", 3 * 4 * 16 * 192)  # 3 images of 16 tokens x 192 wide
        seen.clear()
        assert torch.equal(m(x), want) and seen == [3, 3, 1]
    _, q = quantized("vit", "w4a4", softmax_quantizer="sulq")
    corrected(q)
    name, kw = arch("vit")
    both = export.export_model(q, tmp_path / "both.lowbit", arch=name, config=kw, bits="w4a4")
    assert not hasattr(export.load(both), "lowbit_chunk_plan")


def test_fused_vit_blocks_run_as_one_function(tmp_path, monkeypatch):
    """A timm ViT block with fused LayerNorms runs :func:`kernels.cpu.vit_block` (no submodule calls) with the
    reference's logits bit for bit (SULQ, activation correction); a forward hook on a submodule sends that block
    back through its modules."""
    from timm.models.vision_transformer import Block

    from tests.export.export_utils import corrected
    _, q = quantized("vit", "w4a4", softmax_quantizer="sulq")
    corrected(q)  # a block-level forward hook (the activation correction) and SULQ probabilities
    name, kw = arch("vit")
    path = export.export_model(q, tmp_path / "sulq.lowbit", arch=name, config=kw, bits="w4a4")
    m = export.load(path)
    blocks = [b for b in m.modules() if isinstance(b, Block)]
    assert blocks and all("forward" in b.__dict__ and cpu.attention_plan(b.attn).sulq for b in blocks)
    x = _inputs(3)
    with torch.no_grad(), reference_layers(monkeypatch):
        want = m(x)
    calls = []
    monkeypatch.setattr(cpu, "vit_block", lambda *a, orig=cpu.vit_block: calls.append(1) or orig(*a))
    with torch.no_grad():
        assert torch.equal(m(x), want) and len(calls) == len(blocks)
        seen = []
        h = blocks[0].attn.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
        calls.clear()
        assert torch.equal(m(x), want) and len(seen) == 1 and len(calls) == len(blocks) - 1
        h.remove()
        for b in (x, x[:1]):
            assert torch.equal(m(b), want[: len(b)])


def test_layernorm_is_the_reference():
    """:func:`kernels.cpu.layernorm` (the mean as the sum over the width, 0-d tensor constants, in place) against
    ``kernels.reference.layernorm`` bit for bit, widths that are and are not powers of two, with and without affine."""
    g = torch.Generator().manual_seed(3)
    for k in (5, 48, 100, 128, 192, 768):
        x = torch.randn(257, k, generator=g) * 3 + torch.randn(257, 1, generator=g) * 50
        w, b = torch.randn(k, generator=g), torch.randn(k, generator=g)
        for eps in (1e-6, 1e-5):
            for ww, bb in ((w, b), (None, None), (w, None)):
                got = cpu.layernorm(x, cpu.layernorm_plan(k, eps, ww, bb))
                assert torch.equal(got, R.layernorm(x, ww, bb, eps)), (k, eps, ww is None, bb is None)


def test_probability_codes_skip_a_clamp_only_when_in_bounds():
    """The clamp of the probability codes is left out only when every softmax output rounds into the bounds: then
    the codes equal ``primitives.quantize``'s, including ``P = 1`` and a one-hot row."""
    from lowbit import primitives as P
    for s, bits, in_bounds in ((1 / 15, 4, True), (1 / 255, 8, True), (0.0258, 4, False), (1 / 15.6, 4, False)):
        st, z = torch.tensor(s), torch.tensor(0.0)
        c = cpu.act_codes(st, z, bits, False, "p")
        assert cpu.probabilities_in_bounds(st, c) is in_bounds
        if in_bounds:
            logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(bits)) * 4
            logits[0] = -1e4
            logits[0, 3] = 0.0  # one-hot row: P = 1 exactly
            p = torch.softmax(logits, dim=-1)
            assert float(p.max()) == 1.0
            got = cpu.codes_(p.clone(), st, c, clamp=False)
            assert torch.equal(got.long(), P.quantize(p, st, z, bits).long())
