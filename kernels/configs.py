"""Launch configurations: block sizes, warps and pipeline stages of every kernel, for a :class:`Target`.

The dispatcher (:mod:`kernels.library`) and the compile checks (:mod:`kernels.gpu_compile`,
``tests/kernels/test_compile_gpu.py``) both ask here, so every configuration that can run is one that is checked.

Packed GEMM: ``gemm_config(fmt, m, n, k, target)`` looks up ``(format, M bucket, N, K)`` in the table of the
target (:data:`kernels.gemm_table.SM90`, for H100); a shape the table lacks is autotuned on sm_90 over
:data:`GEMM_CANDIDATES` (every candidate compile-checked), and other GPUs take :func:`gemm_rule`. Small M (batch 1:
M = 197) gets small tiles so that the grid covers the SMs instead of 2-4 row tiles.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import gemm_table
from .shapes import gemm_problems


@dataclass(frozen=True)
class Target:
    """Where a launch runs: the Triton interpreter, or a CUDA GPU of compute capability ``arch`` (90 = H100)."""
    interpreted: bool
    arch: int = 90
    num_sms: int = 132

    @staticmethod
    def of(t: torch.Tensor) -> "Target":
        if not t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1":
            return _INTERPRETED
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        target = _GPU_TARGETS.get(index)
        if target is None:
            major, minor = torch.cuda.get_device_capability(index)
            sms = torch.cuda.get_device_properties(index).multi_processor_count
            target = _GPU_TARGETS[index] = Target(interpreted=False, arch=10 * major + minor, num_sms=sms)
        return target


_INTERPRETED = Target(interpreted=True)
_GPU_TARGETS: dict = {}


def ptx_asm(target: Target) -> bool:
    """Whether a launch may carry inline PTX (``FAST_EXP``): compiled for a GPU, not run by the interpreter (which
    runs a GPU target's tiles in the tests)."""
    return not target.interpreted and os.environ.get("TRITON_INTERPRET", "0") != "1"


#: compile options of every GPU launch: no FMA contraction, so the float epilogues round like the torch reference
#: (:mod:`kernels.reference`) and exported models stay bit-identical to it
GPU_OPTIONS = dict(enable_fp_fusion=False)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m)

    def options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, **GPU_OPTIONS)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on the host (``triton.cdiv`` is a jit function: microseconds per host call)."""
    return -(-a // b)


def pow2(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    """The next power of two ``>= n``, clamped to ``[lo, hi]``."""
    return max(lo, min(hi, 1 << (max(int(n), 1) - 1).bit_length()))


#: M buckets of the table: a row's key is the smallest bucket >= M (the last one is open-ended)
M_BUCKETS = (256, 2048, 1 << 62)


def m_bucket(m: int) -> int:
    return next(b for b in M_BUCKETS if m <= b)


#: autotuning candidates (sm_90 shapes missing from the table); each passes the compile checks with every epilogue.
#: 128x128 tiles are left out: with the GELU + requantize epilogue and N not a multiple of 16 they spill on both
#: targets (8 or 16 warps, BLOCK_K 64 or 128)
GEMM_CANDIDATES = (
    GemmConfig(16, 64, 128, 4, 4),
    GemmConfig(32, 64, 64, 4, 3),
    GemmConfig(64, 64, 128, 4, 4),
    GemmConfig(64, 128, 128, 8, 3),
)


#: the tiles timed on an H100 by ``bench/gemm_sweep.py`` (data: ``bench/gemm_sweep_h100.json``) from which the ViT-B
#: rows of the sm_90 table were taken: compile-checked there, at the shapes and with the epilogues they run
SWEEP_TILES = (
    GemmConfig(64, 64, 128, 4, 4), GemmConfig(64, 128, 128, 4, 3), GemmConfig(64, 128, 128, 8, 3),
    GemmConfig(64, 256, 128, 8, 3), GemmConfig(128, 64, 128, 8, 3), GemmConfig(128, 128, 128, 8, 3),
    GemmConfig(128, 128, 128, 8, 4),
)


def gemm_rule(m: int, n: int, k: int, num_sms: int = 132) -> GemmConfig:
    """Largest of the candidate tiles whose grid still gives every SM a tile (fewest tiles, full machine);
    the smallest tile when none does."""
    for cfg in reversed(GEMM_CANDIDATES):
        if cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n) >= num_sms:
            return cfg
    return GEMM_CANDIDATES[0]


def gemm_config(fmt: str, m: int, n: int, k: int, target: Target) -> Optional[GemmConfig]:
    """The configuration to launch, or ``None`` where the caller autotunes (sm_90 shape not in the table)."""
    if target.interpreted:
        return GemmConfig(pow2(m, 16, 128), pow2(n, 16, 128), 128, 4, 1, 1)
    if target.arch == 90:
        row = gemm_table.SM90.get((fmt, m_bucket(m), n, k))
        return GemmConfig(*row) if row is not None else None
    return gemm_rule(m, n, k, target.num_sms)


@dataclass(frozen=True)
class TmaGemmConfig(GemmConfig):
    """A tile of the persistent TMA GEMM (:mod:`kernels.int8_gemm_tma`); ``epi_split``: column slices its epilogue
    runs one after another (1, 2 or 4)."""
    epi_split: int = 2

    def meta(self) -> dict:
        return dict(super().meta(), EPI_SPLIT=self.epi_split)


#: whether the int8 GEMMs of centred codes (the weights unpacked first, from :data:`UNPACK_MIN_M` rows) run the
#: persistent TMA kernel on sm_90 where :func:`tma_gemm_config` finds a tile; set ahead of a GPU measurement from the design (TMA
#: loads, 128-row ``wgmma`` tiles, one program per SM) and to be confirmed by ``python -m bench.gpu``, which times
#: it beside the pointer-load kernel of the table in the same run
TMA_GEMM = True

#: the persistent TMA GEMM's tiles, largest first: 128-row tiles on two warpgroups (each a 64-row ``wgmma``), a
#: 128-wide K step (one 128-byte swizzled row of int8 per operand row), 3-4 stages of 32-48 KiB. Every one passes
#: the sm_90 compile checks (TMA and ``wgmma`` in the PTX, no spills) with every epilogue. The 128x256 tile holds
#: 128 accumulator registers per thread: its epilogue runs on four 64-column slices (on two halves the fp32 and
#: residual epilogues spill 32-400 bytes under Triton 3.8); the 128x128 tile's on two (whole, it spills 56-132 bytes
#: under Triton 3.6)
TMA_CANDIDATES = (
    TmaGemmConfig(128, 256, 128, 8, 3, 8, 4),
    TmaGemmConfig(128, 128, 128, 8, 4, 8, 2),
)


def tma_gemm_config(m: int, n: int, k: int, target: Target, centered: bool = True) -> Optional[TmaGemmConfig]:
    """The TMA tile for an int8 ``M x N x K`` GEMM on ``target``, or None for the pointer-load kernel: sm_90 only
    (:data:`TMA_GEMM`), K a multiple of 16 (a TMA row stride is a multiple of 16 bytes), centred weight codes, and
    the largest candidate whose tiles still cover every SM (at batch 1, M = 197, 128-row tiles would leave most SMs
    idle: the table's small tiles run there). Uncentred codes (8-bit weights, whose loop also sums the activation
    rows) keep the pointer-load kernel: summed from the TMA tile in shared memory the row sums take a K step of the
    128x128 tile to 426 instructions, 852 issue cycles against 512 tensor-core cycles (the pointer-load 64x128
    tile: 285 against 256; ``python -m bench.sass_count``), and beside them the 128x256 accumulator spills under
    Triton 3.9."""
    if not TMA_GEMM or not centered or target.interpreted or target.arch != 90 or k % 16:
        return None
    return next((c for c in TMA_CANDIDATES if cdiv(m, c.block_m) * cdiv(n, c.block_n) >= target.num_sms), None)


#: rows from which a packed (non-``int8``) weight is first unpacked to int8 codes (:mod:`kernels.unpack_codes`)
#: and multiplied by the int8 GEMM instead of unpacking inside the GEMM's main loop. Measured on H100 (bench/RESULTS.md,
#: CUDA-graph kernel times): at M = 197, 1576 and 12608 the fused int4 GEMM took 1.6-3x the int8 GEMM's time (the
#: per-tile unpack feeds the tensor cores from registers), while unpacking a ViT-B weight takes a few microseconds.
UNPACK_MIN_M = 128


def unpack_first(fmt: str, m: int) -> bool:
    """Whether an ``M``-row GEMM on a ``fmt`` weight runs as unpack + int8 GEMM (see :data:`UNPACK_MIN_M`)."""
    return fmt != "int8" and m >= UNPACK_MIN_M


def unpack_blocks(target: Target) -> Tuple[int, int, dict]:
    """``(BLOCK_N, BLOCK_K, options)`` of :mod:`kernels.unpack_codes`."""
    if target.interpreted:
        return 64, 128, {}
    return 32, 128, dict(num_warps=4, **GPU_OPTIONS)


# ---------------------------------------------------------------------------------------------- attention

#: head dims the attention kernels take (an int8 ``tl.dot`` needs a reduction of at least 32)
ATTENTION_HEAD_DIMS = (32, 64, 128)


def attention_config(l: int, d: int, target: Target, biased: bool = False, sulq: bool = False) -> Tuple[int, int, dict]:
    """``(BLOCK_M, BLOCK_N, options)`` of the two-pass attention kernels; ``biased``: a relative-position bias or
    window mask is added to the scores (Swin), which costs two more ``[BM, BN]`` fp32 tiles per pass, so the tiles
    shrink to stay spill-free (49-token windows barely fill a 64-row tile anyway). Head dim 64 (ViT / DeiT) runs
    its 64x64 tiles on one warpgroup (4 warps): with two, the warpgroups split the key columns and each repeats the
    row statistics with barriers between them; head dims 32 and 128 keep 8 warps. ``sulq``: the SULQ kernel's loops
    run unpipelined (one stage): Triton 3.6's software pipeliner (the GPU image's) aborts on its sm_90 loops ("doesn't
    know how to predicate" the int8 wgmma next to the two fp16 dots), and with the zero-point dots of the scores
    two stages spill on sm_80; its biased tiles take one warpgroup and ``maxnreg=168`` (without it ptxas stops at
    128 registers and spills a few bytes). Static sm_90 SASS of the uniform key loops at ViT-B batch 64
    (``python -m bench.sass_count``): 10.0 + 17.2 instructions per score on 128 registers."""
    if target.interpreted:
        return 64, 64, {}
    if biased:
        return (32 if d <= 64 else 16), 32, dict(num_warps=4 if sulq else 8, num_stages=1 if sulq else 2,
                                                 **(dict(maxnreg=168) if sulq else {}), **GPU_OPTIONS)
    return 64, 64, dict(num_warps=4 if d == 64 else 8, num_stages=1 if sulq else 2, **GPU_OPTIONS)


#: the longest sequence the one-pass attention kernels take: its keys fill one ``pow2(L)``-wide tile (ViT / DeiT at
#: 224 px: 197 tokens in 256; Swin windows: 49 in 64); longer ones (ViT at 384 px, 577 tokens) run two passes
ONE_PASS_MAX_L = 256
#: whether SULQ probabilities take the one-pass kernel too. Off: static sm_90 counts at ViT-B (``bench.sass_count``)
#: give its best spill-free tile 4.4 warp-instructions per score against 3.0 for the two-pass SULQ kernel (whose
#: 64-key tiles keep the fp16 split ``P V`` small); the uniform one-pass kernel issues 1.04 against 1.42
ONE_PASS_SULQ = False


def attention_one_pass(l: int, sulq: bool = False) -> bool:
    """Whether :mod:`kernels.quant_attention_one_pass` runs a sequence of ``l`` tokens (else the two-pass kernels)."""
    return l <= ONE_PASS_MAX_L and (ONE_PASS_SULQ or not sulq)


def one_pass_config(l: int, d: int, target: Target, biased: bool = False, sulq: bool = False) -> Tuple[int, int, dict]:
    """``(BLOCK_M, BLOCK_N, options)`` of the one-pass attention kernels: ``BLOCK_N = pow2(l)`` (at least 32, an int8
    dot's reduction); nothing loops, so one stage. The ``[BM, BN]`` score, exponential and code tiles live at once.
    A window (``BN <= 64``) takes 64 query rows on one warpgroup (two at head dim 128). A longer row (128 or 256
    keys): on sm_90 at head dim <= 64, 64 rows on one warpgroup (wgmma's M; 254 registers, no spill; 1.04
    warp-instructions per score at ViT-B's 197 x 64 against 1.87 on two warpgroups, which exchange the row
    statistics through shared memory); 32 rows on one warpgroup on sm_80 (64 rows spill 180-460 bytes there), on two
    at head dim 128 (64 rows spill on sm_90; one warpgroup spills 4 bytes on sm_80 under Triton 3.6); SULQ 32 rows on
    two warpgroups (its fp16 split ``P V`` spills at 64 rows, and at
    32 rows on one). Chosen by compiling every launch (``kernels.gpu_compile``) and counting (``bench.sass_count``),
    to be re-picked from ``bench.gpu``."""
    bn = pow2(l, 32, ONE_PASS_MAX_L)
    if target.interpreted:
        return 64, bn, {}
    if bn <= 64:
        return 64, bn, dict(num_warps=8 if d >= 128 else 4, num_stages=1, **GPU_OPTIONS)
    if sulq:
        return 32, bn, dict(num_warps=8, num_stages=1, **GPU_OPTIONS)
    bm = 64 if target.arch >= 90 and d <= 64 else 32
    return bm, bn, dict(num_warps=8 if d >= 128 else 4, num_stages=1, **GPU_OPTIONS)


# ---------------------------------------------------------------------------------------------- elementwise


def elementwise_blocks(c: int, target: Target) -> Tuple[int, int, dict]:
    """``(BLOCK_M, BLOCK_C, options)`` of the row-tiled elementwise kernels (quantize, fake-quant)."""
    if target.interpreted:
        bc = pow2(c, 16, 1024)
        return max(1, 4096 // bc), bc, {}
    bc = pow2(c, 16, 256)
    return max(1, 2048 // bc), bc, dict(num_warps=4, **GPU_OPTIONS)


def fake_quantize_bwd_blocks(c: int, target: Target) -> Tuple[int, int, dict]:
    """The tiles of :func:`elementwise_blocks` on 8 warps: the backward keeps about three times the forward's live
    values per element (16 elements per thread on 4 warps spill 4-8 bytes under ptxas 12.9, Triton 3.8)."""
    bm, bc, opts = elementwise_blocks(c, target)
    return bm, bc, ({**opts, "num_warps": 8} if opts else opts)


#: LayerNorm-quantize and rescale-quantize: 16 contiguous columns per thread, the width of one 16-byte int8 store
#: (loads: 16-byte vectors, 2 per row for fp16, 4 for fp32); one thread's share of a row ``(BM, BC)`` tile
ROW_VECTOR = 16
#: row-tile programs per SM that a persistent rescale-quantize grid aims at (4 warps each: 32 warps per SM)
QUANTIZE_PROGRAMS_PER_SM = 8

#: LayerNorm-quantize tiles ``(BLOCK_M, BLOCK_C, CHUNKS, num_warps)`` at C = 768 that ``bench.gpu`` times beside
#: :func:`layernorm_blocks`'s, so a GPU run decides: the former layout (one 1024-wide tile, 2 rows on 4 warps), the
#: shipped one (8 rows of 3 x 256 on 4 warps), 8 values per vector (4 rows: a warp per row), two rows per thread,
#: 8 warps, two 512-wide chunks (a warp per row, padded to 1024); every one compile-checked
#: (:func:`kernels.gpu_compile.dispatcher_launches`)
LAYERNORM_SWEEP = ((2, 1024, 1, 4), (8, 256, 3, 4), (4, 256, 3, 4), (16, 256, 3, 4), (16, 256, 3, 8),
                   (8, 512, 2, 8), (2, 256, 3, 1))
#: rescale-quantize tiles ``(BLOCK_M, BLOCK_C, num_warps, STAGES, persistent)`` at C = 768 timed the same way: the
#: former layout (8 rows, a program per tile, unpipelined), the shipped fp16 one (16 rows, persistent, 3 stages),
#: and the persistent grid unpipelined, on 2 stages, with 8 and 32 rows, on 8 warps
QUANTIZE_SWEEP = ((8, 256, 4, 1, False), (16, 256, 4, 3, True), (16, 256, 4, 1, True), (16, 256, 4, 2, True),
                  (8, 256, 4, 3, True), (32, 256, 4, 3, True), (32, 256, 8, 3, True), (16, 256, 4, 1, False))


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def layernorm_chunks(c: int) -> Tuple[int, int]:
    """``(CHUNKS, BLOCK_C)`` of a LayerNorm row of ``c`` columns: the fewest padded columns ``CHUNKS * BLOCK_C``
    (``BLOCK_C`` a power of two, at most 4 chunks: ``3 * 2^k`` takes 3 and no padding), then a chunk within one
    warp (``BLOCK_C <= 32 * 16``: shuffle-only row sums), then the fewest chunks (registers per thread).
    ``BLOCK_C >= 32``: a row on one thread (C = 48 in 3 x 16) spills with the rescale on sm_80."""
    cands = [(n, pow2(cdiv(c, n), 2 * ROW_VECTOR)) for n in (1, 2, 3, 4)]
    return min(cands, key=lambda t: (t[0] * t[1], t[1] > 32 * ROW_VECTOR, t[0]))


def layernorm_blocks(c: int, target: Target, m: int = 1 << 30) -> Tuple[int, int, int, dict]:
    """``(BLOCK_M, BLOCK_C, CHUNKS, options)`` of the LayerNorm-quantize kernel for ``m`` rows of ``c`` columns.

    A row is ``CHUNKS`` chunks of ``BLOCK_C`` (:func:`layernorm_chunks`: ViT-B's 768 = 3 x 256, no padding where
    the former single ``pow2(C)`` tile padded to 1024 and computed a quarter of its lanes for nothing), each thread
    16 contiguous columns of each chunk (16-byte int8 stores, 16-byte loads), ``BLOCK_C / 16`` threads per row (16
    at C = 768: 48 values per thread), one row per thread: ``BLOCK_M = 512 W / BLOCK_C`` on ``W`` warps (8 rows of
    768 on 4 warps). Row sums: shuffles only (``BLOCK_C <= 512``); the per-column vectors are loaded in the row
    tile's layout, so nothing crosses threads through shared memory (the former kernel spent 19 barriers on them).
    4 warps, halved (down to one row's) while the grid has fewer programs than SMs (batch 1, M = 197: 99 one-warp
    programs instead of 25; the per-thread work is the same). Chosen from static sm_90 SASS at ViT-B batch 64, fp16
    in (``python -m bench.sass_count``; ~27 instructions per element is where an H100 stops being memory-bound):
    21.3 instructions per element, no barrier, 72 registers on sm_90 and sm_80 (the former layout: 32.7, 19
    barriers; the same tile in this kernel: 30.5); 8 rows per program rather than 4 (8 values per vector: 23.8,
    the row's fixed costs over half the values) or 16 (two rows per thread: registers for no fewer instructions);
    with ``r``, ``shift``: 29.5 (was 58.8), 115-123 registers; the residual-fused kernel, float32: 26.0 for 13 bytes
    per element. ``bench.gpu`` times :data:`LAYERNORM_SWEEP` beside it."""
    chunks, bc = layernorm_chunks(c)
    if target.interpreted:
        return _pow2_floor(max(1, min(64, 8192 // (chunks * bc)))), bc, chunks, {}
    row_warps = cdiv(bc, 32 * ROW_VECTOR)  # warps one row takes (past BLOCK_C = 512)
    warps = max(4, row_warps)
    while warps > row_warps and cdiv(m, 32 * ROW_VECTOR * warps // bc) < target.num_sms:
        warps //= 2
    return max(1, 32 * ROW_VECTOR * warps // bc), bc, chunks, dict(num_warps=warps, **GPU_OPTIONS)


def quantize_blocks(c: int, m: int, target: Target, itemsize: int = 4) -> Tuple[int, int, int, int, dict]:
    """``(BLOCK_M, BLOCK_C, programs along the rows, STAGES, options)`` of the rescale-quantize kernel for ``m`` rows
    of ``c`` columns of ``itemsize``-byte floats.

    ``BLOCK_C``: the largest power of two dividing ``c``, at most 256 (768 = 3 x 256: no column masks), or
    ``pow2(c)`` (masked) where that is below 16; 16 columns per thread, 2 rows per thread for 2-byte inputs, 1 for
    float32 (an 8 KiB tile: ``BLOCK_M = 16`` rows of 256 on 4 warps). The grid is persistent along the rows:
    ``shift``, ``r`` and its reciprocal (a Newton-refined ``MUFU.RCP`` per column) once per program, then the same
    number of row tiles in every program (:data:`QUANTIZE_PROGRAMS_PER_SM` programs per SM); the row loop is
    pipelined over 3 stages (two tiles in flight per program through ``cp.async``: unpipelined, ptxas issues a
    thread's four loads one after another between the arithmetic). Few rows (batch 1): one row per thread, then
    fewer warps, until the tiles cover the SMs. Static sm_90 SASS at ViT-B batch 64, fp16 in: 10.7 instructions per
    element in the loop (12.4 with the prologue over the 3 tiles a program takes), 14.7 with ``r``, ``shift`` (17.3;
    the former layout: 13.5 and 23.0 with 11 barriers per tile), 31 and 80 registers on sm_90 (32 and 80 on sm_80).
    ``bench.gpu`` times :data:`QUANTIZE_SWEEP` beside it."""
    bc = min(256, c & -c) if c > 0 else ROW_VECTOR
    if bc < ROW_VECTOR:
        bc = pow2(c, ROW_VECTOR, 256)
    nc = cdiv(c, bc)
    per_warp = max(1, 32 * ROW_VECTOR // bc)
    if target.interpreted:
        bm = _pow2_floor(max(1, 4096 // bc))
        return bm, bc, min(2, cdiv(m, bm)), 1, {}
    rows, warps = (2 if itemsize <= 2 else 1), 4
    while cdiv(m, per_warp * warps * rows) * nc < target.num_sms and rows * warps > 1:
        if rows > 1:
            rows //= 2
        else:
            warps //= 2
    bm = per_warp * warps * rows
    return bm, bc, quantize_programs(m, bm, nc, target), 3, dict(num_warps=warps, **GPU_OPTIONS)


def quantize_programs(m: int, block_m: int, col_blocks: int, target: Target) -> int:
    """Programs along the rows of a persistent rescale-quantize grid: each takes ``ceil(tiles x col_blocks / (SMs x
    QUANTIZE_PROGRAMS_PER_SM))`` row tiles."""
    tiles = cdiv(m, block_m)
    return cdiv(tiles, cdiv(tiles * col_blocks, target.num_sms * QUANTIZE_PROGRAMS_PER_SM))


# ---------------------------------------------------------------------------------------------- table writer


def table_rows(num_sms: int = 132) -> dict:
    """``{(fmt, M bucket, N, K): GemmConfig}`` by :func:`gemm_rule` for every literature shape (the rule at the
    smallest M of the bucket that the models run, so batch 1 fills the machine)."""
    smallest = {}
    for m, n, k in gemm_problems():
        key = (m_bucket(m), n, k)
        smallest[key] = min(m, smallest.get(key, m))
    rows = {}
    for (bucket, n, k), m in sorted(smallest.items()):
        for fmt in ("2bit", "int3", "int4", "int8"):
            rows[(fmt, bucket, n, k)] = gemm_rule(m, n, k, num_sms)
    return rows


def write_table(path: str, source: Optional[str] = None) -> None:
    """Write :mod:`kernels.gemm_table` (atomically): the rows already in the table (the H100-timed ones among them)
    kept, every other literature problem from :func:`table_rows`; ``source`` replaces the docstring's account of
    where the rows come from (kept when ``None``)."""
    import textwrap
    rows = {key: GemmConfig(*row) for key, row in gemm_table.SM90.items()}
    for key, cfg in table_rows().items():
        rows.setdefault(key, cfg)
    if source is None:
        doc = gemm_table.__doc__.strip().splitlines()
    else:
        text = (f"Source of the rows: {source}. Keys ``(format, M bucket, N, K)``; values ``(BLOCK_M, BLOCK_N, "
                "BLOCK_K, num_warps, num_stages, GROUP_M)``. Every row is compiled and checked by "
                "tests/kernels/test_compile_gpu.py.")
        doc = ["Packed-GEMM launch table for sm_90 (H100, 132 SMs), generated by ``python -m kernels.configs``.", "",
               *textwrap.wrap(text, 116)]
    doc = ['"""' + doc[0], *doc[1:]]
    doc[-1] += '"""'
    lines = [*doc, "", "SM90 = {"]
    for (fmt, b, n, k), c in rows.items():
        lines.append(f"    ({fmt!r}, {b}, {n}, {k}): ({c.block_m}, {c.block_n}, {c.block_k}, {c.num_warps}, "
                     f"{c.num_stages}, {c.group_m}),")
    lines.append("}")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    write_table(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemm_table.py"))
