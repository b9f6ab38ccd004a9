"""Triton rescale-quantize and LayerNorm-quantize against kernels.reference (interpreter on CPU)."""
import pytest
import torch

from kernels import configs as C
from kernels import library as L
from kernels import ops
from kernels import reference as R
from kernels.ops import _act_qparams
from lowbit import primitives as P
from lowbit.primitives import QParams

from ._triton_util import assert_codes_match_up_to_ties, run_poisoned, triton_path

CASES = [  # (shape, dtype, bits, rescale, shift)
    ((1, 48), torch.float32, 8, True, True),
    ((3, 64), torch.float16, 4, True, False),
    ((197, 200), torch.bfloat16, 3, False, True),
    ((2, 3, 768), torch.float32, 6, False, False),
    ((5, 7, 10), torch.float16, 1.58, True, True),
]


def _inputs(gen, shape, dtype, bits, with_r, with_shift):
    c = shape[-1]
    x = (torch.randn(*shape, generator=gen) * torch.linspace(0.2, 6, c) + 0.3).to(dtype)
    r = torch.rand(c, generator=gen) + 0.5 if with_r else None
    sh = torch.randn(c, generator=gen) if with_shift else None
    s, z = P.init_act_qparams(P.apply_rescale(x.float(), r, sh), bits)
    return x, QParams(s, z, bits), r, sh


@pytest.mark.parametrize("shape,dtype,bits,with_r,with_shift", CASES)
def test_rescale_quantize_exact(gen, shape, dtype, bits, with_r, with_shift):
    x, qp, r, sh = _inputs(gen, shape, dtype, bits, with_r, with_shift)
    ref = R.rescale_quantize(x, qp, r, sh)
    with triton_path():
        out = run_poisoned(lambda: ops.quantize(x, qp, r, sh), 99, -99)
    assert out.dtype == torch.int8 and out.shape == x.shape
    assert torch.equal(out, ref)
    lo, hi = P.signed_range(bits)
    assert int(ref.min()) == lo and int(ref.max()) == hi  # the test exercises both clamps


def test_rescale_quantize_strided_input(gen):
    big = torch.randn(9, 100, generator=gen) * 2
    x = big[::2, 10:74]
    qp = QParams(*P.init_act_qparams(x, 4), 4)
    with triton_path():
        out = run_poisoned(lambda: ops.quantize(x, qp))
    assert torch.equal(out, R.rescale_quantize(x, qp))


@pytest.mark.parametrize("shape,dtype,bits,with_r,with_shift", CASES[:4])
def test_layernorm_quantize_matches_up_to_ties(gen, shape, dtype, bits, with_r, with_shift):
    x, _, r, sh = _inputs(gen, shape, dtype, bits, with_r, with_shift)
    c = shape[-1]
    lw, lb = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.3
    pre = P.apply_rescale(R.layernorm(x, lw, lb, 1e-6), r, sh)
    qp = QParams(*P.init_act_qparams(pre, bits), bits)
    ref = R.layernorm_rescale_quantize(x, lw, lb, 1e-6, qp, r, sh)
    with triton_path():
        out = run_poisoned(lambda: ops.layernorm_quantize(x, lw, lb, 1e-6, qp, r, sh), 99, -99)
        no_affine = ops.layernorm_quantize(x, None, None, 1e-5, qp)
    assert out.dtype == torch.int8 and out.shape == x.shape
    assert_codes_match_up_to_ties(out, ref, pre / qp.s)
    pre2 = R.layernorm(x, None, None, 1e-5)
    assert_codes_match_up_to_ties(no_affine, R.layernorm_rescale_quantize(x, None, None, 1e-5, qp), pre2 / qp.s)


