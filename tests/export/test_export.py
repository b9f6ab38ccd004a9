"""Export -> load -> compare against the optimiser's fake-quant model; packed contents; memory; size."""
import pytest
import torch
from torch import nn

import export
from export import exporter as E
from export import format as fmt
from export.loader import resident_bytes
from export.runtime import PackedLinear, PackedMlp, PackedPatchEmbed, PackedViTAttention, PackedWindowAttention
from lowbit import packing
from quant.modules import QuantLinear, set_mode
from tests.quant.ptq_utils import one_thread  # noqa: F401

from .export_utils import BITS, arch, quantized

SWIN_IMAGES = 300


def _export(tmp_path, kind, bits, **over):
    fp, q = quantized(kind, bits, **over)
    name, kw = arch(kind, **over)
    path = export.export_model(q, tmp_path / f"{kind}_{bits}.lowbit", arch=name, config=kw, bits=bits)
    return fp, q, path


@pytest.mark.parametrize("kind", ["vit", "deit", "swin"])
@pytest.mark.parametrize("bits", BITS)
def test_parity_with_fake_quant(tmp_path, folder_images, kind, bits):
    """Same 1,000 folder images (Swin, slower on CPU: the first 300). The optimiser's model in ``"int"`` mode and the
    loaded checkpoint (CPU reference path) agree bit for bit, so identical top-1 on every image and max logit
    difference 0 (the bar: >= 99.9% and <= 1e-3 of the logit range). The ``"quant"`` forward the optimiser trains
    is the same integer arithmetic by default (bit-equal too); its float fake-quant forward (``--forward fake``)
    differs from both only by float rounding moving an activation across a code boundary on a few images."""
    from quant.modules import set_forward
    _, q, path = _export(tmp_path, kind, bits)
    m = export.load(path)
    x = folder_images[:SWIN_IMAGES] if kind == "swin" else folder_images
    with torch.no_grad():
        b = m(x)
        set_mode(q, "int")
        a = q(x)
        set_mode(q, "quant")
        assert torch.equal(q(x), b)
        set_forward(q, "fake")
        c = q(x)
        set_forward(q, "int")
    rng = a.max() - a.min()
    assert (a.argmax(1) == b.argmax(1)).float().mean().item() >= 0.999
    assert ((a - b).abs().amax(1) / rng).max() <= 1e-3
    assert torch.equal(a, b)
    assert not torch.equal(c, b)
    per_image = (c - b).abs().amax(1) / rng
    assert (c.argmax(1) == b.argmax(1)).float().mean().item() >= 0.99
    assert per_image.median() <= 1e-6 and (per_image <= 1e-3).float().mean() >= 0.95


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_loaded_model_is_packed_and_uses_kernels(tmp_path, monkeypatch, backend):
    """Weights stay packed; every quantized op is a ``kernels.ops`` call: on the CPU backend one layer op per
    layer, on Triton (interpreter) the single ops under them (the CPU backend's arithmetic: tests/kernels/test_cpu.py)."""
    _, q, path = _export(tmp_path, "swin", "w3a3", embed_dim=64)  # head dim 32, as the Triton attention takes
    m = export.load(path)
    kinds = {type(x) for x in m.modules()}
    assert {PackedLinear, PackedMlp, PackedPatchEmbed, PackedWindowAttention} <= kinds
    assert not any(isinstance(x, (nn.Linear, nn.Conv2d, QuantLinear)) for x in m.modules())
    assert not any(p.is_floating_point() and p.numel() > 4096 for x in m.modules() if isinstance(x, PackedLinear)
                   for p in x.buffers())
    from kernels import ops
    calls = {"packed_linear": 0, "quant_attention": 0, "layernorm_quantize": 0, "linear_layer": 0, "mlp_layer": 0,
             "attention_layer": 0}
    for name in calls:
        orig = getattr(ops, name)

        def spy(*a, _n=name, _o=orig, **k):
            calls[_n] += 1
            return _o(*a, **k)
        monkeypatch.setattr(ops, name, spy)
    with torch.no_grad(), ops.using_backend(backend):
        m(torch.randn(2, 3, 32, 32))
    n_lin = sum(isinstance(x, PackedLinear) for x in m.modules())
    n_attn = sum(isinstance(x, PackedWindowAttention) for x in m.modules())
    n_mlp = sum(isinstance(x, PackedMlp) for x in m.modules())
    # the linears outside attention and MLP: the patch embedding, the patch merging reduction, the head
    assert calls["attention_layer"] == n_attn and calls["mlp_layer"] == n_mlp
    assert calls["linear_layer"] == n_lin - 2 * n_attn - 2 * n_mlp
    if backend == "triton":
        assert calls["packed_linear"] == n_lin and calls["quant_attention"] == n_attn
        # every block's norm1 and norm2 and the patch merging norm are fused into their linears
        assert calls["layernorm_quantize"] == 2 * n_attn + 1
    else:
        assert calls["packed_linear"] == calls["quant_attention"] == calls["layernorm_quantize"] == 0


