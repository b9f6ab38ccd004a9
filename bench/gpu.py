"""``python -m bench.gpu``: check and time the package on a CUDA machine in one command (about 5-9 minutes, H100).

Sections, each run even if an earlier one failed (its error is recorded and the exit status is 1):

``checks``   every Triton kernel compiled for the GPU against :mod:`kernels.reference` on random inputs of
             realistic shapes: integer outputs (codes, the GEMM accumulator) exact, except codes where the
             reference's pre-rounding value sits within 1e-3 of a tie; float outputs within the tolerances of
             ``tests/kernels`` (GEMM ``1e-5`` relative; attention ``<= 5%`` of the range, and ``< 2%`` of the
             elements beyond float rounding, the tie flips of P).
``kernels``  medians of :func:`triton.testing.do_bench_cudagraph` (kernel time: the call replayed in a CUDA graph, so
             the host's launch cost, which the models section measures, is out of both sides), inputs random:
             packed GEMMs (W1.58A8, W3A3, W4A4, W4A8, W8A8) at ViT-B shapes, ``M = 197 x {1, 8, 64}``, against
             fp16 ``matmul`` and ``torch._int_mm``; the fused LayerNorm-quantize against a device copy of the same
             input bytes (bandwidth counts bytes read + written); quantized attention against fp16 SDPA at
             ``L = 197, 577`` (ViT-B) and Swin-B's 49-token windows with the relative position bias.
``models``   exported ViT-B/16, DeiT-S and Swin-T (random init) at W4A4 and W1.58A8, loaded with
             :func:`export.load`: images/s at batch 1, 8, 64 against timm fp16 eager, and (ViT-B) both under
             ``torch.compile`` (``reduce-overhead``: CUDA graphs); peak memory of the batch-64 forward.
``optim``    e2e PTQ iterations/s of ViT-S at batch 32 (fp32 with and without the CUDA-graph step, bf16 autocast) and
             peak memory; the step's host syncs, dispatched ops and Triton launches.

``optim`` also checks that the optimiser's CUDA-graph step gives the losses of the same step run eagerly, bit for
bit, and times the step with and without the graph.

Writes ``RESULTS.md`` (GPU, driver, versions, date, every number with its ratio to its baseline, the issue's
targets) and ``results.json`` into ``--out`` (default ``bench/``) and prints the table. ``--quick`` keeps the checks
and the headline timings (ViT-B batch 1 and 64, two GEMM shapes, L = 197 and Swin windows, the optimiser in fp32):
the run for a short GPU loan. ``--dry`` runs the same code on the CPU through the Triton interpreter on tiny shapes
(the test suite runs it, and ``--dry --quick``).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("checks", "kernels", "models", "optim")
GEMM_FORMATS = {"W1.58A8": (1.58, 8), "W3A3": (3, 3), "W4A4": (4, 4), "W4A8": (4, 8), "W8A8": (8, 8)}
TARGETS = [  # (what, section, case filter, impl, baseline, minimum ratio)
    ("packed GEMM batch 64 vs fp16 matmul", "gemm", "M=12608", ("W1.58A8", "W4A4", "W3A3"), "fp16 matmul", 1.5),
    ("packed GEMM batch 64 vs torch._int_mm", "gemm", "M=12608", ("W1.58A8", "W4A4", "W3A3"), "torch._int_mm", 0.9),
    ("packed GEMM batch 1 vs fp16 matmul", "gemm", "M=197 ", ("W1.58A8", "W4A4", "W3A3"), "fp16 matmul", 1.3),
    ("LayerNorm-quantize bandwidth vs copy", "quantize", "", ("layernorm_quantize",), "copy", 0.7),
    ("rescale-quantize bandwidth vs copy", "quantize", "", ("rescale_quantize",), "copy", 0.7),
    ("attention L=197 batch 64 vs fp16 SDPA", "attention", "B=64 H=12 L=197 ",
     ("quant_attention a8 fused", "quant_attention a4 fused"), "fp16 SDPA", 1.0),
    ("attention L=197 batch 1 vs fp16 SDPA", "attention", "B=1 H=12 L=197 ",
     ("quant_attention a8 fused", "quant_attention a4 fused"), "fp16 SDPA", 0.8),
    ("attention Swin windows vs fp16 SDPA", "attention", "L=49 D=32 +bias",
     ("quant_attention a8 fused", "quant_attention a4 fused"), "fp16 SDPA", 1.0),
    ("ViT-B W4A4 batch 64 vs timm fp16 eager", "model", "vit_b batch 64 ", ("W4A4 eager", "W4A4 compiled"),
     "timm fp16 eager", 1.5),
    ("ViT-B W4A4 batch 1 vs timm fp16 eager", "model", "vit_b batch 1 ", ("W4A4 eager", "W4A4 compiled"),
     "timm fp16 eager", 1.0),
]


class Bench:
    """Timings and checks of one run; ``dry``: CPU, interpreter, tiny shapes, wall-clock timer."""

    def __init__(self, dry: bool, quick: bool = False):
        import torch
        self.dry, self.quick = dry, quick
        self.dev = torch.device("cpu" if dry else "cuda")
        self.rows: List[dict] = []
        self.checks: List[dict] = []
        self.errors: Dict[str, str] = {}
        self.extra: Dict[str, dict] = {}

    # ------------------------------------------------------------------------------------------ timing

    def time_ms(self, fn: Callable[[], object], model: bool = False) -> float:
        """Median milliseconds of ``fn``: ``do_bench`` for kernels, CUDA events around whole calls for models."""
        import torch
        if self.dry:
            fn()
            ts = []
            for _ in range(1 if model else 2):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts) * 1e3
        if not model:
            import triton
            return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        t_end = time.perf_counter() + 2.0
        while len(ts) < 10 or (time.perf_counter() < t_end and len(ts) < 100):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)

    def row(self, section: str, case: str, impl: str, ms: float, work: float, unit: str, **kw) -> dict:
        r = dict(section=section, case=case, impl=impl, ms=ms, rate=work / (ms * 1e-3), unit=unit, **kw)
        self.rows.append(r)
        return r

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(dict(name=name, ok=bool(ok), detail=detail))
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)


# ---------------------------------------------------------------------------------------------- inputs


def _gen(dev, seed=0):
    import torch
    return torch.Generator(device=dev).manual_seed(seed)


def _gemm_problem(dev, m, k, n, wbits, abits, seed=0):
    import torch

    from kernels import ops
    from lowbit import packing
    from lowbit import primitives as P
    from lowbit.primitives import QParams
    g = _gen(dev, seed)
    x = torch.randn(m, k, device=dev, generator=g) * (torch.rand(k, device=dev, generator=g) * 2.7 + 0.3)
    w = torch.randn(n, k, device=dev, generator=g) * (torch.rand(n, 1, device=dev, generator=g) + 0.2)
    qp = QParams(*P.init_act_qparams(x[:4096], abits), abits)
    sw, zw = P.init_weight_qparams(w, wbits)
    a = P.quantize(x, qp.s, qp.z, abits, signed=True)
    pw = packing.pack(P.quantize(w, sw, zw, wbits), wbits)
    ops.weight_colsum(pw)
    return dict(x=x, w=w, a=a, qp=qp, pw=pw, sw=sw.flatten(), zw=zw.flatten(),
                bias=torch.randn(n, device=dev, generator=g))


def _ties(codes, ref, pre, tol=1e-3) -> tuple:
    """(mismatches, mismatches away from a rounding tie of ``pre``, largest difference)."""
    diff = (codes.int() - ref.int()).abs()
    bad = diff > 0
    frac = pre.double() - pre.double().floor()
    away = bad & ((frac - 0.5).abs() >= tol)
    return int(bad.sum()), int(away.sum()), int(diff.max()) if diff.numel() else 0


def _tie_check(b: Bench, name: str, codes, ref, pre) -> None:
    n_bad, n_away, dmax = _ties(codes, ref, pre)
    ok = n_away == 0 and dmax <= 1 and n_bad <= 0.01 * ref.numel()
    b.check(name, ok, f"{ref.numel()} codes, {n_bad} differ (all at rounding ties: {n_away == 0}), max diff {dmax}")


def _triton(flag: bool):
    from kernels import ops
    ops.set_backend(None if flag is None else ("triton" if flag else "cpu"))


# ---------------------------------------------------------------------------------------------- checks


def section_checks(b: Bench) -> None:
    import torch
    import torch.nn.functional as F

    from kernels import ops
    from kernels import reference as R
    from lowbit import primitives as P
    from lowbit.primitives import QParams
    dev = b.dev
    m, c = (6, 64) if b.dry else (197 * 8, 768)
    g = _gen(dev, 1)
    x = torch.randn(m, c, device=dev, generator=g) * (torch.rand(c, device=dev, generator=g) * 3 + 0.2)
    r, sh = torch.rand(c, device=dev, generator=g) + 0.5, torch.randn(c, device=dev, generator=g) * 0.3
    lw, lb = torch.rand(c, device=dev, generator=g) + 0.5, torch.randn(c, device=dev, generator=g) * 0.1
    for bits in (3, 4, 8):
        xr = P.apply_rescale(x, r, sh)
        qp = QParams(*P.init_act_qparams(xr, bits), bits)
        _triton(True)
        out = ops.quantize(x, qp, r, sh)
        _triton(False)
        _tie_check(b, f"rescale_quantize a{bits}", out, R.rescale_quantize(x, qp, r, sh), xr / qp.s)
        y = F.layer_norm(x, (c,), lw, lb, 1e-6)
        qp = QParams(*P.init_act_qparams(y, bits), bits)
        _triton(True)
        out = ops.layernorm_quantize(x, lw, lb, 1e-6, qp)
        _triton(False)
        _tie_check(b, f"layernorm_quantize a{bits}", out, R.layernorm_rescale_quantize(x, lw, lb, 1e-6, qp), y / qp.s)
    # bit-exact, the residual-fused kernel too, on rows whose sums are exact in any order (so the reference's
    # summation order does not matter): x_new = x + delta exactly, delta and x nonzero multiples of 1/32
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        xn_ref = R.exact_sum_rows(m, c, dt, g)
        d = ((torch.randint(1, 17, (m, c), device=dev, generator=g) * 2 - 17).float() / 16).to(dt)
        xe = (xn_ref.float() - d.float()).to(dt)
        pre = P.apply_rescale(R.layernorm(xn_ref, lw, lb, 1e-6), r, sh)
        qp = QParams(*P.init_act_qparams(pre, 4), 4)
        _triton(True)
        out = ops.layernorm_quantize(xn_ref, lw, lb, 1e-6, qp, r, sh)
        xn, res = ops.add_layernorm_quantize(xe, d, lw, lb, 1e-6, qp, r, sh)
        _triton(False)
        ref = R.layernorm_rescale_quantize(xn_ref, lw, lb, 1e-6, qp, r, sh)
        name = str(dt).replace("torch.", "")
        b.check(f"layernorm_quantize exact-sum rows {name}", torch.equal(out, ref),
                f"{int((out != ref).sum())} of {ref.numel()} codes differ")
        b.check(f"add_layernorm_quantize exact-sum rows {name}", torch.equal(xn, xn_ref) and torch.equal(res, ref),
                f"{int((xn != xn_ref).sum())} x_new and {int((res != ref).sum())} codes differ")

    # fake quantize: forward values and every gradient (x, r, shift, s, z)
    bits = 4
    xr = P.apply_rescale(x, r, sh)
    s0, z0 = P.init_act_qparams(xr, bits)
    grads = {}
    for tri in (True, False):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, r, sh, s0.to(dev), z0.to(dev))]
        _triton(tri)
        y = ops.fake_quantize(leaves[0], QParams(leaves[3], leaves[4], bits), leaves[1], leaves[2])
        gy = torch.randn(y.shape, device=dev, generator=_gen(dev, 2))
        (y * gy).sum().backward()
        grads[tri] = [y.detach()] + [t.grad for t in leaves]
    _triton(False)
    pre = xr / s0.to(dev)
    live = ((pre - pre.floor() - 0.5).abs() > 1e-3)
    names = ["value", "grad x", "grad r", "grad shift", "grad s", "grad z"]
    for i, name in enumerate(names):
        t, ref = grads[True][i], grads[False][i]
        if i in (0, 1):
            t, ref = t[live], ref[live]
        err = float((t - ref).abs().max() / (ref.abs().max() + 1e-12))
        b.check(f"fake_quantize {name}", err < (1e-5 if i < 2 else 1e-3), f"max relative error {err:.2e}")

    # per-channel weight fake quantize (s, z per output row)
    w = torch.randn(48 if b.dry else 768, c, device=dev, generator=g)
    for wbits in (1.58, 3, 4):
        sw, zw = P.init_weight_qparams(w, wbits)
        grads = {}
        for tri in (True, False):
            leaves = [t.detach().clone().requires_grad_(True) for t in (w, sw, zw)]
            _triton(tri)
            y = ops.fake_quantize_weight(leaves[0], leaves[1], leaves[2], wbits)
            (y * torch.randn(y.shape, device=dev, generator=_gen(dev, 4))).sum().backward()
            grads[tri] = [y.detach()] + [t.grad for t in leaves]
        _triton(False)
        pre = w / sw
        live = (pre - pre.floor() - 0.5).abs() > 1e-3
        for i, name in enumerate(["value", "grad w", "grad s", "grad z"]):
            t, ref = grads[True][i], grads[False][i]
            if i < 2:
                t, ref = t[live], ref[live]
            err = float((t - ref).abs().max() / (ref.abs().max() + 1e-12))
            b.check(f"fake_quantize_weight w{wbits} {name}", err < (1e-5 if i < 2 else 1e-3),
                    f"max relative error {err:.2e}")

    # packed GEMMs: every format, float epilogue, GELU + fp16, requant codes; integer accumulator exact
    mm, kk, nn_ = (5, 64, 48) if b.dry else (197 * 8, 768, 3072)
    for fmt_name, (wbits, abits) in {**GEMM_FORMATS, "W6A6": (6, 6), "W2A4": (2, 4)}.items():
        pr = _gemm_problem(dev, mm, kk, nn_, wbits, abits, seed=3)
        a, qp, pw, sw, zw, bias = pr["a"], pr["qp"], pr["pw"], pr["sw"], pr["zw"], pr["bias"]
        one = QParams(torch.tensor(1.0, device=dev), qp.z, abits)
        ones = torch.ones_like(sw)
        _triton(True)
        acc = ops.packed_linear(a, one, pw, ones, zw)
        y = ops.packed_linear(a, qp, pw, sw, zw, bias)
        yg = ops.packed_linear(a, qp, pw, sw, zw, bias, gelu=True, out_dtype=torch.float16)
        _triton(False)
        acc_ref = R.packed_linear(a, one, pw, ones, zw)
        b.check(f"packed GEMM {fmt_name} integer accumulator", torch.equal(acc, acc_ref),
                f"[{mm}x{kk}] x [{kk}x{nn_}], max |acc| {float(acc_ref.abs().max()):.0f}, exact: "
                f"{torch.equal(acc, acc_ref)}")
        ref = R.packed_linear(a, qp, pw, sw, zw, bias)
        err = float((y - ref).abs().max() / ref.abs().max())
        b.check(f"packed GEMM {fmt_name} fp32 output", err <= 1e-5, f"max error {err:.2e} of the range")
        ref_g = R.packed_linear(a, qp, pw, sw, zw, bias, gelu=True).half().float()
        err = float((yg.float() - ref_g).abs().max() / ref_g.abs().max())
        b.check(f"packed GEMM {fmt_name} GELU fp16 output", err <= 1e-3, f"max error {err:.2e} of the range")
        yy = R.packed_linear(a, qp, pw, sw, zw, bias, gelu=True)
        rq = QParams(*P.init_act_qparams(yy, abits), abits)
        _triton(True)
        codes = ops.packed_linear(a, qp, pw, sw, zw, bias, gelu=True, requant=rq)
        _triton(False)
        _tie_check(b, f"packed GEMM {fmt_name} GELU requant codes", codes,
                   R.packed_linear(a, qp, pw, sw, zw, bias, gelu=True, requant=rq), yy / rq.s)

    # attention: uniform and SULQ probability codes, with and without Swin bias + mask, head dims 32/64
    cases = [(2, 2, 49, 32, True), (1, 2, 50, 32, False)] if b.dry else [
        (4, 12, 197, 64, False), (1, 12, 577, 64, False), (64, 4, 49, 32, True), (8, 16, 49, 32, True),
        (2, 4, 197, 128, False)]
    for bb, h, l, d, swin in cases:
        for bits, sulq in ((8, False), (4, False), (4, True)):
            gg = _gen(dev, 5)
            xs = [torch.randn(bb, h, l, d, device=dev, generator=gg) * (1.0 + i) for i in range(3)]
            qps = [QParams(*P.init_act_qparams(t, bits), bits) for t in xs]
            q, k, v = (P.quantize(t, qp.s, qp.z, bits, signed=True) for t, qp in zip(xs, qps))
            bias = torch.randn(h, l, l, device=dev, generator=gg) if swin else None
            mask = (torch.where(torch.rand(4, l, l, device=dev, generator=gg) < 0.3, -100.0, 0.0)
                    if swin and bb % 4 == 0 else None)
            p_qp = None
            if sulq:
                p_qp = P.init_sulq_params(torch.softmax(torch.randn(256, l, device=dev, generator=gg) * 2, -1), bits)
            _triton(True)
            out = ops.quant_attention(q, k, v, *qps, scale=d ** -0.5, p_qp=p_qp, rel_bias=bias, mask=mask)
            _triton(False)
            ref = R.quant_attention(q, k, v, *qps, scale=d ** -0.5, p_qp=p_qp, rel_bias=bias, mask=mask)
            err = (out - ref).abs()
            worst = float(err.max() / ref.abs().max())
            frac = float(err.gt(1e-5 * (ref.abs() + 1)).double().mean())
            name = f"attention {'SULQ' if sulq else 'uniform'} a{bits} B={bb} H={h} L={l} D={d}" + (
                " bias+mask" if mask is not None else " bias" if swin else "")
            b.check(name, worst <= 0.05 and frac < 0.02,
                    f"max error {worst:.2e} of the range, {100 * frac:.2f}% of elements beyond float rounding")


# ---------------------------------------------------------------------------------------------- kernels


def _gemm_kernel_sweep(b: Bench, case: str, name: str, flops: float, run: Callable) -> None:
    """Rows ``<name> pointer-load`` and ``<name> TMA <tile>``: ``run()`` (one ``ops.packed_linear``) with the int8
    GEMM forced to the pointer-load kernel of the table, then to the persistent TMA kernel at each of
    :data:`kernels.configs.TMA_CANDIDATES` (on a GPU without TMA the row records the error); each output must equal
    the pointer-load kernel's bit for bit (a failed check otherwise). One run decides :data:`kernels.configs.TMA_GEMM`
    and the TMA tiles."""
    import torch

    from kernels import configs as C
    real = C.tma_gemm_config
    try:
        C.tma_gemm_config = lambda *args: None
        ref = run()
        b.row("gemm", case, f"{name} pointer-load", b.time_ms(run), flops, "TOPS")
        for cfg in C.TMA_CANDIDATES:
            if name == "W8A8" and cfg.block_n > 128:  # (beside the row sums the 128x256 accumulator spills)
                continue
            impl = f"{name} TMA {cfg.block_m}x{cfg.block_n}x{cfg.block_k} s{cfg.num_stages} e{cfg.epi_split}"
            C.tma_gemm_config = lambda *args, cfg=cfg: cfg
            try:
                out = run()
                if not torch.equal(out, ref):
                    b.check(f"{impl} {case}", False, "output differs from the pointer-load kernel's")
                b.row("gemm", case, impl, b.time_ms(run), flops, "TOPS")
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                b.errors[f"{impl} {case}"] = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        C.tma_gemm_config = real


def _layernorm_config_sweep(b: Bench, x, lw, lb, qp, case: str, nbytes: int) -> None:
    """Rows ``layernorm_quantize BM=.. BC=..x.. w=..``: the launch ``ops.layernorm_quantize`` makes, at each tile of
    :data:`kernels.configs.LAYERNORM_SWEEP` (the former layout among them; a failed check where its codes differ
    from the shipped layout's away from a rounding tie: the row sums' order is the layout's), to choose the tiles
    from a GPU run."""
    import torch

    from kernels import configs as C
    from kernels import library as L
    from kernels import ops
    from kernels.ops import _act_qparams
    from lowbit import primitives as P
    s, zr = _act_qparams(x, qp)
    ref = ops.layernorm_quantize(x, lw, lb, 1e-6, qp)
    pre = P.layernorm(x, lw, lb, 1e-6) / qp.s
    for cfg in C.LAYERNORM_SWEEP[:2] if b.dry else C.LAYERNORM_SWEEP:
        bm, bc, chunks, warps = cfg
        name = f"layernorm_quantize BM={bm} BC={bc}x{chunks} w={warps}"
        out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        lx = L.layernorm_quantize_launch(x, out, lw, lb, 1e-6, None, None, s, zr, float(qp.bits), C.Target.of(x),
                                         cfg)
        try:
            lx()
            _, away, dmax = _ties(out, ref, pre)
            if away or dmax > 1:
                b.check(f"{name} {case}", False, f"codes differ from the shipped layout's: {away} away from a "
                                                 f"rounding tie, by up to {dmax}")
            ms = b.time_ms(lx)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile or launch is a result here
            b.errors[f"{name} {case}"] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        b.row("quantize", case, name, ms, (nbytes + x.numel()) / 1e9, "GB/s")


def _quantize_config_sweep(b: Bench, x, r, sh, qp, case: str, nbytes: int) -> None:
    """Rows ``rescale_quantize BM=.. w=.. s=..``: the launch ``ops.quantize`` makes, at each tile of
    :data:`kernels.configs.QUANTIZE_SWEEP` (``persistent``: a grid of a few programs per SM looping over the row
    tiles; the former layout, one unpipelined program per tile, among them), a failed check where its codes differ
    from the shipped layout's (they cannot: the arithmetic is element-wise)."""
    import torch

    from kernels import configs as C
    from kernels import library as L
    from kernels import ops
    from kernels.ops import _act_qparams
    s, zr = _act_qparams(x, qp)
    ref = ops.quantize(x, qp, r, sh)
    for cfg in C.QUANTIZE_SWEEP[:2] if b.dry else C.QUANTIZE_SWEEP:
        bm, bc, warps, stages, persistent = cfg
        name = f"rescale_quantize BM={bm} BC={bc} w={warps} s={stages}{' persistent' if persistent else ''}"
        out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        lx = L.rescale_quantize_launch(x, out, r, sh, s, zr, float(qp.bits), C.Target.of(x), cfg)
        try:
            lx()
            if not torch.equal(out, ref):
                b.check(f"{name} {case}", False, "codes differ from the shipped layout's")
            ms = b.time_ms(lx)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile or launch is a result here
            b.errors[f"{name} {case}"] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        b.row("quantize", case, name, ms, (nbytes + x.numel()) / 1e9, "GB/s")


#: (BLOCK_M, BLOCK_N, num_warps, num_stages) tried for the unbiased fused attention beside the shipped
#: :func:`kernels.configs.attention_config`
ATTENTION_CONFIGS = ((64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 3),
                     (128, 64, 4, 2))


def _attention_config_sweep(b: Bench, case: str, flops: float, run) -> None:
    """Rows ``quant_attention a8 fused BM=.. BN=.. w=.. s=..``: ``run()`` (the fused attention call) with
    :func:`kernels.configs.attention_config` replaced by each of :data:`ATTENTION_CONFIGS` (a failed check where
    the codes differ from the shipped config's), to choose the tiles from a GPU run."""
    import torch

    from kernels import configs as C
    ref = run()
    real = C.attention_config
    for bm, bn, warps, stages in ATTENTION_CONFIGS[:2] if b.dry else ATTENTION_CONFIGS:
        name = f"quant_attention a8 fused BM={bm} BN={bn} w={warps} s={stages}"

        def cfg(*args, **kw):
            opts = real(*args, **kw)[2]
            return bm, bn, {**opts, "num_warps": warps, "num_stages": stages} if opts else {}
        C.attention_config = cfg
        try:
            if not torch.equal(run(), ref):
                b.check(f"{name} {case}", False, "codes differ from the shipped config's")
            ms = b.time_ms(run)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile or launch is a result here
            b.errors[f"{name} {case}"] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        finally:
            C.attention_config = real
        b.row("attention", case, name, ms, flops, "TOPS")


def section_kernels(b: Bench) -> None:
    import torch
    import torch.nn.functional as F

    from kernels import configs as C
    from kernels import ops
    from lowbit import primitives as P
    from lowbit.primitives import QParams
    dev = b.dev
    _triton(True)
    batches = (1,) if b.dry else (1, 64) if b.quick else (1, 8, 64)
    kns = ((64, 96),) if b.dry else ((768, 2304), (3072, 768)) if b.quick else ((768, 2304), (768, 768), (768, 3072),
                                                                                (3072, 768))
    tokens = 3 if b.dry else 197
    for batch in batches:
        m = tokens * batch
        for k, n in kns:
            case = f"M={m} K={k} N={n}"
            flops = 2.0 * m * n * k / 1e12
            pr = _gemm_problem(dev, m, k, n, 8, 8)
            xh, wh = pr["x"].half(), pr["w"].half().t().contiguous()
            if b.dry:
                xh, wh = xh.float(), wh.float()
            b.row("gemm", case, "baseline fp16 matmul", b.time_ms(lambda: xh @ wh), flops, "TFLOP/s")
            wi = pr["pw"].planes["q"][:, :k].contiguous().t()  # [K, N] column-major, the layout _int_mm wants
            if not b.dry and m > 16:
                a = pr["a"]
                b.row("gemm", case, "baseline torch._int_mm", b.time_ms(lambda: torch._int_mm(a, wi)), flops,
                      "TOPS")
            for name, (wbits, abits) in GEMM_FORMATS.items():
                p = _gemm_problem(dev, m, k, n, wbits, abits)
                a, qp, pw, sw, zw, bias = p["a"], p["qp"], p["pw"], p["sw"], p["zw"], p["bias"]
                out_dt = torch.float16
                ms = b.time_ms(lambda: ops.packed_linear(a, qp, pw, sw, zw, bias, out_dtype=out_dt))
                b.row("gemm", case, name, ms, flops, "TOPS")
                if name in ("W4A4", "W8A8") and (pw.fmt == "int8" or C.unpack_first(pw.fmt, m)):
                    # the int8 GEMM every unpacked weight runs (centred), and W8's
                    _gemm_kernel_sweep(b, case, name, flops, lambda: ops.packed_linear(a, qp, pw, sw, zw, bias,
                                                                                       out_dtype=out_dt))
                if C.unpack_first(pw.fmt, m):  # the dispatcher unpacks first; time the fused kernel beside it
                    keep, C.UNPACK_MIN_M = C.UNPACK_MIN_M, 1 << 62
                    try:
                        ms = b.time_ms(lambda: ops.packed_linear(a, qp, pw, sw, zw, bias, out_dtype=out_dt))
                    finally:
                        C.UNPACK_MIN_M = keep
                    b.row("gemm", case, f"{name} fused unpack", ms, flops, "TOPS")
            print(f"  gemm {case} done", flush=True)

    c = 64 if b.dry else 768
    for batch in batches:
        m = tokens * batch
        x = torch.randn(m, c, device=dev, generator=_gen(dev)).half()
        if b.dry:
            x = x.float()
        qp = QParams(torch.tensor(0.05, device=dev), torch.tensor(8.0, device=dev), 4)
        lw, lb = torch.rand(c, device=dev) + 0.5, torch.randn(c, device=dev) * 0.1
        r, sh = torch.rand(c, device=dev) + 0.5, torch.randn(c, device=dev)
        case = f"M={m} C={c} {str(x.dtype).replace('torch.', '')}"
        nbytes = x.numel() * x.element_size()
        b.row("quantize", case, "baseline copy", b.time_ms(lambda: x.clone()), 2.0 * nbytes / 1e9, "GB/s")
        b.row("quantize", case, "layernorm_quantize",
              b.time_ms(lambda: ops.layernorm_quantize(x, lw, lb, 1e-6, qp)), (nbytes + x.numel()) / 1e9, "GB/s")
        b.row("quantize", case, "rescale_quantize", b.time_ms(lambda: ops.quantize(x, qp, r, sh)),
              (nbytes + x.numel()) / 1e9, "GB/s")
        # the residual add before a LayerNorm (Swin: where proj's output is window-reversed and rolled first):
        # one pass against torch's x + delta and the LayerNorm-quantize; both counted as the fused pass's bytes
        # (x, delta read; x_new, codes written), so their ratios compare times
        d = (torch.randn(m, c, device=dev, generator=_gen(dev, 3)) * 0.3).to(x.dtype)
        res_gb = (3 * nbytes + x.numel()) / 1e9
        b.row("quantize", case, "add_layernorm_quantize",
              b.time_ms(lambda: ops.add_layernorm_quantize(x, d, lw, lb, 1e-6, qp)), res_gb, "GB/s")
        b.row("quantize", case, "x + delta, then layernorm_quantize",
              b.time_ms(lambda: ops.layernorm_quantize(x + d, lw, lb, 1e-6, qp)), res_gb, "GB/s")
        xn, codes = ops.add_layernorm_quantize(x, d, lw, lb, 1e-6, qp)
        b.check(f"add_layernorm_quantize = x + delta, then layernorm_quantize {case}",
                torch.equal(xn, x + d) and torch.equal(codes, ops.layernorm_quantize(x + d, lw, lb, 1e-6, qp)),
                "x_new and codes bit-identical")
        if not b.quick or batch == batches[-1]:
            _layernorm_config_sweep(b, x, lw, lb, qp, case, nbytes)
            _quantize_config_sweep(b, x, r, sh, qp, case, nbytes)

    att = [(1, 2, 49, 32, True)] if b.dry else [
        (1, 12, 197, 64, False), (64, 12, 197, 64, False), (64 * 8, 4, 49, 32, True)] if b.quick else [
        (1, 12, 197, 64, False), (8, 12, 197, 64, False), (64, 12, 197, 64, False), (1, 12, 577, 64, False),
        (8, 12, 577, 64, False), (64 * 8, 4, 49, 32, True), (4 * 8, 32, 49, 32, True)]
    for bb, h, l, d, swin in att:
        gg = _gen(dev, 7)
        xs = [torch.randn(bb, h, l, d, device=dev, generator=gg) for _ in range(3)]
        bias = torch.randn(h, l, l, device=dev, generator=gg) if swin else None
        case = f"B={bb} H={h} L={l} D={d}" + (" +bias" if swin else "")
        flops = 4.0 * bb * h * l * l * d / 1e12
        hs = [t.half() if not b.dry else t for t in xs]
        hb = bias.half()[None] if swin and not b.dry else (bias[None] if swin else None)
        b.row("attention", case, "baseline fp16 SDPA",
              b.time_ms(lambda: F.scaled_dot_product_attention(*hs, attn_mask=hb)), flops, "TFLOP/s")
        for bits in (8, 4):
            qps = [QParams(*P.init_act_qparams(t[:1], bits), bits) for t in xs]
            q, k, v = (P.quantize(t, qp.s, qp.z, bits, signed=True) for t, qp in zip(xs, qps))
            b.row("attention", case, f"quant_attention a{bits}",
                  b.time_ms(lambda: ops.quant_attention(q, k, v, *qps, scale=d ** -0.5, rel_bias=bias)), flops, "TOPS")
            # as the exported models run it: Q, K, V read in place from the qkv GEMM's codes [B, L, 3, H, D], the
            # output requantized heads-last for proj (no float activation written)
            qkv = torch.stack([t.transpose(1, 2) for t in (q, k, v)], 2).contiguous()
            qv, kv, vv = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            def fused():
                return ops.quant_attention(qv, kv, vv, *qps, scale=d ** -0.5, rel_bias=bias, heads_last=True,
                                           requant=qps[0])
            b.row("attention", case, f"quant_attention a{bits} fused", b.time_ms(fused), flops, "TOPS")
            if C.attention_one_pass(l):  # the two-pass kernel beside the dispatcher's one-pass choice
                keep, C.ONE_PASS_MAX_L = C.ONE_PASS_MAX_L, 0
                try:
                    two = fused()
                    b.row("attention", case, f"quant_attention a{bits} fused two-pass", b.time_ms(fused), flops,
                          "TOPS")
                finally:
                    C.ONE_PASS_MAX_L = keep
                one = fused()
                diff = (two.int() - one.int()).abs()
                b.check(f"attention one-pass = two-pass a{bits} {case}", float(diff.float().mean()) < 0.01,
                        f"requantized codes differ by at most {int(diff.max())} on {float((diff > 0).float().mean()):.2%}"
                        " (rounding ties of P)")
            if bits == 8 and (b.dry or not swin) and not (b.quick and bb == 1):
                _attention_config_sweep(b, case, flops, fused)
            if bits == 4 and l <= C.ONE_PASS_MAX_L:  # SULQ (published grid): its two-pass default beside one pass
                sq = P.init_sulq_published(torch.softmax(xs[0][:1, :1].float() @ xs[1][:1, :1].float().transpose(-1, -2),
                                                         -1), bits)

                def sulq():
                    return ops.quant_attention(qv, kv, vv, *qps, scale=d ** -0.5, p_qp=sq, rel_bias=bias,
                                               heads_last=True, requant=qps[0])
                b.row("attention", case, f"quant_attention sulq a{bits} fused", b.time_ms(sulq), flops, "TOPS")
                keep, C.ONE_PASS_SULQ = C.ONE_PASS_SULQ, True
                try:
                    b.row("attention", case, f"quant_attention sulq a{bits} fused one-pass", b.time_ms(sulq), flops,
                          "TOPS")
                finally:
                    C.ONE_PASS_SULQ = keep
        print(f"  attention {case} done", flush=True)
    _triton(None)


# ---------------------------------------------------------------------------------------------- models


MODELS = {  # name: (alias / timm name, model_args)
    "vit_b": ("vit_b", {}), "deit_s": ("deit_s", {}), "swin_t": ("swin_t", {}),
}
DRY_MODELS = {
    "vit_b": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2,
                                           num_classes=10)),
    "swin_t": ("swin_tiny_patch4_window7_224", dict(img_size=16, patch_size=2, window_size=4, embed_dim=64,
                                                    depths=(1, 1), num_heads=(2, 4), num_classes=10)),
}