def test_quantize_bad_input(gen):
    x = torch.randn(4, 16, generator=gen)
    qp = QParams(torch.tensor(0.1), torch.tensor(3.0), 4)
    with triton_path():
        with pytest.raises(TypeError, match="float32/float16/bfloat16"):
            ops.quantize(x.double(), qp)
        with pytest.raises(TypeError, match="float32/float16/bfloat16"):
            ops.quantize(x.to(torch.int32), qp)
        with pytest.raises(ValueError, match="one per channel"):
            ops.quantize(x, qp, r=torch.ones(15))
        with pytest.raises(ValueError, match="bits must be one of"):
            ops.quantize(x, QParams(qp.s, qp.z, 5.5))
        with pytest.raises(ValueError, match="> 0"):
            ops.quantize(x, QParams(torch.tensor(-0.1), qp.z, 4))
        with pytest.raises(ValueError, match="per-tensor scalar"):
            ops.quantize(x, QParams(torch.ones(16), qp.z, 4))
        with pytest.raises(ValueError, match="is on meta"):
            ops.quantize(x, qp, shift=torch.zeros(16, device="meta"))
        with pytest.raises(ValueError, match="one per channel"):
            ops.layernorm_quantize(x, torch.ones(8), None, 1e-6, qp)


@pytest.mark.parametrize("bits,s", [(4, 0.25), (8, 0.25), (8, 0.3)])
def test_exact_ties_round_half_to_even(bits, s):
    """x / s at (or next to) .5 ties: half-to-even rounding and true division (not x * (1/s)) are both needed."""
    x = (torch.arange(-120, 120, dtype=torch.float32) + 0.5).reshape(2, 120) * s
    qp = QParams(torch.tensor(s), torch.tensor(float(P.qmax(bits) // 2)), bits)
    with triton_path():
        out = ops.quantize(x, qp)
        fq = ops.fake_quantize(x, qp)
    assert torch.equal(out, R.rescale_quantize(x, qp))
    assert torch.equal(fq, R.rescale_fake_quantize(x, qp))


# ---------------------------------------------------------------------------------------------- layouts, bit-exact

#: C = 3 x 2^k (three chunks, no masks), 200 (one masked chunk, C not a multiple of 16), 760 (three chunks, the
#: last masked), 1000 (two masked chunks of 512)
WIDTHS = (384, 768, 200, 760, 1000)
#: the interpreter's own tiles, the sm_90 tiles of a 132-SM H100 (few programs: one warp each at 37 rows) and of a
#: one-SM target (4 warps, BLOCK_M = 8 at C = 768, so 37 rows end in a partial tile)
TARGETS = {"interpreter": None, "sm_90": C.Target(interpreted=False, arch=90),
           "sm_90 one SM": C.Target(interpreted=False, arch=90, num_sms=1)}


def _ln_case(gen, m, c, dtype, affine, rescale, bits=4):
    x = R.exact_sum_rows(m, c, dtype, gen)
    assert bool((x != 0).all())
    lw = torch.rand(c, generator=gen) + 0.5 if affine else None
    lb = torch.randn(c, generator=gen) * 0.3 if affine else None
    r = torch.rand(c, generator=gen) + 0.5 if rescale else None
    sh = torch.randn(c, generator=gen) * 0.2 if rescale else None
    pre = P.apply_rescale(R.layernorm(x, lw, lb, 1e-6), r, sh)
    return x, lw, lb, r, sh, QParams(*P.init_act_qparams(pre, bits), bits)


def _launch_ln(x, lw, lb, r, sh, qp, target, config=None):
    """Codes of the LayerNorm-quantize launch that ``target`` would make, run by the interpreter."""
    s, zr = _act_qparams(x, qp)
    out = torch.full(x.shape, 99, dtype=torch.int8)
    L.layernorm_quantize_launch(x, out, lw, lb, 1e-6, r, sh, s, zr, float(qp.bits), target, config)()
    return out


@pytest.mark.parametrize("c", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("affine,rescale", [(True, False), (False, True), (True, True), (False, False)])
def test_layernorm_quantize_bit_exact(gen, ieee_sqrt, c, dtype, affine, rescale):
    """On rows whose sums are exact in any order (:func:`kernels.reference.exact_sum_rows`) the codes equal the
    reference's (its square root IEEE, as on a GPU: ``ieee_sqrt``), bit for bit, under every layout: 37 rows (a
    partial last row tile), every chunking of :func:`kernels.configs.layernorm_chunks`."""
    x, lw, lb, r, sh, qp = _ln_case(gen, 37, c, dtype, affine, rescale)
    ref = R.layernorm_rescale_quantize(x, lw, lb, 1e-6, qp, r, sh)
    assert len(torch.unique(ref)) > 8  # the codes span the grid
    with triton_path():
        out = run_poisoned(lambda: ops.layernorm_quantize(x, lw, lb, 1e-6, qp, r, sh), 99, -99)
    assert torch.equal(out, ref)
    for name, target in TARGETS.items():
        if target is not None:
            assert torch.equal(_launch_ln(x, lw, lb, r, sh, qp, target), ref), name


def test_layernorm_quantize_former_layout(gen, ieee_sqrt):
    """The former layout (one ``pow2(C)`` tile per row, ``(2, 1024, 1, 4)`` at C = 768), still launchable for
    ``bench.gpu``'s sweep, gives the same codes."""
    x, lw, lb, r, sh, qp = _ln_case(gen, 21, 768, torch.float16, True, True)
    ref = R.layernorm_rescale_quantize(x, lw, lb, 1e-6, qp, r, sh)
    assert torch.equal(_launch_ln(x, lw, lb, r, sh, qp, TARGETS["sm_90"], (2, 1024, 1, 4)), ref)


@pytest.mark.parametrize("c", (768, 200, 48))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rescale", [True, False])
def test_rescale_quantize_layouts(gen, c, dtype, rescale):
    """Every rescale-quantize layout (the interpreter's, the sm_90 persistent grids of a 132-SM and a one-SM target,
    whose programs take several row tiles, and the former one-tile-per-program grid) against the reference, at 150
    rows (partial last tile)."""
    x, qp, r, sh = _inputs(gen, (150, c), dtype, 4, rescale, rescale)
    ref = R.rescale_quantize(x, qp, r, sh)
    s, zr = _act_qparams(x, qp)
    runs = {name: (t, None) for name, t in TARGETS.items() if t is not None}
    runs["former"] = (TARGETS["sm_90"], (8, min(256, C.pow2(c)), 4, 1, False))
    for name, (target, config) in runs.items():
        out = torch.full(x.shape, 99, dtype=torch.int8)
        lx = L.rescale_quantize_launch(x, out, r, sh, s, zr, 4.0, target, config)
        if name == "sm_90 one SM" and c != 48:  # (48: two 128-row tiles)
            assert lx.grid[0] * lx.meta["BLOCK_M"] < 150  # programs loop over several row tiles
        lx()
        assert torch.equal(out, ref), name
    with triton_path():
        assert torch.equal(run_poisoned(lambda: ops.quantize(x, qp, r, sh), 99, -99), ref)


def test_row_blocks():
    """The chunking and tiles of :mod:`kernels.configs`: ``3 * 2^k`` widths in three chunks without padding, a chunk
    within one warp where the padding allows, batch 1 spread over more programs than batch 64, rescale-quantize
    grids persistent at batch 64."""
    assert C.layernorm_chunks(768) == (3, 256) and C.layernorm_chunks(384) == (3, 128)
    assert C.layernorm_chunks(96) == (3, 32) and C.layernorm_chunks(3072) == (3, 1024)
    assert C.layernorm_chunks(1024) == (2, 512) and C.layernorm_chunks(512) == (1, 512)
    assert C.layernorm_chunks(200) == (1, 256) and C.layernorm_chunks(760) == (3, 256)
    h100 = TARGETS["sm_90"]
    for c in (96, 192, 384, 768, 1536, 3072, 1024, 200):
        for m in (197, 12608):
            bm, bc, chunks, opts = C.layernorm_blocks(c, h100, m)
            assert chunks * bc - c < max(c // 3, 16) and bm & (bm - 1) == 0, (c, m)
            assert bm * bc * chunks // (32 * opts["num_warps"]) <= 64, (c, m)  # values per thread
    assert C.layernorm_blocks(768, h100, 12608)[0] == 8 and C.layernorm_blocks(768, h100, 12608)[3]["num_warps"] == 4
    assert C.layernorm_blocks(768, h100, 197)[3]["num_warps"] == 1  # 99 programs, not 25
    bm, bc, programs, stages, opts = C.quantize_blocks(768, 12608, h100, 2)
    assert (bm, bc, stages, opts["num_warps"]) == (16, 256, 3, 4)
    assert programs < C.cdiv(12608, bm) and programs * 3 <= 132 * C.QUANTIZE_PROGRAMS_PER_SM
    assert C.quantize_blocks(768, 197, h100, 2)[2] * 3 >= 66  # batch 1: the tiles reach half the SMs at least
