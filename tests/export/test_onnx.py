"""The QDQ ONNX export (:mod:`export.onnx`): a valid standard graph, integer weights behind DequantizeLinear, one
Q/DQ pair per quantizer on its own grid, and ONNX Runtime reproducing the loaded model (ViT, DeiT, Swin)."""
import copy
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import export
from calib import data as D
from export.onnx import qdq_forwards, to_onnx
from export.runtime import PackedLinear, _PackedAttention
from lowbit import models as M
from lowbit import packing
from lowbit import primitives as P
from lowbit.errors import UserError
from quant.calibrate import calibrate
from quant.surgery import quantize_model
from tests.quant.ptq_utils import one_thread  # noqa: F401

from .export_utils import arch, quantized

onnx = pytest.importorskip("onnx", reason="pip install -e \".[onnx]\" (the test extra installs it)")
ort = pytest.importorskip("onnxruntime", reason="pip install -e \".[onnx]\" (the test extra installs it)")
ROOT = Path(__file__).resolve().parents[2]


def _export(tmp_path, kind, bits, **over):
    _, q = quantized(kind, bits, **over)
    name, kw = arch(kind, **over)
    return export.export_model(q, tmp_path / f"{kind}_{bits}.lowbit", arch=name, config=kw, bits=bits)


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])


def _images(n=32, seed=4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 1.5


@pytest.mark.parametrize("kind,bits", [("vit", "w4a4"), ("vit", "w1.58a8"), ("deit", "w3a3"), ("deit", "w8a8"),
                                       ("swin", "w4a4"), ("swin", "w6a6")])
def test_onnx_runtime_reproduces_the_loaded_model(tmp_path, kind, bits):
    """ONNX Runtime on the exported graph against ``export.load``'s model on random images: the logits agree to
    float rounding on most images; where a value lands on the other side of a code boundary (float vs integer
    accumulation) an image moves by a few code steps, never more than 5% of the logit range. The torch QDQ forward
    the graph is traced from agrees the same way."""
    m = export.load(_export(tmp_path, kind, bits))
    onnx_path = to_onnx(m, tmp_path / "m.onnx", batch=None)
    x = _images()
    with torch.no_grad():
        want = m(x)
        with qdq_forwards(m):
            traced = m(x)
    got = _run(onnx_path, x)
    rng = float(want.max() - want.min())
    for other in (got, traced):
        per_image = (other - want).abs().amax(1) / rng
        assert per_image.median() <= 1e-3 and per_image.max() <= 0.05, per_image
        assert (other.argmax(1) == want.argmax(1)).float().mean() >= 0.9
    assert torch.equal(m(x[:2]), want[:2])  # the model's own forwards are back after the export


@pytest.mark.parametrize("bits,opset", [("w4a4", 21), ("w1.58a8", 21), ("w4a4", 17), ("w6a6", 21)])
def test_graph_is_standard_qdq(tmp_path, bits, opset):
    """``onnx.checker`` passes; every packed weight is an integer initializer of codes in ``[0, qmax]`` (uint4 from
    opset 21 for weights of at most 4 bits, else uint8) behind a per-channel DequantizeLinear (axis 1), no float
    weight matrix is left; one QuantizeLinear per activation
    quantizer (each linear's input, and Q, K, V, P per attention), a Clip before it exactly on grids under 8 bits,
    with bounds ``(0 - z) s`` and ``(qmax - z) s``."""
    m = export.load(_export(tmp_path, "vit", bits))
    g = onnx.load(str(to_onnx(m, tmp_path / "m.onnx", opset=opset)))
    onnx.checker.check_model(g, full_check=True)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.graph.initializer}
    lins = {n: mod for n, mod in m.named_modules() if isinstance(mod, PackedLinear)}
    attns = [mod for mod in m.modules() if isinstance(mod, _PackedAttention)]
    dq_w = [n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".w_codes")]
    assert len(dq_w) == len(lins)
    for node in dq_w:
        name = node.input[0][: -len(".w_codes")]
        codes, scale, zero = (inits[i] for i in node.input)
        layer = lins[name]
        dtype = "uint4" if opset >= 21 and P.qmax(layer.w_bits) <= 15 else "uint8"
        assert codes.dtype.name == dtype and zero.dtype.name == dtype, (codes.dtype, dtype)
        assert codes.shape == (layer.in_features, layer.out_features)
        assert codes.astype("uint8").max() <= P.qmax(layer.w_bits)
        assert torch.equal(torch.from_numpy(codes.astype("uint8")).t(),
                           packing.unpack(layer.packed()).to(torch.uint8))
        assert [a.i for a in node.attribute if a.name == "axis"] == [1]
        assert torch.equal(torch.from_numpy(scale), layer.w_scale)
    big_float = [k for k, v in inits.items() if v.dtype.name == "float32" and v.size > 4096]
    assert not big_float, big_float
    ops = Counter(n.op_type for n in g.graph.node)
    assert ops["QuantizeLinear"] == len(lins) + 4 * len(attns)
    narrow = [qp for qp in [x.in_qp for x in lins.values()] + [a.qp(n) for a in attns for n in "qkvp"]
              if P.qmax(qp.bits) < 255]  # (the image quantizer of the patch embedding is 8-bit at every setting)
    clips = {n.output[0]: n for n in g.graph.node if n.op_type == "Clip"}
    assert len(clips) == len(narrow) and (len(narrow) > 0) == (bits != "w1.58a8")
    for node in g.graph.node:  # each Clip feeds a QuantizeLinear, its bounds on the code grid of that quantizer
        if node.op_type == "QuantizeLinear" and node.input[0] in clips:
            s, z = (float(onnx.numpy_helper.to_array(_const(g, i))) for i in node.input[1:3])
            lo, hi = (float(onnx.numpy_helper.to_array(_const(g, i))) for i in clips[node.input[0]].input[1:3])
            assert lo == float(torch.tensor(-z) * s) and round(hi / s + z) in (15, 63), (lo, hi, s, z)