COMPILED_BATCHES = (1, 64)  # each batch size compiles (and captures CUDA graphs) anew: the targets' sizes only


def _float_model(arch: str, args: dict):
    import timm

    from lowbit.models import resolve
    return timm.create_model(resolve(arch).timm_name, pretrained=False, **args).eval()


def _export(b: Bench, arch: str, args: dict, bits: str, tmp: Path):
    import torch

    import export
    from quant.calibrate import calibrate
    from quant.surgery import quantize_model
    torch.manual_seed(0)
    fp = _float_model(arch, args).to(b.dev)
    size = fp.patch_embed.img_size[0]
    images = torch.randn(4 if b.dry else 8, 3, size, size, device=b.dev, generator=_gen(b.dev, 11))
    q = calibrate(quantize_model(copy.deepcopy(fp), bits), images)
    path = export.export_model(q.cpu(), tmp / f"{arch}-{bits}.lowbit", arch=arch, config=args, bits=bits)
    return fp, path, size


def _sync_check(b: Bench, name: str, model, size: int) -> None:
    """The deployed forward (after a first call) makes no host-device synchronisation (``set_sync_debug_mode``)."""
    import warnings

    import torch
    x = torch.randn(2, 3, size, size, device=b.dev)
    with torch.inference_mode():
        model(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(1)
            try:
                model(x)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)]
    b.check(f"{name} eager forward without host sync", not syncs,
            f"{len(syncs)} synchronizing calls" + (f", first: {syncs[0][:120]}" if syncs else ""))


