"""Every Triton kernel, in every launch configuration the dispatcher can choose, compiled for real GPUs on this
CPU-only machine (``triton.compile`` for sm_90 / H100 and sm_80 / A100, then ``ptxas -v``) and checked: it
compiles, every ``tl.dot`` became tensor-core code (``wgmma`` / ``mma.sync``), zero spill bytes, shared memory
within the target's per-block limit.

The launches are :func:`kernels.gpu_compile.dispatcher_launches` (the literature models' and the demo's shapes at
batch 1, 8, 64, every GEMM table row and autotune candidate, every constexpr variant), made by the same
``kernels.library`` builders the ops call. CI compiles one launch per structural key (same tiles, layouts, pipeline
and constexpr flags; launches that differ only in a quantizer's level count or an integer's divisibility share
one representative); ``LOWBIT_COMPILE_ALL=1`` compiles every distinct launch. The compiler runs in a subprocess
with ``TRITON_INTERPRET=0`` (under the interpreter ``@triton.jit`` makes objects that cannot be compiled), started
in the background when collection ends (:mod:`tests.kernels._compile_run`), so it overlaps the rest of the suite.
"""
import json
import os
import subprocess
import sys

import pytest

from kernels import configs as C

from . import _compile_run

ARCHS = _compile_run.ARCHS
ROOT = _compile_run.ROOT


def _python(args, timeout=1200):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    return r


@pytest.fixture(scope="module")
def reports():
    pytest.importorskip("triton.backends.nvidia.compiler")
    out, log = _compile_run.finish()  # (started in the background when the suite's collection ended)
    print(log[-4000:])
    assert os.path.exists(out), f"the compile run wrote no reports:\n{log[-5000:]}"
    with open(out) as f:
        reps = json.load(f)
    return {a: [x for x in reps if x["arch"] == a] for a in ARCHS}


