"""Compile a kernel launch for a real NVIDIA target on any machine (no GPU needed) and read what the GPU compiler
made of it: registers and spill bytes (``ptxas -v``), shared memory, whether every ``tl.dot`` became
tensor-core code (``wgmma`` on sm_90, ``mma.sync`` on sm_80) and whether a TMA kernel's loads became bulk tensor
copies (``cp.async.bulk.tensor``).

``compile_launch(launch, arch)`` takes the :class:`kernels.launch.Launch` that the dispatcher would run (build it
on ``meta`` tensors) and returns a :class:`CompileReport`; :func:`check` turns a report into failure messages.
The signature is derived the way the Triton runtime specialises arguments: pointers to their dtype with 16-byte
alignment, integers as ``i32`` (``i64`` past 2^31; the value 1 becomes a constant), integers divisible by 16 marked
so, floats as ``fp32``.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import List, Optional

import torch
from triton.runtime.jit import mangle_type
from triton.tools.tensor_descriptor import TensorDescriptor

from lowbit import packing
from lowbit import primitives as P

from . import configs as C
from . import library as L
from .shapes import BATCHES, attention_shapes, gemm_problems, linear_shapes, mlp_shapes, norm_widths, qkv_shapes

#: per-block shared memory limit (bytes, opt-in maximum) of each target
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
#: registers per thread the hardware allows
MAX_REGS = 255

_DTYPES = {torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64", torch.float32: "fp32",
           torch.float16: "fp16", torch.bfloat16: "bf16", torch.bool: "i1"}


@dataclass
class CompileReport:
    name: str
    arch: int
    config: str
    ok: bool
    error: str = ""
    registers: int = 0
    spill_bytes: int = 0
    shared: int = 0
    dots: int = 0
    mma: bool = True
    wgmma: bool = False
    tma: bool = False


def signature(launch) -> tuple:
    """``(signature, constexprs, attrs)`` for :class:`triton.compiler.ASTSource` from a launch's arguments."""
    fn = launch.kernel
    sig, const, attrs = {}, dict(launch.meta), {}
    for i, name in enumerate(fn.arg_names):
        if name in launch.meta:
            sig[name] = "constexpr"
            continue
        v = launch.args[name]
        if isinstance(v, TensorDescriptor):
            sig[name] = mangle_type(v)
        elif torch.is_tensor(v):
            sig[name] = "*" + _DTYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name] = "constexpr"
                const[name] = 1
                continue
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"argument {name} of {fn.__name__}: cannot type {type(v).__name__}")
    return sig, const, attrs