def section_models(b: Bench, models: Optional[List[str]] = None, compile_models=("vit_b",)) -> None:
    import torch

    import export
    from kernels import configs as C
    specs = DRY_MODELS if b.dry else MODELS
    batches = (2,) if b.dry else (1, 64) if b.quick else (1, 8, 64)
    if b.quick and models is None:
        models = ["vit_b"]
    if b.dry:
        _triton(True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in models or list(specs):
            arch, args = specs[name]
            for bits in ("w4a4", "w1.58a8"):
                fp, path, size = _export(b, arch, args, bits, Path(tmp))
                if bits == "w4a4":
                    ref = fp.half() if not b.dry else fp
                    impls = {"baseline timm fp16 eager": ref}
                    if name in compile_models and not b.dry:
                        impls["timm fp16 compiled"] = torch.compile(ref, mode="reduce-overhead")
                else:
                    impls = {}
                tag = bits.upper()
                impls[f"{tag} eager"] = export.load(path, device=b.dev)
                if not b.dry:
                    _sync_check(b, f"{name} {tag}", impls[f"{tag} eager"], size)
                if name in compile_models and not b.dry and not (b.quick and bits != "w4a4"):
                    impls[f"{tag} compiled"] = export.load(path, device=b.dev, compile=True)
                for batch in batches:
                    x = torch.randn(batch, 3, size, size, device=b.dev, generator=_gen(b.dev, batch))
                    case = f"{name} batch {batch}"
                    for impl, model in impls.items():
                        if "compiled" in impl and batch not in COMPILED_BATCHES:
                            continue
                        xi = x.half() if "fp16" in impl and not b.dry else x
                        with torch.inference_mode():
                            if not b.dry:
                                torch.cuda.reset_peak_memory_stats()
                            ms = b.time_ms(lambda: model(xi), model=True)
                            peak = torch.cuda.max_memory_allocated() / 2 ** 20 if not b.dry else None
                        b.row("model", case, impl, ms, batch, "img/s", peak_mib=peak)
                    if batch == batches[-1]:  # the same model with the int8 GEMMs on the pointer-load kernel
                        model = impls[f"{tag} eager"]
                        keep, C.TMA_GEMM = C.TMA_GEMM, False
                        try:
                            with torch.inference_mode():
                                ms = b.time_ms(lambda: model(x), model=True)
                        finally:
                            C.TMA_GEMM = keep
                        b.row("model", case, f"{tag} eager pointer-load GEMM", ms, batch, "img/s")
                    print(f"  {case} {bits} done", flush=True)
                if bits == "w4a4" and name == "vit_b" and not b.dry:
                    _tensorrt_probe(b, path, Path(tmp))
                del impls
                if not b.dry:
                    torch.cuda.empty_cache()
    _triton(None)


def _tensorrt_probe(b: Bench, lowbit: Path, tmp: Path) -> None:
    """Whether TensorRT builds an engine from the checkpoint's QDQ ONNX graph (``export.onnx``), recorded in
    ``extra["tensorrt"]``: "not importable", or the parser / builder's answer. TensorRT takes symmetric int8 Q/DQ
    only, and these quantizers have zero points, so a refusal is the expected answer (docs/deployment.md)."""
    try:
        import tensorrt as trt
    except ImportError:
        b.extra["tensorrt"] = {"status": "tensorrt is not importable on this machine"}
        print("  tensorrt: not importable", flush=True)
        return
    out = {"version": getattr(trt, "__version__", "?")}
    try:
        from export.onnx import to_onnx
        onnx_path = tmp / "vit_b_w4a4.onnx"
        to_onnx(str(lowbit), str(onnx_path), batch=1, overwrite=True)
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes()):
            out["status"] = "parser refused: " + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        else:
            config = builder.create_builder_config()
            engine = builder.build_serialized_network(network, config)
            out["status"] = "engine built" if engine is not None else "builder refused (see its log)"
    except Exception as e:  # noqa: BLE001 - the probe reports, never breaks the run
        out["status"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    b.extra["tensorrt"] = out
    print(f"  tensorrt {out['version']}: {out['status'][:200]}", flush=True)


# ---------------------------------------------------------------------------------------------- optimiser


def section_optim(b: Bench) -> None:
    import torch

    from bench import optimizer_overhead
    from quant.calibrate import calibrate
    from quant.optimize import OptimConfig, optimize
    from quant.surgery import quantize_model
    if b.dry:
        arch, args, bs, n_img, steps = DRY_MODELS["vit_b"] + (4, 8, 2)
        _triton(True)
    else:
        arch, args, bs, n_img, steps = "vit_s", {}, 32, 256, 20
    torch.manual_seed(0)
    fp = _float_model(arch, args).to(b.dev)
    size = fp.patch_embed.img_size[0]
    images = torch.randn(n_img, 3, size, size, generator=torch.Generator().manual_seed(0))
    runs = [("fp32", False, True), ("fp32 --no-cuda-graph", False, False)]
    if not b.quick:
        runs.append(("bf16 autocast", True, True))
    for name, bf16, graph in runs:
        q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), images[:8].to(b.dev))
        cfg = dict(method="e2e", batch_size=bs, bf16=bf16, progress=False, cuda_graph=graph)
        optimize(q, fp, images, OptimConfig(iters=2, **cfg))  # warm-up: compiles the kernels
        if not b.dry:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        hist = optimize(q, fp, images, OptimConfig(iters=steps, **cfg))
        if not b.dry:
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if not b.dry else None
        b.row("optim", f"{arch} W4A4 e2e batch {bs}", name, sec * 1e3 / steps, 1.0, "it/s", peak_mib=peak,
              loss_first=hist["losses"][0], loss_last=hist["losses"][-1])
        print(f"  optimiser {name}: {steps / sec:.2f} it/s", flush=True)
        if name == "fp32 --no-cuda-graph":
            b.extra["optim_profile"] = _profile(lambda: optimize(q, fp, images, OptimConfig(iters=2, **cfg)), b.dry)
    if not b.dry:
        _graph_check(b, fp, images[:3 * bs].to(b.dev), bs)
    # host cost of one steady-state step (bench.optimizer_overhead's counts, here with the GPU's launches)
    counts = optimizer_overhead.measure_steps(fp, "w4a4", images[:bs].to(b.dev), repeats=1 if b.dry else 3)
    b.extra["optim_counts"] = {k: counts[k] for k in ("plain", "e2e", "ratios")}
    e = counts["e2e"]["triton_path"]
    print(f"  optimiser step: {e.get('syncs')} syncs, {e.get('dispatched_ops')} dispatched ops "
          f"({counts['ratios'].get('dispatched_ops_triton_path', float('nan')):.2f}x the plain fp32 step), "
          f"{e.get('launches_total')} Triton launches", flush=True)
    _triton(None)


