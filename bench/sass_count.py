"""``python -m bench.sass_count``: static SASS instructions of the row and epilogue kernels at ViT-B shapes, compiled
for sm_90 on any machine (no GPU: :mod:`kernels.gpu_compile` with the ``nvdisasm`` Triton ships).

Per launch: the main-path instruction count (the out-of-line IEEE-division slow paths excluded) divided by the
elements one thread handles, the ``MUFU`` (reciprocal / sqrt / exp units), ``BAR`` (barriers) and ``CALL`` counts. A
static count, not a timing: it says where the element-wise kernels stand against the ~27 instructions per element
at which an H100 stops being memory-bound on 2-byte in / 1-byte out (3.35 TB/s against 132 SMs x 4 x 32 lanes
x 1.75 GHz); ``python -m bench.gpu`` times them. ``--json PATH`` writes the rows.
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
from kernels import gpu_compile as G
from kernels import library as L
from kernels.configs import Target

_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")
_SLOW_PATH = re.compile(r"\n\s*\$__internal[\w$]*:")


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


def count(launch, elements_per_thread: float, arch: int = 90) -> dict:
    """Main-path instruction counts of ``launch`` (``per_element``: total / ``elements_per_thread``)."""
    main = _SLOW_PATH.split(sass(launch, arch))[0]
    ops = collections.Counter(i.split(".")[0] for i in _INSTR.findall(main))
    total = sum(ops.values())
    return dict(instructions=total, per_element=round(total / elements_per_thread, 1), mufu=ops["MUFU"],
                bar=ops["BAR"], call=ops["CALL"])


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
    rows.append(("layernorm_quantize a4 (deployed: folded affine)", lx, per_thread(lx, lx.meta["BLOCK_C"])))
    lx = L.layernorm_quantize_launch(x16, o8, meta(c), meta(c), 1e-6, meta(c), meta(c), s, z, 4.0, t)
    rows.append(("layernorm_quantize a4 + r, shift", lx, per_thread(lx, lx.meta["BLOCK_C"])))
    lx = L.rescale_quantize_launch(x16, o8, None, None, s, z, 4.0, t)
    rows.append(("rescale_quantize a4", lx, per_thread(lx, lx.meta["BLOCK_C"])))
    lx = L.rescale_quantize_launch(x16, o8, meta(c), meta(c), s, z, 4.0, t)
    rows.append(("rescale_quantize a4 + r, shift", lx, per_thread(lx, lx.meta["BLOCK_C"])))
    x32 = meta(m, c)
    lx = L.fake_quantize_fwd_launch(x32, meta(m, c), meta(c), meta(c), s, z, 4.0, t)
    rows.append(("fake_quantize_fwd a4 + r, shift", lx, per_thread(lx, lx.meta["BLOCK_C"])))
    lx = L.fake_quantize_bwd_launch(meta(m, c), x32, meta(c), meta(c), s, z, 4.0, t)[0]
    rows.append(("fake_quantize_bwd a4 + r, shift", lx, per_thread(lx, lx.meta["BLOCK_C"])))
    lx = G.attention_launch(64, 12, 197, 64, t, fused=True)
    rows.append(("quant_attention a8 fused (per score of a tile: both key loops once, with prologue/epilogue)", lx,
                 2 * lx.meta["BLOCK_M"] * lx.meta["BLOCK_N"] / (32 * lx.options["num_warps"])))
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
        r = dict(kernel=name, **count(lx, per, args.arch))
        rows.append(r)
        print(f"| {name} | {r['instructions']} | {r['per_element']} | {r['mufu']} | {r['bar']} | {r['call']} |",
              flush=True)
    if args.json:
        atomic_write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
