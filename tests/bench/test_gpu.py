"""``python -m bench.gpu``: the dry mode (CPU, interpreter, tiny shapes) runs every section end to end, and the
report logic (ratios, targets, failed checks, errors) is checked on hand-made rows."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu
from kernels import configs as C

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, cwd=ROOT):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "bench.gpu", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_dry_run_writes_every_section(tmp_path):
    p = _run("--dry", "--out", str(tmp_path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["errors"] == {} and res["env"]["dry"] is True
    names = [c["name"] for c in res["checks"]]
    assert all(c["ok"] for c in res["checks"]), [c for c in res["checks"] if not c["ok"]]
    for part in ("rescale_quantize", "layernorm_quantize", "fake_quantize grad s", "fake_quantize_weight",
                 "integer accumulator", "requant codes", "attention uniform", "attention SULQ"):
        assert any(part in n for n in names), part
    for fmt in gpu.GEMM_FORMATS:
        assert any(n.startswith(f"packed GEMM {fmt} ") for n in names), fmt
    sections = {r["section"] for r in res["rows"]}
    assert sections == {"gemm", "quantize", "attention", "model", "optim"}
    gemm = [r for r in res["rows"] if r["section"] == "gemm" and not r["impl"].startswith("baseline")]
    dispatched = {r["impl"] for r in gemm if " " not in r["impl"]}
    assert dispatched == set(gpu.GEMM_FORMATS)
    # the int8 GEMM on the pointer-load kernel and on every TMA tile side by side (at the dry run's 3 rows only
    # W8A8's weight is int8: the packed ones run fused), each output checked equal to the pointer-load kernel's
    tiles = {f"W8A8 TMA {c.block_m}x{c.block_n}x{c.block_k} s{c.num_stages} e{c.epi_split}" for c in C.TMA_CANDIDATES
             if c.block_n <= 128}
    assert {r["impl"] for r in gemm} - dispatched == {"W8A8 pointer-load"} | tiles
    assert all(r["ms"] > 0 and r["ratio"]["fp16 matmul"] > 0 for r in gemm)
    sweep = [r["impl"] for r in res["rows"] if r["impl"].startswith("layernorm_quantize BM=")]
    assert sweep == [f"layernorm_quantize BM={m} BC={c}x{n} w={w}" for m, c, n, w in C.LAYERNORM_SWEEP[:2]]
    assert C.LAYERNORM_SWEEP[0] == (2, 1024, 1, 4)  # the former layout, timed beside the new ones
    sweep = [r["impl"] for r in res["rows"] if r["impl"].startswith("rescale_quantize BM=")]
    assert sweep == [f"rescale_quantize BM={m} BC={c} w={w} s={st}{' persistent' if p else ''}"
                     for m, c, w, st, p in C.QUANTIZE_SWEEP[:2]]
    assert C.QUANTIZE_SWEEP[0] == (8, 256, 4, 1, False)
    quantize = {r["impl"] for r in res["rows"] if r["section"] == "quantize"}
    assert {"add_layernorm_quantize", "x + delta, then layernorm_quantize", "rescale_quantize"} <= quantize
    for part in ("add_layernorm_quantize = x + delta, then layernorm_quantize", "layernorm_quantize exact-sum rows",
                 "add_layernorm_quantize exact-sum rows bfloat16"):
        assert any(n.startswith(part) for n in names), part
    sweep = [r["impl"] for r in res["rows"] if r["impl"].startswith("quant_attention a8 fused BM=")]
    assert sweep == [f"quant_attention a8 fused BM={m} BN={n} w={w} s={st}"
                     for m, n, w, st in gpu.ATTENTION_CONFIGS[:2]]
    att = {r["impl"] for r in res["rows"] if r["section"] == "attention"}
    assert {"quant_attention a8 fused", "quant_attention a8 fused two-pass", "quant_attention sulq a4 fused",
            "quant_attention sulq a4 fused one-pass"} <= att  # one pass and two side by side, so one run decides
    assert any(c["name"].startswith("attention one-pass = two-pass") for c in res["checks"])
    models = {(r["case"].split()[0], r["impl"]) for r in res["rows"] if r["section"] == "model"}
    assert {m for m, _ in models} == {"vit_b", "swin_t"}
    assert {i for _, i in models} >= {"baseline timm fp16 eager", "W4A4 eager", "W1.58A8 eager",
                                      "W4A4 eager pointer-load GEMM"}
    optim = [r for r in res["rows"] if r["section"] == "optim"]
    assert [r["impl"] for r in optim] == ["fp32", "fp32 --no-cuda-graph", "bf16 autocast"]
    assert all(r["rate"] > 0 for r in optim)
    prof = res["extra"]["optim_profile"]
    assert any(r["name"] == "lowbit::fake_quantize_bwd" and r["calls"] > 0 for r in prof["by_cpu"])
    assert "optimiser profile" in (tmp_path / "RESULTS.md").read_text()
    counts = res["extra"]["optim_counts"]["e2e"]["triton_path"]
    assert counts["syncs"] == 0 and counts["launches_total"] > 0, counts
    assert "## optimiser step: host cost" in (tmp_path / "RESULTS.md").read_text()
    assert len(res["targets"]) == len(gpu.TARGETS)
    md = (tmp_path / "RESULTS.md").read_text()
    for head in ("## Checks", "## Targets", "## gemm", "## quantize", "## attention", "## model", "## optim"):
        assert head in md
    assert not list(tmp_path.glob("*.tmp"))


def test_dry_quick_run_keeps_the_headline_sections(tmp_path):
    p = _run("--dry", "--quick", "--out", str(tmp_path), "--sections", "checks,optim")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["env"]["quick"] is True and res["errors"] == {} and all(c["ok"] for c in res["checks"])
    assert [r["impl"] for r in res["rows"] if r["section"] == "optim"] == ["fp32", "fp32 --no-cuda-graph"]


@pytest.mark.parametrize("args,msg", [(["--dry", "--sections", "checks,bogus"], "unknown section(s) bogus"),
                                      (["--dry", "--out", "no/such/folder"], "is not a folder")])
def test_bad_arguments(tmp_path, args, msg):
    p = _run(*args, cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(tmp_path):
    p = _run("--out", str(tmp_path), "--sections", "checks")
    assert p.returncode == 2 and p.stderr.strip().startswith("error: no CUDA device")
    assert not (tmp_path / "results.json").exists()


def test_failed_checks_and_targets_are_reported():
    b = gpu.Bench(dry=True)
    ref = torch.tensor([3, 4, 5, 6], dtype=torch.int8)
    gpu._tie_check(b, "exact", ref.clone(), ref, torch.tensor([3.2, 4.1, 4.7, 6.0]))
    gpu._tie_check(b, "tie flip", torch.tensor([3, 5, 5, 6], dtype=torch.int8), ref, torch.tensor([3.2, 4.5, 4.7, 6.0]))
    gpu._tie_check(b, "wrong code", torch.tensor([3, 5, 5, 6], dtype=torch.int8), ref,
                   torch.tensor([3.2, 4.1, 4.7, 6.0]))
    assert [c["ok"] for c in b.checks] == [True, False, False]  # one tie flip in 4 codes is over the 1% allowance
    big = torch.arange(1000) % 100
    flips = big.clone()
    flips[0] += 1
    gpu._tie_check(b, "one flip in 1000", flips.to(torch.int8), big.to(torch.int8), big.double() + 0.5)
    assert b.checks[-1]["ok"]

    rows = [dict(section="gemm", case="M=12608 K=768 N=768", impl="baseline fp16 matmul", ms=2.0, rate=1, unit=""),
            dict(section="gemm", case="M=12608 K=768 N=768", impl="baseline torch._int_mm", ms=1.0, rate=1, unit=""),
            dict(section="gemm", case="M=12608 K=768 N=768", impl="W4A4", ms=1.0, rate=1, unit=""),
            dict(section="gemm", case="M=12608 K=768 N=768", impl="W3A3", ms=1.6, rate=1, unit=""),
            dict(section="model", case="vit_b batch 64", impl="baseline timm fp16 eager", ms=30.0, rate=1, unit=""),
            dict(section="model", case="vit_b batch 64", impl="W4A4 eager", ms=25.0, rate=1, unit=""),
            dict(section="model", case="vit_b batch 64", impl="W4A4 compiled", ms=15.0, rate=1, unit="")]
    gpu._ratios(rows)
    assert rows[2]["ratio"] == {"fp16 matmul": 2.0, "torch._int_mm": 1.0}
    t = {x["target"]: x for x in gpu._targets(rows)}
    vs_fp16 = t["packed GEMM batch 64 vs fp16 matmul"]
    assert vs_fp16["got"] == pytest.approx(1.25) and not vs_fp16["ok"] and "W3A3" in vs_fp16["detail"]
    assert t["ViT-B W4A4 batch 64 vs timm fp16 eager"]["got"] == pytest.approx(2.0)  # the best deployment
    assert t["ViT-B W4A4 batch 64 vs timm fp16 eager"]["ok"]
    assert t["packed GEMM batch 1 vs fp16 matmul"]["got"] is None and not t["packed GEMM batch 1 vs fp16 matmul"]["ok"]
    b.errors["models"] = "Traceback ...\nRuntimeError: boom\n"
    md = gpu.markdown(dict(env={"gpu": "x"}, checks=b.checks, targets=list(t.values()), rows=rows, errors=b.errors))
    assert "**FAIL**" in md and "RuntimeError: boom" in md and "| 1.25x |" in md
