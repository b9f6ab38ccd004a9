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
    assert {C.GemmConfig(*row) for row in gemm_table.SM90.values()} <= set(C.GEMM_CANDIDATES)


def test_batch_one_fills_the_h100():
    """ViT-B at batch 1 (M = 197): every linear's grid gives each of the 132 SMs a tile, or uses the smallest."""
    vit_b = MODELS["vit_b"]
    for k, n in vit_b.linears[1:-1]:
        cfg = C.gemm_config("int4", 197, n, k, H100)
        tiles = triton.cdiv(197, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        assert tiles >= 132 or cfg == C.GEMM_CANDIDATES[0], (k, n, cfg, tiles)
    big = C.gemm_config("int4", 197 * 64, 3072, 768, H100)
    assert big.block_m * big.block_n >= 64 * 128  # large batches keep large tiles


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
    assert C.attention_config(197, 64, C.Target(interpreted=False, arch=80), sulq=True)[2]["num_stages"] == 2


def test_mlp_shapes_are_the_models_fc1():
    from kernels.shapes import MODELS, mlp_shapes
    assert all(set(m.mlp) <= set(m.linears) and m.mlp for m in MODELS.values())
    assert (768, 3072) in mlp_shapes() and (96, 384) in mlp_shapes() and (768, 1000) not in mlp_shapes()
