"""CPU inference of the exported demo checkpoint against the float timm demo model, in the same process, at batch 1
and 64 (``pytest bench/test_bench_inference.py``; the table, with each row's ratio to the float model, is printed at
the end and saved to ``bench/bench_results.json``).

Checkpoint: ``$LOWBIT_BENCH_CHECKPOINT``, else ``runs/demo-w4a4-e2e/model.lowbit`` (``python -m quant.run --model demo
--bits w4a4``), else a W4A4 demo checkpoint made here with ``--method rtn`` on 32 seeded random images (the timings
depend on shapes and bit widths, not on how well the quantizers were trained). Every forward runs under
``torch.inference_mode`` with PyTorch's default thread count; the implementations are timed round-robin in blocks of
consecutive calls, the first call of each block not recorded (medians of 200 calls at batch 1, 20 at batch 64). Rows: the float model (baseline), the loaded checkpoint on the CPU backend
with the GEMM it chooses on this machine (``export.load``; the row names the choice), then with each GEMM forced
(int8 ``torch._int_mm``, exact float GEMM: ``kernels.cpu.set_gemm``). ``LOWBIT_BENCH_COMPILE=1`` adds both models
under ``torch.compile`` (inductor; compile time excluded; the compiled checkpoint is not bit-identical to the eager
one).
"""
import os
from pathlib import Path

import pytest
import torch
from _report import record

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 64)
from kernels import cpu

DEFAULT = f"lowbit default ({cpu.gemm()})"
IMPLS = ["baseline float timm", DEFAULT, "lowbit int8 GEMM", "lowbit float GEMM"]
GEMM_OF = {DEFAULT: None, "lowbit int8 GEMM": "int8", "lowbit float GEMM": "float"}
COMPILED = ["float timm + compile", "lowbit + compile"]
if os.environ.get("LOWBIT_BENCH_COMPILE") == "1":
    IMPLS += COMPILED


def _checkpoint(tmp: Path) -> Path:
    for p in (os.environ.get("LOWBIT_BENCH_CHECKPOINT"), ROOT / "runs" / "demo-w4a4-e2e" / "model.lowbit"):
        if p and Path(p).is_file():
            return Path(p)
    import copy

    import export
    from lowbit.models import load_model
    from quant.calibrate import calibrate
    from quant.surgery import quantize_model
    fp = load_model("demo")
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"),
                  torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    return export.export_model(q, tmp / "demo_w4a4_rtn.lowbit", arch="demo", config={}, bits="w4a4")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import export
    from lowbit.models import load_model
    path = _checkpoint(tmp_path_factory.mktemp("ckpt"))
    fp = load_model("demo").eval()
    out = {"baseline float timm": fp}
    for name, gemm in GEMM_OF.items():
        if gemm == "int8" and not cpu.int_mm_exact():
            continue
        out[name] = _with_gemm(export.load(path), gemm)
    if COMPILED[0] in IMPLS:
        out[COMPILED[0]] = torch.compile(fp)
        out[COMPILED[1]] = export.load(path, compile=True)
    return out


def _with_gemm(model, gemm):
    """``model``, called with the CPU GEMM ``gemm`` chosen (each loaded model caches the constants of its own)."""
    def call(x):
        cpu.set_gemm(gemm)
        try:
            return model(x)
        finally:
            cpu.set_gemm(None)
    return call


def _interleaved(fns: dict, rounds: int, block: int) -> dict:
    """Median seconds of each callable, timed round-robin in blocks: each round calls every implementation
    ``block`` times in a row and records all but the first of them. Interleaving makes drifting load on a shared
    machine hit every implementation alike, so their ratio stays meaningful; the unrecorded first call of a block
    pays for the previous implementation's footprint in the caches (measured here: whichever model runs right after
    the float one is 10-20% slower at batch 1), so each row is the steady state a deployment of that model sees."""
    import time
    times = {k: [] for k in fns}
    for _ in range(3):  # warm-up (and compilation)
        for fn in fns.values():
            fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            fn()
            for _ in range(block - 1):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


@pytest.mark.parametrize("batch", BATCHES)
def test_demo_inference(benchmark, models, batch):
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        med = _interleaved({k: (lambda m=models[k]: m(x)) for k in IMPLS if k in models}, *((50, 5) if batch == 1
                                                                                           else (10, 3)))
        for impl in med:
            record("demo cpu", f"batch {batch}", impl, med[impl], batch, unit="img/s", scale=1.0)
        m = models[DEFAULT]  # pytest-benchmark's own statistics, for the default loaded model
        benchmark.pedantic(lambda: m(x), rounds=30, iterations=1, warmup_rounds=2)