def _failures(reps):
    from kernels.gpu_compile import CompileReport, check
    return [e for x in reps for e in check(CompileReport(**x))]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_launch_compiles_to_tensor_cores_without_spills(reports, arch):
    errors = _failures(reports[arch])
    assert not errors, f"{len(errors)} of {len(reports[arch])} launches fail on sm_{arch}:\n" + "\n".join(errors)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_format_and_variant_is_covered(reports, arch):
    reps = reports[arch]
    assert {x["name"] for x in reps} == {
        "packed_gemm_kernel", "quant_attention_kernel", "quant_attention_sulq_kernel", "quant_attention_one_pass_kernel",
        "quant_attention_sulq_one_pass_kernel", "rescale_quantize_kernel", "layernorm_quantize_kernel",
        "fake_quantize_fwd_kernel", "fake_quantize_bwd_kernel", "unpack_codes_kernel"} | (
        {"int8_gemm_tma_kernel"} if arch == 90 else set())
    tma = [x for x in reps if x["name"] == "int8_gemm_tma_kernel"]
    assert all(x["tma"] and x["wgmma"] and x["dots"] >= 1 for x in tma), "a TMA GEMM without bulk copies / wgmma"
    assert not any(x["tma"] for x in reps if x["name"] != "int8_gemm_tma_kernel")
    for flag in ("HAS_BIAS", "GELU", "REQUANT", "RQ_PER_COL", "W_CENTERED", "HAS_RES"):
        assert arch != 90 or {f"{flag}=True" in x["config"] for x in tma} == {True, False}, flag
    assert arch != 90 or {x["config"].split("EPI_SPLIT=")[1].split(",")[0] for x in tma} == {
        str(c.epi_split) for c in C.TMA_CANDIDATES}
    unpacks = [x["config"] for x in reps if x["name"] == "unpack_codes_kernel"]
    assert {c.split("LOAD_W=")[1].split(",")[0] for c in unpacks} == {"load_2bit", "load_int3", "load_int4"}
    gemm = [x["config"] for x in reps if x["name"] == "packed_gemm_kernel"]
    assert {c.split("LOAD_W=")[1].split(",")[0] for c in gemm} == {"load_2bit", "load_int3", "load_int4", "load_int8"}
    for flag in ("HAS_BIAS", "GELU", "REQUANT", "W_CENTERED", "HAS_RES"):
        assert {f"{flag}=True" in c for c in gemm} == {True, False}, flag
    attn = [x["config"] for x in reps if x["name"].startswith("quant_attention")]
    for d in (32, 64, 128):
        assert any(f"D={d}," in c for c in attn), d
    assert any("HAS_BIAS=True, HAS_MASK=True" in c for c in attn)
    for name in ("quant_attention_sulq_kernel", "quant_attention_sulq_one_pass_kernel"):  # the 257-level grid too
        assert any("P_QMAX=256," in x["config"] for x in reps if x["name"] == name), name
    two = [x["config"] for x in reps if x["name"] == "quant_attention_kernel"]
    assert any("BLOCK_N=64," in c for c in two) and {"BLOCK_N=256," in c for c in attn} == {True, False}
    ln = [x["config"] for x in reps if x["name"] == "layernorm_quantize_kernel"]
    for flag in ("RESIDUAL", "HAS_LNW", "HAS_R", "EVEN_C"):
        assert {f"{flag}=True" in c for c in ln} == {True, False}, flag
    assert {c.split("CHUNKS=")[1].split(",")[0] for c in ln} == {"1", "2", "3", "4"}
    assert any("RESIDUAL=True" in c and "xn_ptr:bfloat16" in c for c in ln)  # the bf16 rounding of x + delta
    if arch == 90:  # the former layout, in bench.gpu's sweep (compiled for sm_90, where bench.gpu runs)
        assert any("BLOCK_M=2, BLOCK_C=1024, CHUNKS=1," in c for c in ln)
    rq = [x["config"] for x in reps if x["name"] == "rescale_quantize_kernel"]
    for flag in ("HAS_R", "EVEN_C"):
        assert {f"{flag}=True" in c for c in rq} == {True, False}, flag
    assert {c.split("STAGES=")[1].split(";")[0] for c in rq} == ({"1", "2", "3"} if arch == 90 else {"3"})  # (sweep)
    dots = [x for x in reps if x["name"] in ("packed_gemm_kernel", "quant_attention_kernel",
                                             "quant_attention_sulq_kernel", "quant_attention_one_pass_kernel",
                                             "quant_attention_sulq_one_pass_kernel")]
    assert all(x["dots"] >= 1 for x in dots), "a GEMM / attention kernel compiled without any tl.dot"


BAD = """
from kernels import configs as C, gpu_compile as G
t = C.Target(interpreted=False, arch=90)
spill = G.gemm_launch("int4", 4096, 4096, 4096, t, C.GemmConfig(256, 256, 128, 4, 3))
nodim = G.attention_launch(1, 2, 64, 16, t)
notma = G.gemm_launch("int8", 4096, 768, 768, C.Target(interpreted=False, arch=80), C.TMA_CANDIDATES[1])
print("SPILL", G.check(G.compile_launch(spill, 90)))
print("NODIM", G.check(G.compile_launch(nodim, 90)))
print("NOTMA", G.check(G.compile_launch(notma, 80)))
"""


def test_the_checks_can_fail():
    """A 256x256 int32 accumulator on 4 warps is reported as spilling; head dim 16 (an int8 dot reducing over 16)
    as not compiling; the TMA GEMM compiled for sm_80 (no TMA there: plain loads) as lacking TMA: the checks above
    are not vacuous."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    r = _python(["-c", BAD], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("SPILL", "NODIM", "NOTMA")))
    assert "spills" in lines["SPILL"], lines
    assert "does not compile" in lines["NODIM"], lines
    assert "without TMA loads" in lines["NOTMA"], lines
