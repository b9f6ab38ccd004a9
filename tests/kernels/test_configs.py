"""Launch configurations (kernels.configs): the H100 table covers every literature shape, batch 1 fills the SMs,
shapes outside the table autotune on sm_90 and take the rule elsewhere."""
import triton

from kernels import configs as C
from kernels import gemm_table
from kernels.shapes import MODELS, gemm_problems

H100 = C.Target(interpreted=False, arch=90)


def test_table_covers_every_literature_problem_with_checked_configs():
    for m, n, k in gemm_problems():
        for fmt in ("2bit", "int3", "int4", "int8"):
            cfg = C.gemm_config(fmt, m, n, k, H100)
            assert cfg is not None, (fmt, m, n, k)
    assert {C.GemmConfig(*row) for row in gemm_table.SM90.values()} <= set(C.GEMM_CANDIDATES) | set(C.SWEEP_TILES)


def test_rule_fills_the_h100_at_batch_one():
    """ViT-B at batch 1 (M = 197): the rule's grid gives each of the 132 SMs a tile, or uses the smallest tile."""
    vit_b = MODELS["vit_b"]
    for k, n in vit_b.linears[1:-1]:
        cfg = C.gemm_rule(197, n, k)
        tiles = triton.cdiv(197, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        assert tiles >= 132 or cfg == C.GEMM_CANDIDATES[0], (k, n, cfg, tiles)
    big = C.gemm_rule(197 * 64, 3072, 768)
    assert big.block_m * big.block_n >= 64 * 128  # large batches keep large tiles


def test_vit_b_rows_are_the_fastest_timed_tiles():
    """The sm_90 table's ViT-B rows are the fastest tile of the H100 sweep (bench/gemm_sweep_h100.json) among
    :data:`kernels.configs.SWEEP_TILES`, for every format and M bucket."""
    import json
    from pathlib import Path
    rows = json.loads((Path(__file__).resolve().parents[2] / "bench" / "gemm_sweep_h100.json").read_text())
    allowed = set(C.SWEEP_TILES) | set(C.GEMM_CANDIDATES)
    best = {}
    for r in rows:
        cfg = C.GemmConfig(*r["cfg"]) if "cfg" in r else None
        if r["ph"] == "B" and "ms" in r and r["same"] and cfg in allowed:
            key = (r["fmt"], C.m_bucket(r["m"]), r["n"], r["k"])
            if key not in best or r["ms"] < best[key][0]:
                best[key] = (r["ms"], cfg)
    assert len(best) == 48
    for key, (_, cfg) in best.items():
        assert C.GemmConfig(*gemm_table.SM90[key]) == cfg, key


def test_unknown_shapes_autotune_on_h100_and_use_the_rule_elsewhere():
    assert C.gemm_config("int4", 300, 1234, 4321, H100) is None
    a100 = C.Target(interpreted=False, arch=80, num_sms=108)
    assert C.gemm_config("int4", 300, 1234, 4321, a100) == C.gemm_rule(300, 1234, 4321, 108)
    assert C.gemm_config("int4", 300, 1234, 4321, C.Target(interpreted=True)).num_stages == 1


def test_attention_tiles_shrink_with_bias_and_head_dim():
    plain = C.attention_config(197, 64, H100)
    swin = C.attention_config(49, 32, H100, biased=True)
    wide = C.attention_config(49, 128, H100, biased=True)
    assert plain[:2] == (64, 64) and swin[:2] == (32, 32) and wide[:2] == (16, 32)
    assert all(o[2]["enable_fp_fusion"] is False for o in (plain, swin, wide))
    sulq = C.attention_config(197, 64, H100, sulq=True)
    assert sulq[:2] == plain[:2] and sulq[2]["num_stages"] == 1 and plain[2]["num_stages"] == 2
    assert C.attention_config(197, 64, C.Target(interpreted=False, arch=80), sulq=True)[2]["num_stages"] == 1
    assert C.attention_config(49, 32, H100, biased=True, sulq=True)[2]["maxnreg"] == 168


def test_mlp_shapes_are_the_models_fc1():
    from kernels.shapes import MODELS, mlp_shapes
    assert all(set(m.mlp) <= set(m.linears) and m.mlp for m in MODELS.values())
    assert (768, 3072) in mlp_shapes() and (96, 384) in mlp_shapes() and (768, 1000) not in mlp_shapes()


def test_regenerating_the_table_keeps_its_rows(tmp_path):
    """``python -m kernels.configs`` (``write_table``) keeps the H100-timed rows and the docstring."""
    import importlib.util
    out = tmp_path / "table.py"
    C.write_table(str(out))
    spec = importlib.util.spec_from_file_location("regenerated", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.SM90 == gemm_table.SM90 and mod.__doc__ == gemm_table.__doc__
