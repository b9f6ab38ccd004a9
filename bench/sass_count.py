"""``python -m bench.sass_count``: static SASS instructions of the row and epilogue kernels at ViT-B shapes, compiled
for sm_90 on any machine (no GPU: :mod:`kernels.gpu_compile` with the ``nvdisasm`` Triton ships).

Per launch: the main-path instruction count (the out-of-line IEEE-division slow paths excluded) divided by the
elements one thread handles, the ``MUFU`` (reciprocal / sqrt / exp units), ``BAR`` (barriers) and ``CALL`` counts. A
static count, not a timing: it says where the element-wise kernels stand against the ~27 instructions per element
at which an H100 stops being memory-bound on 2-byte in / 1-byte out (3.35 TB/s against 132 SMs x 4 x 32 lanes
x 1.75 GHz); ``python -m bench.gpu`` times them.

A second table takes the loops: one K step of the int8 GEMMs at the ViT-B batch-64 linears as deployed (int8 codes
after the unpack, centred), on the pointer-load kernel and on the persistent TMA kernel (its flattened tile loop
without the once-per-tile epilogue), and, for comparison, with the activation row sums (uncentred int8, as W8A8
runs), with the issue cycles a warp scheduler needs per iteration (loop instructions x warps / 4 schedulers) against the
tensor-core cycles of its ``BM x BN x BK`` int8 MACs (4,096 per SM per cycle on an H100: 1,979 dense TOPS); and the
two-pass attention kernel's key loops, per score, then the issued warp-instructions per score of the one-pass and
the two-pass attention at ViT-B (a static estimate: loops counted per iteration). ``--json PATH`` writes the rows.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import torch

from calib.common import atomic_write_json
from kernels import configs as C
from kernels import gpu_compile as G
from kernels import library as L
from kernels.configs import Target

_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")
_SLOW_PATH = re.compile(r"\n\s*\$__internal[\w$]*:")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\s+(?:\S+\s+)?`?\(?(\.L_x_\d+)")
#: int8 MACs per SM per cycle of an H100's tensor cores (1,979 dense TOPS / 2 / 132 SMs / 1.83 GHz)
IGMMA_MACS_PER_CYCLE = 4096


def sass(launch, arch: int = 90) -> str:
    """The SASS text of ``launch`` compiled for ``sm_<arch>``."""
    import triton
    k = G.compile_kernel(launch, arch)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        return subprocess.run([tool, "-c", path], capture_output=True, text=True, check=True).stdout


def main_path(launch, arch: int = 90) -> str:
    """The SASS of ``launch`` without the out-of-line IEEE-division slow paths."""
    return _SLOW_PATH.split(sass(launch, arch))[0]


def count(launch, elements_per_thread: float, arch: int = 90, tiles: int = 1) -> dict:
    """Main-path instruction counts of ``launch`` (``per_element``: total / ``elements_per_thread``). ``tiles``: row
    tiles per program of a persistent kernel (``elements_per_thread`` being one tile's): its longest loop counted
    ``tiles`` times, the prologue (per-column vectors, pipeline fill) once."""
    main = main_path(launch, arch)
    ops = collections.Counter(i.split(".")[0] for i in _INSTR.findall(main))
    total = sum(ops.values())
    if tiles > 1:
        total += (tiles - 1) * max(sum(b.values()) for b in loops(main))
    return dict(instructions=total, per_element=round(total / (elements_per_thread * tiles), 1), mufu=ops["MUFU"],
                bar=ops["BAR"], call=ops["CALL"])


def loops(text: str) -> list:
    """Opcode counters of the loop bodies of a SASS listing (a label up to the backward branch to it), in order."""
    lines = text.splitlines()
    labels, out = {}, []
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = i
        b = _BRANCH.search(line)
        if b and labels.get(b.group(1), i) < i:
            body = (_INSTR.search(x) for x in lines[labels[b.group(1)]:i + 1])
            out.append(collections.Counter(x.group(1).split(".")[0] for x in body if x))
    return out


def _k_step(text: str) -> collections.Counter:
    """Opcodes of one K step of a GEMM: the smallest loop holding the tensor-core instructions (and the TMA loads,
    where there are any), less the largest region inside it that a forward branch skips and that stores to global
    memory: the epilogue, which the persistent kernel's flattened tile loop runs once per tile, not per K step."""
    lines = text.splitlines()
    labels = {m.group(1): i for i, m in ((i, _LABEL.match(x)) for i, x in enumerate(lines)) if m}
    tma = "UTMALDG" in text
    loops_ = []
    for i, line in enumerate(lines):
        b = _BRANCH.search(line)
        if b and labels.get(b.group(1), i) < i:
            body = "\n".join(lines[labels[b.group(1)]:i])
            if "MMA" in body and (not tma or "UTMALDG" in body):
                loops_.append((labels[b.group(1)], i))
    lo, hi = min(loops_, key=lambda r: r[1] - r[0])
    skip = (hi, hi)
    for j in range(lo, hi):
        b = _BRANCH.search(lines[j])
        end = labels.get(b.group(1), -1) if b else -1
        if j < end <= hi and end - j > skip[1] - skip[0] and any("STG" in x for x in lines[j:end]):
            skip = (j + 1, end)
    path = lines[lo:skip[0]] + lines[skip[1]:hi + 1]
    return collections.Counter(m.group(1).split(".")[0] for m in map(_INSTR.search, path) if m)


def gemm_loop(launch, arch: int = 90) -> dict:
    """One K step of a GEMM's main loop (:func:`_k_step`): instructions, reductions (``SHFL``), ``IGMMA`` count, TMA
    loads, and issue against tensor-core cycles per step."""
    body = _k_step(main_path(launch, arch))
    n = sum(body.values())
    mt = launch.meta
    return dict(loop=n, shfl=body["SHFL"], mma=body["IGMMA"] + body["IMMA"], tma=body["UTMALDG"],
                issue_cycles=round(n * launch.options["num_warps"] / 4),
                tensor_cycles=round(mt["BLOCK_M"] * mt["BLOCK_N"] * mt["BLOCK_K"] / IGMMA_MACS_PER_CYCLE))


def gemm_launches(arch: int = 90) -> list:
    """``(name, launch)`` of the ViT-B batch-64 linears (M = 12608) on the pointer-load kernel of the table and on
    the persistent TMA kernel (the tile the dispatcher takes on sm_90; its 128x128 tile where it keeps the
    pointer-load kernel)."""
    t = Target(interpreted=False, arch=arch)
    m = 12608
    linears = [
        ("qkv 768->2304, per-column requant (centred int8 after unpack)", 2304, 768,
         dict(rq_bits=4.0, rq_per_col=True, centered=True)),
        ("proj 768->768 (centred)", 768, 768, dict(centered=True)),
        ("proj 768->768, activation row sums in the loop (uncentred int8: W8A8)", 768, 768, {}),
        ("fc1 768->3072, GELU + requant (centred)", 3072, 768, dict(gelu=True, rq_bits=4.0, centered=True)),
        ("fc2 3072->768 (centred), + residual", 768, 3072, dict(centered=True, res=True)),
    ]
    out = []
    for name, n, k, kw in linears:
        table = C.gemm_config("int8", m, n, k, t) or C.gemm_rule(m, n, k)
        out.append((f"{name}, pointer-load", G.gemm_launch("int8", m, n, k, t, table, **kw)))
        tma = C.tma_gemm_config(m, n, k, t, kw.get("centered", False))
        if tma is not None:
            out.append((f"{name}, TMA", G.gemm_launch("int8", m, n, k, t, tma, **kw)))
        else:  # the row sums on the TMA kernel, for the comparison behind tma_gemm_config's choice
            out.append((f"{name}, TMA (not dispatched)", G.gemm_launch("int8", m, n, k, t, C.TMA_CANDIDATES[-1], **kw)))
    return out


def attention_loops(arch: int = 90) -> dict:
    """Instructions per score of the fused attention's two key loops (ViT-B batch 64: L = 197, D = 64)."""
    lx = G.attention_launch(64, 12, 197, 64, Target(interpreted=False, arch=arch), fused=True, one_pass=False)
    per_thread = lx.meta["BLOCK_M"] * lx.meta["BLOCK_N"] / (32 * lx.options["num_warps"])
    bodies = loops(main_path(lx, arch))
    return dict(kernel="quant_attention a8 fused, two passes: key loops", config=lx.describe(),
                per_score=[round(sum(b.values()) / per_thread, 1) for b in bodies])


def attention_per_score(arch: int = 90, l: int = 197) -> list:
    """Issued warp-instructions per real score of the fused a8 attention at ViT-B batch 64 (``L = 197``, ``D = 64``),
    one pass against two: the static count plus each loop body once more per extra iteration (the last, partial key
    tile is peeled), times the warps, over the ``BLOCK_M x L`` scores a program computes. A static estimate, not a
    timing; padding keys (to the tile) and prologue/epilogue included."""
    t = Target(interpreted=False, arch=arch)
    out = []
    for one in (True, False):
        lx = G.attention_launch(64, 12, l, 64, t, fused=True, one_pass=one)
        text = main_path(lx, arch)
        total = sum(collections.Counter(i.split(".")[0] for i in _INSTR.findall(text)).values())
        bodies = [sum(b.values()) for b in loops(text)]
        dyn = total + (l // lx.meta["BLOCK_N"] - 1) * sum(bodies) if bodies else total
        out.append(dict(kernel=f"quant_attention a8 fused, {'one pass' if one else 'two passes'}: per score",
                        config=lx.describe(), warp_instructions_per_score=round(
                            dyn * lx.options["num_warps"] / (lx.meta["BLOCK_M"] * l), 2)))
    return out


def _row_width(lx) -> int:
    """Columns of a LayerNorm row a program holds (its ``CHUNKS`` chunks of ``BLOCK_C``)."""
    return lx.meta["BLOCK_C"] * lx.meta.get("CHUNKS", 1)


def tiles_per_program(lx) -> int:
    """Row tiles each program of a persistent rescale-quantize grid takes (1 for every other launch)."""
    if lx.kernel.__name__ != "rescale_quantize_kernel":
        return 1
    return -(-(-(-lx.args["M"] // lx.meta["BLOCK_M"])) // lx.grid[0])


def launches(arch: int = 90) -> list:
    """``(name, launch, elements per thread)`` at ViT-B batch 64 (M = 12608 tokens, C = 768)."""
    t = Target(interpreted=False, arch=arch)
    m, c = 12608, 768
    meta = G._meta
    x16, o8, s, z = meta(m, c, dtype=torch.float16), meta(m, c, dtype=torch.int8), meta(1), meta(1)
    rows = []

    def per_thread(lx, cols):
        return lx.meta["BLOCK_M"] * cols / (32 * lx.options["num_warps"])

    lx = L.layernorm_quantize_launch(x16, o8, meta(c), meta(c), 1e-6, None, None, s, z, 4.0, t)
    rows.append(("layernorm_quantize a4 (deployed: folded affine)", lx, per_thread(lx, _row_width(lx))))
    lx = L.layernorm_quantize_launch(x16, o8, meta(c), meta(c), 1e-6, meta(c), meta(c), s, z, 4.0, t)
    rows.append(("layernorm_quantize a4 + r, shift", lx, per_thread(lx, _row_width(lx))))
    lx = L.layernorm_quantize_launch(x16, o8, meta(c), meta(c), 1e-6, None, None, s, z, 4.0, t, config=(2, 1024, 1, 4))
    rows.append(("layernorm_quantize a4, former layout (one 1024-wide tile per row)", lx,
                 per_thread(lx, _row_width(lx))))
    x32 = meta(m, c)
    lx = L.layernorm_quantize_launch(x32, o8, meta(c), meta(c), 1e-6, None, None, s, z, 4.0, t, delta=meta(m, c),
                                     x_new=meta(m, c))
    rows.append(("add_layernorm_quantize a4 fp32 (residual add + LayerNorm)", lx, per_thread(lx, _row_width(lx))))
    lx = L.rescale_quantize_launch(x16, o8, None, None, s, z, 4.0, t)
    rows.append(("rescale_quantize a4", lx, per_thread(lx, lx.meta["BLOCK_C"])))
    lx = L.rescale_quantize_launch(x16, o8, meta(c), meta(c), s, z, 4.0, t)
    rows.append(("rescale_quantize a4 + r, shift", lx, per_thread(lx, lx.meta["BLOCK_C"])))
    lx = L.fake_quantize_fwd_launch(x32, meta(m, c), meta(c), meta(c), s, z, 4.0, t)
    rows.append(("fake_quantize_fwd a4 + r, shift", lx, per_thread(lx, lx.meta["BLOCK_C"])))
    lx = L.fake_quantize_bwd_launch(meta(m, c), x32, meta(c), meta(c), s, z, 4.0, t)[0]
    rows.append(("fake_quantize_bwd a4 + r, shift", lx, per_thread(lx, lx.meta["BLOCK_C"])))
    lx = G.attention_launch(64, 12, 197, 64, t, fused=True, one_pass=True)
    rows.append(("quant_attention a8 fused, one pass (per score of the 64 x 256 tile, with prologue/epilogue)", lx,
                 lx.meta["BLOCK_M"] * lx.meta["BLOCK_N"] / (32 * lx.options["num_warps"])))
    lx = G.attention_launch(64, 12, 197, 64, t, fused=True, one_pass=False)
    rows.append(("quant_attention a8 fused, two passes (per score of a tile: both key loops once, with "
                 "prologue/epilogue)", lx, 2 * lx.meta["BLOCK_M"] * lx.meta["BLOCK_N"] / (32 * lx.options["num_warps"])))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sass_count", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, choices=(80, 90))
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("error: TRITON_INTERPRET=1 is set; unset it (the interpreter's kernels cannot be compiled)",
              file=sys.stderr)
        return 2
    rows = []
    print(f"| kernel (sm_{args.arch}, ViT-B batch 64) | instructions | per element | MUFU | BAR | CALL |")
    print("|---|---|---|---|---|---|")
    for name, lx, per in launches(args.arch):
        r = dict(kernel=name, **count(lx, per, args.arch, tiles_per_program(lx)))
        rows.append(r)
        print(f"| {name} | {r['instructions']} | {r['per_element']} | {r['mufu']} | {r['bar']} | {r['call']} |",
              flush=True)
    print(f"\n| GEMM K step (sm_{args.arch}, ViT-B batch 64, M = 12608) | tile | instructions | SHFL | "
          "IGMMA | TMA loads | issue cycles | tensor cycles |")
    print("|---|---|---|---|---|---|---|---|")
    for name, lx in gemm_launches(args.arch):
        mt = lx.meta
        r = dict(kernel=name, tile=f"{mt['BLOCK_M']}x{mt['BLOCK_N']}x{mt['BLOCK_K']}/{lx.options['num_warps']}w",
                 **gemm_loop(lx, args.arch))
        rows.append(r)
        print(f"| {name} | {r['tile']} | {r['loop']} | {r['shfl']} | {r['mma']} | {r['tma']} | {r['issue_cycles']} | "
              f"{r['tensor_cycles']} |", flush=True)
    r = attention_loops(args.arch)
    rows.append(r)
    print(f"\n{r['kernel']} [{r['config']}]: {' and '.join(map(str, r['per_score']))} instructions per score")
    for r in attention_per_score(args.arch):
        rows.append(r)
        print(f"{r['kernel']} [{r['config']}]: {r['warp_instructions_per_score']} warp-instructions per score "
              f"(L = 197)")
    if args.json:
        atomic_write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
