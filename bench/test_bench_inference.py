"""CPU inference of the exported demo checkpoint against the float timm demo model, in the same process, at batch 1
and 64 (``pytest bench/test_bench_inference.py``; the table, with each row's ratio to the float model, is printed at
the end and saved to ``bench/results.json``).

Checkpoint: ``$LOWBIT_BENCH_CHECKPOINT``, else ``runs/demo-w4a4-e2e/model.lowbit`` (``python -m quant.run --model demo
--bits w4a4``), else a W4A4 demo checkpoint made here with ``--method rtn`` on 32 seeded random images (the timings
depend on shapes and bit widths, not on how well the quantizers were trained). Every forward runs under
``torch.inference_mode`` with PyTorch's default thread count. Rows: the float model (baseline), the loaded checkpoint's
CPU fast path (``export.load``, int8 ``torch._int_mm`` and exact float GEMM backends), the packed path
(``fast=False``: ``kernels.reference``, as before the fast path). ``LOWBIT_BENCH_COMPILE=1`` adds both models under
``torch.compile`` (inductor; compile time excluded; the compiled checkpoint is not bit-identical to the eager one).
"""
import os
from pathlib import Path

import pytest
import torch

from _report import record

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 64)
IMPLS = ["baseline float timm", "lowbit fast int8", "lowbit fast float", "lowbit packed (reference)"]
COMPILED = ["float timm + compile", "lowbit fast + compile"]
if os.environ.get("LOWBIT_BENCH_COMPILE") == "1":
    IMPLS += COMPILED


def _checkpoint(tmp: Path) -> Path:
    for p in (os.environ.get("LOWBIT_BENCH_CHECKPOINT"), ROOT / "runs" / "demo-w4a4-e2e" / "model.lowbit"):
        if p and Path(p).is_file():
            return Path(p)
    import copy

    import export
    from quant.calibrate import calibrate
    from quant.models import load_model
    from quant.surgery import quantize_model
    fp = load_model("demo")
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"),
                  torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    return export.export_model(q, tmp / "demo_w4a4_rtn.lowbit", arch="demo", config={}, bits="w4a4")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import export
    from quant.models import load_model
    path = _checkpoint(tmp_path_factory.mktemp("ckpt"))
    fp = load_model("demo").eval()
    out = {"baseline float timm": fp, "lowbit fast int8": export.load(path, fast="int8"),
           "lowbit fast float": export.load(path, fast="float"), "lowbit packed (reference)": export.load(path, fast=False)}
    if COMPILED[0] in IMPLS:
        out[COMPILED[0]] = torch.compile(fp)
        out[COMPILED[1]] = export.load(path, compile=True)
    return out


def _time(benchmark, fn, rounds):
    with torch.inference_mode():
        for _ in range(3):  # warm-up (and compilation)
            fn()
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=2)
    return benchmark.stats.stats.median


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", IMPLS)
def test_demo_inference(benchmark, models, batch, impl):
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    m = models[impl]
    slow = impl.startswith("lowbit packed")
    rounds = (5 if slow else 30) if batch > 1 else (20 if slow else 300)
    seconds = _time(benchmark, lambda: m(x), rounds)
    record("demo cpu", f"batch {batch}", impl, seconds, batch, unit="img/s", scale=1.0)
