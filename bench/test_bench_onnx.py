"""ONNX Runtime on the exported QDQ graph of the demo checkpoint, in the same process as its baselines, at batch 1
and 64 (``pytest bench/test_bench_onnx.py -s``; rows in ``bench/bench_results.json`` with their ratio to the first).

Rows, timed round-robin (medians of 200 rounds at batch 1, 20 at batch 64), ONNX Runtime's CPU provider with its
default threads and graph optimizations (its idle threads not spinning, which would starve the torch rows of this
2-core machine: torch fp32 took 20x longer beside spinning ORT threads), torch under ``inference_mode`` with its
default threads:
``baseline ORT float`` (the float timm demo exported with ``torch.onnx.export``), ``ORT QDQ`` (``export.onnx`` of the
W4A4 checkpoint), ``torch fp32 timm`` and ``export.load`` (the CPU backend). The checkpoint is the one of
``bench/test_bench_inference.py``. Skipped without ``onnxruntime`` (``pip install -e ".[onnx]"``).
"""
import warnings

import pytest
import torch
from _report import record
from test_bench_inference import _checkpoint, _interleaved

ort = pytest.importorskip("onnxruntime", reason="pip install -e \".[onnx]\"")

IMPLS = ["baseline ORT float", "ORT QDQ", "torch fp32 timm", "export.load"]


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    import export
    from export.onnx import to_onnx
    from lowbit.models import load_model
    tmp = tmp_path_factory.mktemp("onnx")
    fp = load_model("demo").eval()
    m = export.load(_checkpoint(tmp))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fp, (torch.randn(1, 3, 32, 32),), str(tmp / "float.onnx"), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    qdq = to_onnx(m, tmp / "qdq.onnx", batch=None)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle ORT threads would starve torch's
    sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
                for k, p in (("baseline ORT float", tmp / "float.onnx"), ("ORT QDQ", qdq))}

    def ort_run(sess):
        return lambda x: sess.run(None, {"images": x.numpy()})
    return {**{k: ort_run(s) for k, s in sessions.items()}, "torch fp32 timm": fp, "export.load": m}


@pytest.mark.parametrize("batch", (1, 64))
def test_onnx_inference(runners, batch):
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        med = _interleaved({k: (lambda f=runners[k]: f(x)) for k in IMPLS}, 200 if batch == 1 else 20)
    for impl in IMPLS:
        record("demo onnx", f"batch {batch}", impl, med[impl], batch, unit="img/s", scale=1.0)