def _const(g, name):
    """The tensor behind ``name``: an initializer or a Constant node's value."""
    for i in g.graph.initializer:
        if i.name == name:
            return i
    for n in g.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return n.attribute[0].t
    raise KeyError(name)


def test_dynamic_and_fixed_batch(tmp_path):
    m = export.load(_export(tmp_path, "vit", "w4a8"))
    fixed = to_onnx(m, tmp_path / "fixed.onnx", batch=2)
    dynamic = to_onnx(m, tmp_path / "dynamic.onnx", batch=None)
    x = _images(3)
    with torch.no_grad():
        want = m(x)
    assert torch.allclose(_run(dynamic, x), want, atol=0.05 * float(want.max() - want.min()))
    assert _run(fixed, x[:2]).shape == (2, 10)
    with pytest.raises(Exception):
        _run(fixed, x)  # the fixed graph takes its batch only
    with pytest.raises(UserError, match="exists"):
        to_onnx(m, fixed, batch=2)


def test_sulq_is_refused(tmp_path):
    _, q = quantized("vit", "w4a4", softmax_quantizer="sulq")
    name, kw = arch("vit")
    m = export.load(export.export_model(q, tmp_path / "s.lowbit", arch=name, config=kw, bits="w4a4"))
    with pytest.raises(UserError, match="SULQ"):
        to_onnx(m, tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists() and not list(tmp_path.glob("*.tmp"))


def test_cli(tmp_path):
    path = _export(tmp_path, "deit", "w4a4")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "export.onnx", *map(str, args)], capture_output=True, text=True,
                              cwd=str(ROOT), timeout=600)
    r = cli(path, "-o", tmp_path / "d.onnx", "--batch", "dynamic")
    assert r.returncode == 0 and (tmp_path / "d.onnx").is_file(), r.stderr
    for args, what in (((tmp_path / "none.lowbit", "-o", tmp_path / "x.onnx"), "does not exist"),
                       ((path, "-o", tmp_path / "x.onnx", "--batch", "two"), "--batch"),
                       ((path, "-o", tmp_path / "d.onnx"), "exists"),
                       ((path, "-o", tmp_path / "x.onnx", "--opset", "11"), "opset 13")):
        r = cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and what in lines[0], r.stderr


@pytest.mark.data
@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("bits", ["w1.58a8", "w3a3", "w4a4", "w6a6", "w8a8"])
def test_demo_agreement_on_cifar10(tmp_path, real_data, bits, opset):
    """The demo, calibrated (round-to-nearest) on 64 CIFAR-10 training images at every bit width, exported to ONNX:
    ONNX Runtime's top-1 agrees with ``export.load``'s on >= 99.5% of 2,000 seeded CIFAR-10 test images with the
    default uint8 weights, which it runs through its integer kernels; the uint4 weights of opset 21 run its float
    path, which moves more images across a code boundary at 3 bits (>= 99% there)."""
    fp = M.load_model("demo")
    tf = M.eval_transform(fp, M.resolve("demo"))
    calib_x, _ = D.load_subset(D.scan(str(real_data / "cifar10" / "train"), "--data"), tf, 64, seed=0)
    q = calibrate(quantize_model(copy.deepcopy(fp), bits), calib_x)
    m = export.load(export.export_model(q, tmp_path / "demo.lowbit", arch="demo", config={}, bits=bits))
    x, _ = D.load_subset(D.scan(str(real_data / "cifar10" / "test"), "--val"), tf, 2000, seed=0)
    path = to_onnx(m, tmp_path / "demo.onnx", batch=None, opset=opset)
    with torch.no_grad():
        want = torch.cat([m(c) for c in x.split(250)])
    got = torch.cat([_run(path, c) for c in x.split(250)])
    agree = float((got.argmax(1) == want.argmax(1)).float().mean())
    print(f"\n{bits} opset {opset}: top-1 agreement {100 * agree:.2f}% on {len(x)} images, max |logit diff| "
          f"{float((got - want).abs().max()):.4f} (logit range {float(want.max() - want.min()):.2f})")
    assert agree >= (0.99 if opset >= 21 and bits == "w3a3" else 0.995)