@pytest.mark.parametrize("bits", ["w1.58a8", "w3a3", "w6a6"])
def test_packed_contents_are_the_deployed_codes(tmp_path, bits):
    _, q, path = _export(tmp_path, "vit", bits)
    tensors, man = fmt.load(path)
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.fc2", "head"):
        d = q.get_submodule(name).deploy()
        fm = packing.format_for_bits(q.get_submodule(name).w_bits)
        planes = {p: tensors[f"quant.{name}.w.{p}"] for p, _ in packing.FORMATS[fm].planes}
        pw = packing.PackedWeight(fm, q.get_submodule(name).w_bits, *d["codes"].shape, planes)
        assert torch.equal(packing.unpack(pw), d["codes"])
        assert torch.equal(tensors[f"quant.{name}.w_zero"], d["w_zero"].to(torch.uint8))
        assert torch.equal(tensors[f"quant.{name}.bias"], d["bias"])
    qkv = q.get_submodule("blocks.0.attn.qkv").deploy()
    ln = q.get_submodule("blocks.0.norm1")
    assert torch.allclose(tensors["quant.blocks.0.attn.qkv.ln_weight"], ln.weight / qkv["r"], rtol=1e-6)
    assert torch.allclose(tensors["quant.blocks.0.attn.qkv.ln_bias"], (ln.bias - qkv["shift"]) / qkv["r"],
                          rtol=1e-5, atol=1e-6)
    assert "float.blocks.0.norm1.weight" not in tensors and tensors["float.pos_embed"].dtype == torch.float16
    assert man["bits"] == bits and man["architecture"] == "vit_tiny_patch16_224"
    assert man["model_args"]["embed_dim"] == 48 and man["format_version"] == fmt.FORMAT_VERSION


def test_unfusable_norm_keeps_rescale(tmp_path, folder_images):
    """Swin windows that pad the input (resolution 6 vs window 4): the LayerNorm stays float, r/shift stored."""
    _, q, path = _export(tmp_path, "swin", "w4a4", img_size=24, patch_size=4, window_size=4)
    tensors, _ = fmt.load(path)
    assert "quant.layers.0.blocks.0.attn.qkv.r" in tensors and "float.layers.0.blocks.0.norm1.weight" in tensors
    assert "quant.layers.0.blocks.0.mlp.fc1.ln_weight" in tensors
    m = export.load(path)
    x = torch.nn.functional.interpolate(folder_images[:64], size=24, mode="bilinear")
    set_mode(q, "int")
    with torch.no_grad():
        a, b = q(x), m(x)
    assert torch.equal(a, b)


def test_resident_bytes_close_to_file(tmp_path):
    """Packed layers hold exactly the file's bytes; the rest is the fp16 float tensors upcast to fp32 and the
    skeleton's derived buffers (Swin index/mask), so resident bytes stay within 1.2x of the file (on a CUDA-free
    load without the CPU backend's cached constants; those come on top: tests/kernels/test_cpu.py)."""
    from kernels import ops
    _, _, path = _export(tmp_path, "deit", "w4a4", embed_dim=128, num_heads=2, depth=2)
    tensors, _ = fmt.load(path)
    with ops.using_backend("triton"):  # (the Triton backend caches no constants here)
        m = export.load(path)
    quant_file = sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith("quant."))
    float_file = sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith("float."))
    packed = sum(resident_bytes(x) for x in m.modules() if isinstance(x, (PackedLinear,)))
    attn_qp = sum(b.numel() * 4 for x in m.modules() if isinstance(x, PackedViTAttention)
                  for n, b in x.named_buffers(recurse=False))
    assert packed + attn_qp == quant_file
    assert resident_bytes(m) == quant_file + 2 * float_file
    size = path.stat().st_size
    assert resident_bytes(m) <= 1.2 * size, (resident_bytes(m), size)


def test_size_formula(tmp_path):
    """The file is its tensors plus the JSON header; tensor bytes follow the format's per-layer formula."""
    fp, q, path = _export(tmp_path, "vit", "w4a4")
    tensors, man = fmt.load(path)
    expect = 0
    for name, m in q.named_modules():
        if isinstance(m, QuantLinear):
            n, k = m.weight.shape
            expect += n * packing.padded_k(k, "int4") // 2 + n * (4 + 1 + 4) + 8
            if m.rescale:
                expect += 8 * k
    pe = q.patch_embed.proj
    n, k = pe.weight.shape[0], pe.weight[0].numel()
    expect += n * packing.padded_k(k, "int4") // 2 + n * (4 + 1 + 4) + 8
    expect += 8 * 4 * len([x for x in q.modules() if type(x).__name__ == "QuantViTAttention"])
    fused = {f"blocks.{i}.norm{j}.{p}" for i in range(2) for j in (1, 2) for p in ("weight", "bias")}
    expect += sum(v.numel() * 2 for k, v in fp.state_dict().items()
                  if k not in fused and not any(k.startswith(f"{x}.") for x, mm in fp.named_modules()
                                                if isinstance(mm, (nn.Linear, nn.Conv2d))))
    assert E.checkpoint_bytes(tensors) == expect
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    assert path.stat().st_size == 8 + header + expect