def _graph_check(b: Bench, fp, images, bs: int, steps: int = 8) -> None:
    """The captured step against the same step run eagerly (both with the graphable Adam, on the same batches):
    the losses must be equal bit for bit."""
    import torch

    from quant.calibrate import calibrate
    from quant.graph_step import GraphedStep
    from quant.optimize import OptimConfig, _make_optim, _units, graph_body, train_step
    from quant.surgery import quantize_model
    losses = {}
    for graphed in (False, True):
        q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), images[:8])
        cfg = OptimConfig(method="e2e", iters=steps, batch_size=bs, progress=False)
        (unit,) = _units(q, cfg, images[:1])
        q.requires_grad_(False)
        for p in unit.params.values():
            p.requires_grad_(True)
        opt, sched = _make_optim(unit, cfg, graphable=True)
        graph = GraphedStep(graph_body(q, fp, unit, cfg, opt), opt) if graphed else None
        out = [train_step(q, fp, images[i % 3 * bs:(i % 3 + 1) * bs], unit, cfg, opt, sched, graph=graph).detach()
               for i in range(steps)]
        losses[graphed] = torch.stack(out).cpu().tolist()
        if graphed and not graph.captured:
            b.check("optimiser: CUDA-graph step = eager step", False, "the step was not captured (see the warning)")
            return
    b.check("optimiser: CUDA-graph step = eager step", losses[True] == losses[False],
            f"{steps} steps, losses {losses[True][0]:.6g} .. {losses[True][-1]:.6g}"
            + ("" if losses[True] == losses[False] else f" vs eager {losses[False][0]:.6g} .. {losses[False][-1]:.6g}"))