def _ptxas_stats(ptx: str, arch: int) -> tuple:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    tool = get_ptxas(arch)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([tool.path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
                            src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"ptxas failed: {log.strip()[-400:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return int(regs.group(1)) if regs else 0, max(spills or [0])


def compile_kernel(launch, arch: int):
    """The compiled kernel of ``launch`` for ``sm_<arch>`` (``.asm`` holds its TTGIR, PTX and cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, const, attrs = signature(launch)
    src = ASTSource(fn=launch.kernel, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))


def compile_launch(launch, arch: int) -> CompileReport:
    """Compile ``launch`` for ``sm_<arch>`` (90 or 80) with its own warps and stages; never raises."""
    rep = CompileReport(launch.kernel.__name__, arch, launch.describe(), ok=False)
    try:
        k = compile_kernel(launch, arch)
        ptx = k.asm["ptx"]
        ttgir = k.asm["ttgir"]
        rep.shared = int(k.metadata.shared)
        rep.dots = len(re.findall(r"\btt\.dot\b|\bttng\.warp_group_dot\b|\btriton_nvidia_gpu\.warp_group_dot\b", ttgir))
        rep.mma = ("wgmma" in ptx or "mma.sync" in ptx) if rep.dots else True
        rep.wgmma = "wgmma" in ptx
        rep.tma = "cp.async.bulk.tensor" in ptx
        rep.registers, rep.spill_bytes = _ptxas_stats(ptx, arch)
        rep.ok = True
    except Exception as e:  # noqa: BLE001 - a failed compile is a result here
        rep.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    return rep


def check(rep: CompileReport) -> List[str]:
    """Failure messages of one report (empty when it compiles to tensor-core code without spills, within smem)."""
    where = f"{rep.name} sm_{rep.arch} [{rep.config}]"
    if not rep.ok:
        return [f"{where}: does not compile: {rep.error}"]
    errs = []
    if not rep.mma:
        errs.append(f"{where}: {rep.dots} tl.dot not lowered to tensor-core code (no wgmma / mma.sync in the PTX)")
    if rep.name.endswith("_tma_kernel") and not (rep.tma and rep.wgmma):
        errs.append(f"{where}: a TMA kernel without {'TMA loads (cp.async.bulk.tensor)' if not rep.tma else 'wgmma'} "
                    "in the PTX")
    if rep.spill_bytes:
        errs.append(f"{where}: spills {rep.spill_bytes} bytes per thread ({rep.registers} registers)")
    limit = SMEM_LIMIT.get(rep.arch)
    if limit is not None and rep.shared > limit:
        errs.append(f"{where}: {rep.shared} bytes of shared memory > the {limit}-byte per-block limit")
    return errs


def compile_many(launches, archs=(90, 80), processes: Optional[int] = None) -> List[CompileReport]:
    """Compile every launch for every arch, each in its own forked process (at most ``processes`` at a time; order
    kept), so a compiler that aborts the process (an LLVM fatal error) fails that launch's report, not the run."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    global _JOBS
    jobs = [(lx, a) for lx in launches for a in archs]
    processes = processes or max(1, min(len(jobs), os.cpu_count() or 1))
    ctx = mp.get_context("fork")
    out: List[Optional[CompileReport]] = [None] * len(jobs)
    todo, running = list(range(len(jobs))), {}
    _JOBS = jobs
    try:
        while todo or running:
            while todo and len(running) < processes:
                i = todo.pop(0)
                log = tempfile.TemporaryFile()
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_compile_job, args=(i, send, log.fileno()))
                proc.start()
                send.close()
                running[proc.sentinel] = (i, proc, recv, log)
            for sentinel in wait(list(running)):
                i, proc, recv, log = running.pop(sentinel)
                out[i] = recv.recv() if recv.poll() else _crashed(jobs[i], proc.exitcode, log)
                proc.join()
                recv.close()
                log.close()
    finally:
        _JOBS = []
    return out


_JOBS: list = []


def _compile_job(i: int, send, log_fd: int) -> None:
    os.dup2(log_fd, 2)  # the compiler's diagnostics go to the job's log
    send.send(compile_launch(*_JOBS[i]))
    send.close()


def _crashed(job, exitcode: Optional[int], log) -> CompileReport:
    lx, arch = job
    log.seek(0)
    text = log.read().decode(errors="replace")
    errors = [ln.split("error:", 1)[1].strip() for ln in text.splitlines() if "error:" in ln]
    why = errors[0] if errors else (text.strip().splitlines() or ["no output"])[-1]
    return CompileReport(lx.kernel.__name__, arch, lx.describe(), ok=False,
                         error=f"the compiler aborted the process (exit code {exitcode}): {why[:300]}")


# ---------------------------------------------------------------------------------------------- what can launch


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def gemm_launch(fmt: str, m: int, n: int, k: int, target, config=None, bias=True, gelu=False, out_dtype=torch.float32,
                rq_bits=None, rq_per_col=False, centered=False, res=False):
    """A packed-GEMM launch for an ``M x N x K`` problem, on meta tensors: the dispatcher's own choice when
    ``config`` is None, the pointer-load kernel with a :class:`kernels.configs.GemmConfig`, the persistent TMA kernel
    with a :class:`kernels.configs.TmaGemmConfig` (``rq_per_col``: the requant quantizer has a step and zero point
    per output column, as for a qkv projection; ``centered``: int8 codes ``w - zw``, as after an unpack; ``res``: a
    residual added to the float output, as for ``proj`` and ``fc2``)."""
    kp = packing.padded_k(k, fmt)
    planes = [_meta(n, kp // per, dtype=torch.int8 if fmt == "int8" else torch.uint8)
              for _, per in packing.FORMATS[fmt].planes]
    i32 = dict(dtype=torch.int32)
    rq = rq_bits is not None
    out = _meta(m, n, dtype=torch.int8 if rq else out_dtype)
    args = (_meta(m, k, dtype=torch.int8), planes, fmt, k, _meta(n, **i32), _meta(1), _meta(1), _meta(n),
            _meta(n, **i32), _meta(n) if bias else None, gelu, out, _meta(n if rq_per_col else 1) if rq else None,
            _meta(n if rq_per_col else 1) if rq else None, float(rq_bits or 8), target)
    residual = _meta(m, n, dtype=out_dtype) if res else None
    if config is None:
        return L.gemm_launch(*args, centered=centered, res=residual)
    if isinstance(config, C.TmaGemmConfig):
        a, planes, _, _, colsum, *rest = args
        return L.int8_gemm_tma_launch(a, planes[0], colsum, *rest, config, centered, residual)
    return L.packed_gemm_launch(*args, config, centered, residual)


def unpack_launch(fmt: str, n: int, k: int, target):
    """The dispatcher's weight-unpack launch (:mod:`kernels.unpack_codes`) for an ``N x K`` weight, on meta tensors."""
    kp = packing.padded_k(k, fmt)
    planes = [_meta(n, kp // per, dtype=torch.uint8) for _, per in packing.FORMATS[fmt].planes]
    return L.unpack_codes_launch(planes, fmt, k, _meta(n, dtype=torch.int32), _meta(n, k, dtype=torch.int8), target)


def attention_launch(b: int, h: int, l: int, d: int, target, sulq=False, bias=False, mask=False, p_bits=8.0,
                     fused=False, rescale=False, one_pass=None):
    """The dispatcher's attention launch on meta tensors; ``fused``: as the exported models run it (Q, K, V read in
    place from a qkv output ``[B, L, 3, H, D]``, output requantized heads-last, with a ``rescale`` r / shift);
    ``one_pass``: force the one-pass (True) or the two-pass kernel (False; default: the dispatcher's choice)."""
    q = k = v = _meta(b, h, l, d, dtype=torch.int8)
    out = _meta(b, h, l, d)
    rq = {}
    if fused:
        q, k, v = _meta(b, l, 3, h, d, dtype=torch.int8).permute(2, 0, 3, 1, 4).unbind(0)
        out = _meta(b, l, h, d, dtype=torch.int8).permute(0, 2, 1, 3)
        rq = dict(rq_r=_meta(h * d) if rescale else None, rq_shift=_meta(h * d) if rescale else None,
                  rq_s=_meta(1), rq_z=_meta(1), rq_bits=4.0)
    if sulq:
        p = dict(eta_ptr=_meta(1), x0_ptr=_meta(1), sp_ptr=_meta(1), zp_ptr=_meta(1), table_ptr=_meta(P.n_levels(p_bits)),
                 sv_ptr=_meta(1))
    else:
        p = dict(sp_ptr=_meta(1), zp_ptr=_meta(1), pv_scale_ptr=_meta(1))
    return L.quant_attention_launch(q, k, v, out, _meta(h, l, l) if bias else None, _meta(4, l, l) if mask else None,
                                    _meta(1), _meta(1), _meta(1), _meta(1), p, p_bits, target, **rq,
                                    one_pass=one_pass)


def dispatcher_launches(arch: int) -> list:
    """Every distinct launch the dispatcher can make on ``sm_<arch>`` for the literature models and the demo
    (:mod:`kernels.shapes`): each table row / rule choice and autotune candidate of the packed GEMM with the
    epilogues the runtime uses, every epilogue variant on the largest tile, the attention kernels at every
    ``(L, head dim)`` with the Swin bias / mask variants and every probability width, the quantize, fake-quant
    and LayerNorm kernels at every channel width with every rescale / affine variant. Deduplicated by what the
    compiled binary depends on."""
    target = C.Target(interpreted=False, arch=arch)
    fmts = tuple(L.GEMM_LOADERS)
    a_bits = (3.0, 4.0, 6.0, 8.0)
    out = {}

    def add(lx):
        out.setdefault(lx.key(), lx)

    fc1, qkv = mlp_shapes(), qkv_shapes()
    for m, n, k in gemm_problems():
        for packed in fmts:
            fmt = "int8" if C.unpack_first(packed, m) else packed
            c = fmt != packed
            if c:
                add(unpack_launch(packed, n, k, target))
            cfg = C.gemm_config(fmt, m, n, k, target) or C.gemm_rule(m, n, k)
            tma = C.tma_gemm_config(m, n, k, target, c) if fmt == "int8" else None
            for tile in (cfg, tma) if tma else (cfg,):  # bench.gpu times the pointer-load kernel beside TMA
                add(gemm_launch(fmt, m, n, k, target, tile, centered=c))
                if (k, n) in fc1:  # the GELU + requant epilogue runs on fc1 only (export.runtime.PackedMlp)
                    add(gemm_launch(fmt, m, n, k, target, tile, gelu=True, rq_bits=4.0, centered=c))
                elif (k, n) in qkv:  # per-column requant into Q, K, V codes (export.runtime._PackedAttention)
                    add(gemm_launch(fmt, m, n, k, target, tile, rq_bits=4.0, rq_per_col=True, centered=c))
                elif n in (k, k // 4):  # proj and fc2 take the block's residual (kernels.ops.vit_block)
                    add(gemm_launch(fmt, m, n, k, target, tile, centered=c, res=True))
    variants = [(fmt, False) for fmt in fmts] + [("int8", True)]
    for cfg in C.GEMM_CANDIDATES:
        for fmt, c in variants:
            for m in (197, 12608):
                add(gemm_launch(fmt, m, 768, 768, target, cfg, centered=c))
                add(gemm_launch(fmt, m, 3072, 768, target, cfg, gelu=True, rq_bits=8.0, centered=c))
    if arch == 90:  # every TMA tile with every epilogue, at ViT-B's batch-64 shapes
        for cfg in C.TMA_CANDIDATES:
            for c in (False, True) if cfg.block_n <= 128 else (True,):  # (uncentred: tma_gemm_config)
                for bias in (False, True):
                    for gelu in (False, True):
                        add(gemm_launch("int8", 12608, 768, 768, target, cfg, bias=bias, gelu=gelu, centered=c))
                for dt in (torch.float32, torch.float16, torch.bfloat16):
                    add(gemm_launch("int8", 12608, 768, 768, target, cfg, out_dtype=dt, centered=c))
                    add(gemm_launch("int8", 12608, 768, 3072, target, cfg, out_dtype=dt, centered=c, res=True))
                add(gemm_launch("int8", 12608, 3072, 768, target, cfg, gelu=True, rq_bits=4.0, centered=c))
                add(gemm_launch("int8", 12608, 2304, 768, target, cfg, rq_bits=4.0, rq_per_col=True, centered=c))
    big = C.GEMM_CANDIDATES[-1]
    for fmt, c in variants:
        for bias in (False, True):
            for dt in (torch.float32, torch.float16, torch.bfloat16):
                for gelu in (False, True):
                    add(gemm_launch(fmt, 1576, 768, 768, target, big, bias=bias, gelu=gelu, out_dtype=dt,
                                    centered=c))
            for rq in a_bits:
                add(gemm_launch(fmt, 1576, 768, 768, target, big, bias=bias, gelu=True, rq_bits=rq, centered=c))
                add(gemm_launch(fmt, 1576, 768, 768, target, big, bias=bias, gelu=False, rq_bits=rq, centered=c))
                add(gemm_launch(fmt, 1576, 2304, 768, target, big, bias=bias, rq_bits=rq, rq_per_col=True,
                                centered=c))

    for l, d in attention_shapes():
        # the dispatcher's kernel, and the two-pass one beside a one-pass choice (bench.gpu times both)
        for one in ((None, True, False) if l <= C.ONE_PASS_MAX_L else (None,)):
            for b in (1, 64):
                for sulq in (False, True):
                    add(attention_launch(b, 3, l, d, target, sulq=sulq, one_pass=one))
                    for rescale in (False, True):
                        add(attention_launch(b, 3, l, d, target, sulq=sulq, fused=True, rescale=rescale,
                                             one_pass=one))
                    if l == 49:
                        add(attention_launch(b, 3, l, d, target, sulq=sulq, bias=True, one_pass=one))
                        add(attention_launch(b, 3, l, d, target, sulq=sulq, bias=True, mask=True, one_pass=one))
                        add(attention_launch(b, 3, l, d, target, sulq=sulq, bias=True, fused=True, rescale=True,
                                             one_pass=one))
                        add(attention_launch(b, 3, l, d, target, sulq=sulq, bias=True, mask=True, fused=True,
                                             rescale=True, one_pass=one))
            for p in a_bits:
                add(attention_launch(8, 3, l, d, target, sulq=False, p_bits=p, one_pass=one))
                add(attention_launch(8, 3, l, d, target, sulq=True, p_bits=p, one_pass=one))
                add(attention_launch(8, 3, l, d, target, sulq=True, p_bits=P.sulq_grid_bits(p),  # published grid
                                     one_pass=one))

    widths = sorted(set(norm_widths()) | {k for k, _ in linear_shapes()})
    rows = sorted({t * b for t in (1, 49, 197) for b in BATCHES})
    for c in widths:
        for m in rows[:2] + rows[-1:]:
            x = _meta(m, c)
            s, z = _meta(1), _meta(1)
            for bits in a_bits:
                for r, sh in ((None, None), (_meta(c), _meta(c))):
                    add(L.fake_quantize_fwd_launch(x, _meta(m, c), r, sh, s, z, bits, target))
                    add(L.fake_quantize_bwd_launch(_meta(m, c), x, r, sh, s, z, bits, target)[0])
            for dt in (torch.float16, torch.bfloat16):
                add(L.fake_quantize_bwd_launch(_meta(m, c), _meta(m, c, dtype=dt), _meta(c), None, s, z, 4.0,
                                               target)[0])
            for wbits in (1.58, 3.0, 4.0, 8.0):  # weights: per-row s, z
                add(L.fake_quantize_fwd_launch(x, _meta(m, c), None, None, _meta(m), _meta(m), wbits, target))
                add(L.fake_quantize_bwd_launch(_meta(m, c), x, None, None, _meta(m), _meta(m), wbits, target)[0])
        for m in rows:  # every row count: the quantize and LayerNorm tiles depend on it (fewer warps at batch 1)
            for lx in row_launches(m, c, target, deployed=m == rows[-1], full=m == rows[-1] and c in (384, 768)):
                add(lx)
    if arch == 90:  # the tiles bench.gpu times beside the shipped ones (on an H100 / H200)
        for lx in row_launches(12608, 768, target, sweep=True):
            add(lx)
    for m in (197, 12608):  # a width that is no multiple of 16 (masked columns; ops take any width)
        for lx in row_launches(m, 200, target, deployed=False, full=False):
            add(lx)
    return list(out.values())


def row_launches(m: int, c: int, target, deployed: bool = True, full: bool = True, sweep: bool = False) -> list:
    """The rescale-quantize and LayerNorm-quantize launches (the residual-fused one included) for ``m`` rows of
    ``c`` columns, on meta tensors: float32 input with every option on (affine, rescale: the most registers), and
    fp16 input for rescale-quantize (its tiles depend on the input's width); ``deployed``: also fp16 with the
    folded affine, a bfloat16 residual stream with a float32 ``delta``; ``full``: also each input dtype and option
    alone, ``delta`` in ``x``'s dtype, several quantizer widths; ``sweep``: float32 and fp16 at the tiles of
    :data:`kernels.configs.LAYERNORM_SWEEP` and :data:`kernels.configs.QUANTIZE_SWEEP` instead."""
    s, z = _meta(1), _meta(1)
    o8 = _meta(m, c, dtype=torch.int8)
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    vec = _meta(c)
    ln, res, rq = [], [], []  # (dtype, affine, rescale, bits) / (dtype, delta dtype, rescale) / (dtype, rescale, bits)
    if sweep:
        ln, rq = [(f32, True, False, 4.0), (f16, True, False, 4.0)], [(f32, True, 4.0), (f16, True, 4.0)]
    else:
        ln, res, rq = [(f32, True, True, 4.0)], [(f32, f32, True)], [(f32, True, 4.0), (f16, False, 4.0)]
        if deployed or full:
            ln, res = ln + [(f16, True, False, 4.0)], res + [(bf16, f32, False)]
        if full:
            ln += [(f32, False, False, 8.0), (f32, True, False, 3.0), (bf16, True, True, 6.0), (f16, False, True, 4.0)]
            res += [(f32, f32, False), (f16, f16, False)]
            rq += [(dt, rs, bits) for dt in (f32, f16, bf16) for rs in (False, True) for bits in (3.0, 8.0)]
    out = []
    for dt, rs, bits in rq:
        for cfg in C.QUANTIZE_SWEEP if sweep else (None,):
            out.append(L.rescale_quantize_launch(_meta(m, c, dtype=dt), o8, vec if rs else None, vec if rs else None,
                                                 s, z, bits, target, cfg))
    for dt, aff, rs, bits in ln:
        for cfg in C.LAYERNORM_SWEEP if sweep else (None,):
            out.append(L.layernorm_quantize_launch(_meta(m, c, dtype=dt), o8, vec if aff else None,
                                                   vec if aff else None, 1e-6, vec if rs else None,
                                                   vec if rs else None, s, z, bits, target, cfg))
    for dt, ddt, rs in res:
        out.append(L.layernorm_quantize_launch(_meta(m, c, dtype=dt), o8, vec, vec, 1e-6, vec if rs else None,
                                               vec if rs else None, s, z, 4.0, target, delta=_meta(m, c, dtype=ddt),
                                               x_new=_meta(m, c, dtype=dt)))
    return out


def structural_key(lx) -> tuple:
    """:meth:`Launch.key` less what only changes constants in the code (quantizer level counts, but whether the codes
    fit int8: the 257-level SULQ grid takes another path) and the divisibility of row counts and input strides; the
    divisibility of N, K, C and of the output row stride stays (it decides whether stores vectorise, which moves
    register use)."""
    meta = tuple((k, getattr(v, "__name__", v)) for k, v in lx.meta.items() if not k.endswith(("QMAX", "OFFSET")))
    meta += tuple((k, v > 255) for k, v in lx.meta.items() if k.endswith("QMAX"))
    sig = tuple((k, str(v.dtype)) if hasattr(v, "dtype") else (k, isinstance(v, int) and v % 16 == 0)
                for k, v in lx.args.items() if hasattr(v, "dtype") or k in ("N", "K", "stride_om", "C"))
    return (lx.kernel.__name__, meta, sig, tuple(sorted(lx.options.items())))


def representatives(launches) -> list:
    """One launch per :func:`structural_key` (the first met)."""
    out = {}
    for lx in launches:
        out.setdefault(structural_key(lx), lx)
    return list(out.values())


def summary(reports) -> str:
    """A table per (kernel, arch): launches compiled, max registers, max spill bytes, max shared memory, and how
    many use TMA loads and ``wgmma``."""
    rows = {}
    for r in reports:
        k = (r.name, r.arch)
        n, regs, spill, smem, tma, wg = rows.get(k, (0, 0, 0, 0, 0, 0))
        rows[k] = (n + 1, max(regs, r.registers), max(spill, r.spill_bytes), max(smem, r.shared), tma + r.tma,
                   wg + r.wgmma)
    out = [f"{'kernel':30s} {'arch':>6s} {'configs':>8s} {'max regs':>9s} {'max spill':>10s} {'max smem':>9s} "
           f"{'TMA':>5s} {'wgmma':>6s}"]
    for (name, arch), (n, regs, spill, smem, tma, wg) in sorted(rows.items()):
        out.append(f"{name:30s} sm_{arch:<3d} {n:8d} {regs:9d} {spill:10d} {smem:9d} {tma:5d} {wg:6d}")
    return "\n".join(out)


def main(argv=None) -> int:
    import argparse
    import dataclasses
    import json
    import time
    ap = argparse.ArgumentParser(prog="python -m kernels.gpu_compile",
                                 description="Compile every dispatcher launch for real GPU targets (no GPU needed) "
                                             "and check registers, spills, shared memory and tensor-core use.")
    ap.add_argument("--arch", type=int, action="append", choices=sorted(SMEM_LIMIT),
                    help="compute capability (repeatable; default 90 and 80)")
    ap.add_argument("--all", action="store_true", help="every distinct launch, not one per structural key")
    ap.add_argument("--processes", type=int, default=None)
    ap.add_argument("--json", help="write every report to this file")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("error: TRITON_INTERPRET=1 is set; unset it (the interpreter's kernels cannot be compiled)")
        return 2
    t0 = time.time()
    reports = []
    for arch in args.arch or [90, 80]:
        launches = dispatcher_launches(arch)
        if not args.all:
            launches = representatives(launches)
        reports += compile_many(launches, archs=(arch,), processes=args.processes)
    errors = [e for r in reports for e in check(r)]
    print(summary(reports))
    print(f"{len(reports)} launches compiled in {time.time() - t0:.0f} s; {len(errors)} failing checks")
    for e in errors:
        print("FAIL", e)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)
        os.replace(tmp, args.json)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
