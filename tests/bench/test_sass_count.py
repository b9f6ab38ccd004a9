"""``python -m bench.sass_count`` on CPU (compiled for sm_90 in a subprocess without the interpreter): the
element-wise quantize kernels keep IEEE division out of their per-element path; a GEMM K step on centred weight
codes has no activation reduction and issues fewer instructions than its tensor-core cycles, on the pointer-load
kernel and (with TMA loads) on the persistent kernel."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quantize_kernels_have_no_per_element_division(tmp_path):
    path = tmp_path / "sass.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-m", "bench.sass_count", "--json", str(path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| layernorm_quantize a4" in r.stdout
    rows = {row["kernel"]: row for row in json.loads(path.read_text())}
    for name in ("rescale_quantize a4", "layernorm_quantize a4 (deployed: folded affine)"):
        row = rows[name]
        # one out-of-line slow-path call per reciprocal (1 / s, 1 / std) and sqrt; a per-element div_rn would add
        # one per element a thread holds (16 here)
        assert row["call"] <= 3, row
        assert 0 < row["per_element"] < 35, row
    gemm = {row["kernel"]: row for row in rows.values() if "loop" in row}
    assert len(gemm) == 10 and sum(", TMA" in name for name in gemm) == 5
    for name, row in gemm.items():
        if name.endswith(", TMA"):  # 128x256x128 on two warpgroups: eight m64n256k32 IGMMA, two TMA boxes
            assert row["mma"] == 8 and row["tma"] == 2, row
        elif "TMA" in name:  # 128x128x128: four m64n128k32 IGMMA per warpgroup
            assert row["mma"] == 4 and row["tma"] == 2 and "uncentred" in name, row
        else:  # 64x128x128 int8 tile: four m64n128k32 IGMMA, pointer loads
            assert row["mma"] == 4 and row["tma"] == 0, row
        if "uncentred" not in name:
            assert row["shfl"] == 0 and row["issue_cycles"] < 0.7 * row["tensor_cycles"], row
        else:  # the row sums of 8-bit weights: the reduction is there, and costs more issue than the MMAs
            assert row["shfl"] > 0 and row["issue_cycles"] > row["tensor_cycles"], row
    tma = [row for name, row in gemm.items() if name.endswith(", TMA")]
    assert all(row["issue_cycles"] < 0.5 * row["tensor_cycles"] for row in tma), tma  # 344-356 of 1,024
    att = rows["quant_attention a8 fused, two passes: key loops"]["per_score"]
    assert len(att) == 2 and 0 < att[0] + att[1] < 35, att  # 62.2 before the MMA zero-point terms (27.2 after)
    one = rows["quant_attention a8 fused, one pass: per score"]["warp_instructions_per_score"]
    two = rows["quant_attention a8 fused, two passes: per score"]["warp_instructions_per_score"]
    assert 0 < one < 0.85 * two, (one, two)  # one Q K^T and one exponential per score, not two (1.04 vs 1.42)


def test_refuses_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "bench.sass_count"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: TRITON_INTERPRET=1")