def _profile(fn: Callable[[], object], dry: bool, top: int = 15) -> dict:
    """``torch.profiler`` of ``fn``: the ops with the most host (self CPU) and device time, and the count of calls
    that synchronise the host with the device (``aten::item``, ``aten::is_nonzero``, ``cudaStreamSynchronize``,
    ``cudaDeviceSynchronize``, ``aten::_local_scalar_dense``)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([] if dry else [ProfilerActivity.CUDA])
    with profile(activities=acts) as prof:
        fn()
    ev = prof.key_averages()

    def rows(key):
        out = sorted(ev, key=lambda e: getattr(e, key, 0) or 0, reverse=True)[:top]
        return [dict(name=e.key[:80], calls=e.count, self_cpu_ms=e.self_cpu_time_total / 1e3,
                     device_ms=(getattr(e, "self_device_time_total", 0) or 0) / 1e3) for e in out]
    syncing = ("aten::item", "aten::is_nonzero", "aten::_local_scalar_dense", "cudaStreamSynchronize",
               "cudaDeviceSynchronize")
    return dict(by_cpu=rows("self_cpu_time_total"), by_device=rows("self_device_time_total"),
                syncs={e.key: e.count for e in ev if e.key in syncing},
                total_calls=sum(e.count for e in ev))


# ---------------------------------------------------------------------------------------------- report


def _ratios(rows: List[dict]) -> None:
    """Each row's ``ratio`` to every baseline of its (section, case): baseline ms / row ms (speed-up)."""
    for r in rows:
        bases = {x["impl"].replace("baseline ", ""): x["ms"] for x in rows
                 if x["section"] == r["section"] and x["case"] == r["case"] and x["impl"].startswith("baseline")}
        if r["section"] == "quantize":  # bandwidth ratio (different byte counts)
            bases = {x["impl"].replace("baseline ", ""): x["rate"] for x in rows if x["section"] == r["section"]
                     and x["case"] == r["case"] and x["impl"].startswith("baseline")}
            r["ratio"] = {k: r["rate"] / v for k, v in bases.items()}
        else:
            r["ratio"] = {k: v / r["ms"] for k, v in bases.items()}
        if r["section"] == "model" and "compiled" in r["impl"] and not r["impl"].startswith("timm"):
            comp = [x["ms"] for x in rows if x["case"] == r["case"] and x["impl"] == "timm fp16 compiled"]
            if comp:
                r["ratio"]["timm fp16 compiled"] = comp[0] / r["ms"]


