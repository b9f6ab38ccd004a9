"""Kernel throughput on ViT-B shapes (CUDA only): packed GEMMs vs fp16 matmul and ``torch._int_mm``, quantized
attention vs fp16 SDPA, fused quantize vs a plain copy. Run ``pytest bench/``; the table is printed at the end
and saved to ``bench/bench_results.json`` (pytest-benchmark's own ``--benchmark-json`` works too)."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the benchmarks time compiled Triton kernels on a GPU", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
from _report import record  # noqa: E402

from kernels import ops  # noqa: E402
from lowbit import packing  # noqa: E402
from lowbit import primitives as P  # noqa: E402
from lowbit.primitives import QParams  # noqa: E402

DEV = "cuda"
BATCHES = (1, 8, 64)
KN = ((768, 2304), (768, 768), (768, 3072), (3072, 768))
WEIGHTS = {"w1.58a8": (1.58, 8), "w4a4": (4, 4), "w3a3": (3, 3), "w8a8": (8, 8)}


def _time(benchmark, fn):
    def run():
        fn()
        torch.cuda.synchronize()

    for _ in range(3):
        run()
    benchmark.pedantic(run, rounds=30, iterations=1, warmup_rounds=2)
    return benchmark.stats.stats.median


def _gemm_inputs(m, k, n, wbits, abits):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(m, k, device=DEV, generator=g)
    w = torch.randn(n, k, device=DEV, generator=g)
    qp = QParams(*P.init_act_qparams(x[:4096].cpu(), abits), abits)
    qp = QParams(qp.s.to(DEV), qp.z.to(DEV), abits)
    sw, zw = P.init_weight_qparams(w, wbits)
    a = P.quantize(x, qp.s, qp.z, abits, signed=True)
    pw = packing.pack(P.quantize(w, sw, zw, wbits), wbits)
    ops.weight_colsum(pw)
    return x, w, a, qp, pw, sw.flatten(), zw.flatten(), torch.randn(n, device=DEV, generator=g)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("k,n", KN)
@pytest.mark.parametrize("impl", ["baseline fp16 matmul", "torch._int_mm", *WEIGHTS])
def test_gemm(benchmark, batch, k, n, impl):
    m = 197 * batch
    wbits, abits = WEIGHTS.get(impl, (8, 8))
    x, w, a, qp, pw, sw, zw, bias = _gemm_inputs(m, k, n, wbits, abits)
    if impl == "baseline fp16 matmul":
        xh, wh = x.half(), w.half().t().contiguous()
        fn = lambda: xh @ wh  # noqa: E731
    elif impl == "torch._int_mm":
        wi = P.quantize(w, 0.05, 128, 8, signed=True).t().contiguous()
        fn = lambda: torch._int_mm(a, wi)  # noqa: E731
    else:
        fn = lambda: ops.packed_linear(a, qp, pw, sw, zw, bias, out_dtype=torch.float16)  # noqa: E731
    record("gemm", f"M={m} K={k} N={n}", impl, _time(benchmark, fn), 2.0 * m * n * k)


@pytest.mark.parametrize("batch,l", [(1, 197), (8, 197), (64, 197), (1, 577), (8, 577)])
@pytest.mark.parametrize("impl", ["baseline fp16 SDPA", "quant_attention a8"])
def test_attention(benchmark, batch, l, impl):
    h, d = 12, 64
    g = torch.Generator(device=DEV).manual_seed(0)
    xs = [torch.randn(batch, h, l, d, device=DEV, generator=g) for _ in range(3)]
    if impl.startswith("baseline"):
        qh, kh, vh = (t.half() for t in xs)
        fn = lambda: F.scaled_dot_product_attention(qh, kh, vh)  # noqa: E731
    else:
        qps = [QParams(torch.tensor(0.03, device=DEV), torch.tensor(128.0, device=DEV), 8) for _ in xs]
        q, k, v = (P.quantize(t, qp.s, qp.z, 8, signed=True) for t, qp in zip(xs, qps))
        fn = lambda: ops.quant_attention(q, k, v, *qps, scale=d ** -0.5)  # noqa: E731
    record("attention", f"B={batch} H={h} L={l}", impl, _time(benchmark, fn), 4.0 * batch * h * l * l * d)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", ["baseline copy", "quantize", "layernorm_quantize"])
def test_quantize(benchmark, batch, impl):
    m, c = 197 * batch, 768
    x = torch.randn(m, c, device=DEV, dtype=torch.float16)
    qp = QParams(torch.tensor(0.05, device=DEV), torch.tensor(128.0, device=DEV), 8)
    r, sh = torch.rand(c, device=DEV) + 0.5, torch.randn(c, device=DEV)
    ln_w, ln_b = torch.ones(c, device=DEV), torch.zeros(c, device=DEV)
    fn = {"baseline copy": lambda: x.clone(), "quantize": lambda: ops.quantize(x, qp, r, sh),
          "layernorm_quantize": lambda: ops.layernorm_quantize(x, ln_w, ln_b, 1e-6, qp, r, sh)}[impl]
    record("quantize", f"M={m} C={c}", impl, _time(benchmark, fn), float(m * c), unit="Telem/s")