def test_triton_path_matches_reference(tmp_path):
    """The same loaded model through the Triton kernels (interpreter on CPU) and through the references (head dim
    32: the Triton attention takes 32, 64, 128)."""
    from kernels import ops
    _, _, path = _export(tmp_path, "vit", "w4a8", embed_dim=64, num_heads=2)
    m = export.load(path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = m(x)
        with ops.using_backend("triton"):
            tri = m(x)
    assert torch.allclose(tri, ref, atol=1e-3 * float(ref.max() - ref.min()))


@pytest.mark.parametrize("bits,limit", [("w1.58a8", 1 / 6), ("w4a4", 1 / 3.5)])
def test_vit_b_size_ratio(tmp_path, bits, limit):
    """Real ViT-B/16 (random init) checkpoint size vs its fp16 state dict. Sizes depend on shapes only, so the
    quantizers are marked initialised instead of calibrated (the codes are not checked here)."""
    import copy

    import timm

    from quant.surgery import quantize_model
    fp = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    q = quantize_model(copy.deepcopy(fp), bits)
    for m in q.modules():
        if hasattr(m, "initialised"):
            m.initialised.fill_(True)
    path = export.export_model(q, tmp_path / "vit_b.lowbit", arch="vit_base_patch16_224", config={}, bits=bits)
    ratio = path.stat().st_size / E.fp16_state_bytes(fp)
    assert ratio <= limit, ratio
    assert ratio >= {"w1.58a8": 0.125, "w4a4": 0.25}[bits]  # the packed weights alone: 2 / 16 and 4 / 16 bits


def _unfused_attention(a, x, mask):
    """The attention block as separate ops: float qkv, per-slice quantize, float attention, float proj input."""
    from kernels import ops
    b, n, _ = x.shape
    qkv = a.qkv(x).reshape(b, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = (ops.quantize(t.contiguous(), a.qp(name)) for t, name in zip(qkv.unbind(0), "qkv"))
    swin = isinstance(a, PackedWindowAttention)
    o = ops.quant_attention(q, k, v, a.qp("q"), a.qp("k"), a.qp("v"), a.scale, a.qp("p"),
                            rel_bias=a.rel_pos_bias() if swin else None,
                            mask=None if mask is None else mask.float())
    return a.proj(o.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("kind,bits", [("vit", "w4a4"), ("swin", "w3a3"), ("vit", "w1.58a8")])
def test_fused_attention_equals_the_unfused_ops(tmp_path, kind, bits):
    """The deployed attention (qkv GEMM emitting Q/K/V codes, attention read in place and emitting proj's input
    codes) is bit-identical to quantize -> attention -> quantize as separate ops, on the Triton backend
    (interpreter) and on the CPU backend."""
    from kernels import ops
    over = dict(embed_dim=64, num_heads=2) if kind == "vit" else dict(embed_dim=64)  # head dim 32
    _, _, path = _export(tmp_path, kind, bits, **over)
    m = export.load(path)
    mods = [x for x in m.modules() if isinstance(x, (PackedViTAttention, PackedWindowAttention))]
    seen = []
    hooks = [x.register_forward_pre_hook(lambda mod, args, kw: seen.append((mod, args, kw)), with_kwargs=True)
             for x in mods[:2] + mods[-1:]]
    with torch.no_grad():
        m(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
    for h in hooks:
        h.remove()
    assert seen
    for backend in ("triton", "cpu"):
        with ops.using_backend(backend):
            with torch.no_grad():
                for a, args, kw in seen:
                    mask = kw.get("mask", args[1] if len(args) > 1 else None)
                    fused, unfused = a(args[0], mask) if mask is not None else a(args[0]), _unfused_attention(
                        a, args[0], mask)
                    assert fused.dtype == unfused.dtype and torch.equal(fused, unfused), (backend, type(a).__name__)


def test_deployed_forward_checks_its_quantizers_once(tmp_path, monkeypatch):
    """After the first forward (in inference mode, as deployed), the Triton path re-checks no quantizer: a check
    is a host sync on a GPU. The per-column Q/K/V requant quantizer included."""
    from kernels import ops
    from lowbit import primitives as P
    over = dict(embed_dim=64, num_heads=2)
    _, _, path = _export(tmp_path, "vit", "w4a4", **over)
    m = export.load(path)
    checks = []
    real = P.check_step
    monkeypatch.setattr(P, "check_step", lambda s: checks.append(1) or real(s))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with ops.using_backend("triton"), torch.inference_mode():
        first = m(x)
        assert checks
        checks.clear()
        again = m(x)
    assert checks == [] and torch.equal(first, again)