def _targets(rows: List[dict]) -> List[dict]:
    out = []
    for what, section, case, impls, base, want in TARGETS:
        got = [(r["case"], r["impl"], r["ratio"].get(base)) for r in rows if r["section"] == section
               and (case in r["case"] + " ") and r["impl"] in impls and r["ratio"].get(base) is not None]
        if not got:
            out.append(dict(target=what, want=want, got=None, ok=False, detail="not measured"))
            continue
        if section == "model":  # the best deployment of the model counts (eager or CUDA graphs)
            worst = max(got, key=lambda t: t[2])
        else:
            worst = min(got, key=lambda t: t[2])
        out.append(dict(target=what, want=want, got=worst[2], ok=worst[2] >= want,
                        detail=f"{'best' if section == 'model' else 'worst'}: {worst[1]} at {worst[0]}"))
    return out


def _env(dry: bool) -> dict:
    import torch
    import triton
    env = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
               triton=triton.__version__, python=platform.python_version(), dry=dry,
               cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    if torch.cuda.is_available() and not dry:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2 ** 30, 1),
                   cuda=torch.version.cuda)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def _fmt_ratio(r: dict) -> str:
    return ", ".join(f"{v:.2f}x {k}" for k, v in r["ratio"].items()) or "-"


def markdown(res: dict) -> str:
    env = res["env"]
    lines = ["# GPU results (`python -m bench.gpu`)", "",
             "Written by the script from this run's own measurements; do not edit by hand.", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "Speeds are ratios to the baseline measured in the same process (`x` = faster when > 1): kernel "
              "medians of `triton.testing.do_bench_cudagraph` (GPU time of the call replayed in a CUDA graph, the "
              "host's launch cost out of both sides); models and the optimiser by CUDA events or wall clock around "
              "whole calls (eager: host launch cost included; compiled: `torch.compile` with CUDA graphs).", ""]
    fails = [c for c in res["checks"] if not c["ok"]]
    lines += ["## Checks against `kernels.reference`", "",
              f"{len(res['checks']) - len(fails)} of {len(res['checks'])} passed.", ""]
    lines += ["| check | result | detail |", "| --- | --- | --- |"]
    lines += [f"| {c['name']} | {'ok' if c['ok'] else '**FAIL**'} | {c['detail']} |" for c in res["checks"]]
    lines += ["", "## Targets", "", "| target | want | got | met | where |", "| --- | --- | --- | --- | --- |"]
    for t in res["targets"]:
        got = "-" if t["got"] is None else f"{t['got']:.2f}x"
        lines.append(f"| {t['target']} | >= {t['want']}x | {got} | {'yes' if t['ok'] else 'no'} | {t['detail']} |")
    for section in ("gemm", "quantize", "attention", "model", "optim"):
        rows = [r for r in res["rows"] if r["section"] == section]
        if not rows:
            continue
        lines += ["", f"## {section}", "", "| case | impl | ms | rate | vs baseline | peak MiB |",
                  "| --- | --- | ---: | ---: | --- | ---: |"]
        for r in rows:
            peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") else ""
            lines.append(f"| {r['case']} | {r['impl']} | {r['ms']:.4f} | {r['rate']:.3f} {r['unit']} | "
                         f"{_fmt_ratio(r)} | {peak} |")
    prof = res.get("extra", {}).get("optim_profile")
    if prof:
        lines += ["", "## optimiser profile (fp32, one `optimize` call of 2 steps)", "",
                  f"{prof['total_calls']} profiled calls; host-device synchronising calls: "
                  + (", ".join(f"{k} x{v}" for k, v in prof["syncs"].items()) or "none"), ""]
        for key, title in (("by_device", "device"), ("by_cpu", "host (self CPU)")):
            lines += [f"Most {title} time:", "", "| op | calls | self CPU ms | device ms |", "| --- | ---: | ---: | ---: |"]
            lines += [f"| `{r['name']}` | {r['calls']} | {r['self_cpu_ms']:.2f} | {r['device_ms']:.2f} |"
                      for r in prof[key]]
            lines.append("")
    counts = res.get("extra", {}).get("optim_counts")
    if counts:
        lines += ["", "## optimiser step: host cost (one steady-state step, `bench.optimizer_overhead`)", "",
                  "| step | syncs | aten ops | dispatched ops | x plain | Triton launches |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        p, t = counts["plain"], counts["e2e"]["triton_path"]
        lines.append(f"| plain fp32 distillation | {p['syncs']} | {p['aten_ops']} | {p['dispatched_ops']} | 1.00 | - |")
        if "error" not in t:
            lines.append(f"| e2e W4A4 | {t['syncs']} | {t['aten_ops']} | {t['dispatched_ops']} | "
                         f"{counts['ratios']['dispatched_ops_triton_path']:.2f} | {t['launches_total']} |")
    trt = res.get("extra", {}).get("tensorrt")
    if trt:
        lines += ["", "## TensorRT", "", f"ViT-B W4A4 QDQ graph (`export.onnx`), TensorRT {trt.get('version', '-')}: "
                  f"{trt['status']}"]
    if res["errors"]:
        lines += ["", "## Sections that failed", ""]
        lines += [f"- {k}: `{v.strip().splitlines()[-1]}`" for k, v in res["errors"].items()]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write(b: Bench, out: Path, dry: bool, seconds: dict) -> str:
    """Write ``results.json`` and ``RESULTS.md`` (after every section, so a cut-off run keeps what it measured)."""
    _ratios(b.rows)
    res = dict(env={**_env(dry), "quick": b.quick, "seconds": seconds}, checks=b.checks, targets=_targets(b.rows), rows=b.rows,
               errors=b.errors, extra=b.extra)
    _atomic_write(out / "results.json", json.dumps(res, indent=1))
    md = markdown(res)
    _atomic_write(out / "RESULTS.md", md)
    return md


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, tiny shapes (what CI runs)")
    ap.add_argument("--quick", action="store_true",
                    help="the checks and the headline timings only (about 5 minutes on an H200): ViT-B batch 1 and "
                         "64, two GEMM shapes, no batch 8, no L = 577, ViT-B only, the optimiser in fp32")
    ap.add_argument("--out", default=str(ROOT / "bench"), help="folder for RESULTS.md and results.json")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--models", default=None, help="comma list of models for the models section")
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    out = Path(args.out)
    try:
        if bad:
            raise ValueError(f"unknown section(s) {', '.join(bad)}; use {', '.join(SECTIONS)}")
        if not out.is_dir():
            raise ValueError(f"--out {out} is not a folder; create it first")
        if args.dry:
            os.environ["TRITON_INTERPRET"] = "1"
        import torch
        if not args.dry and not torch.cuda.is_available():
            raise ValueError("no CUDA device; run on a GPU machine, or use --dry for the CPU check of the script")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    b = Bench(args.dry, args.quick)
    t_all = time.perf_counter()
    seconds, md = {}, ""
    for s in sections:
        print(f"== {s}", flush=True)
        t0 = time.perf_counter()
        try:
            fn = {"checks": section_checks, "kernels": section_kernels, "optim": section_optim,
                  "models": lambda bb: section_models(bb, args.models.split(",") if args.models else None)}[s]
            fn(b)
        except Exception:  # noqa: BLE001 - a broken section is reported, the others still run
            b.errors[s] = traceback.format_exc()
            print(b.errors[s], file=sys.stderr, flush=True)
        finally:
            _triton(None)
        seconds[s] = round(time.perf_counter() - t0, 1)
        md = _write(b, out, args.dry, {**seconds, "total": round(time.perf_counter() - t_all, 1)})
    print(md)
    return 1 if b.errors or any(not c["ok"] for c in b.checks) else 0


if __name__ == "__main__":
    sys.exit(main())
