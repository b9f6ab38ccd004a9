"""The persistent TMA int8 GEMM (kernels/int8_gemm_tma.py) under the interpreter, whose tensor descriptors are
Triton's emulation of TMA boxes (zero-filled past the edges): the int32 accumulator exact, every epilogue
bit-identical to the pointer-load kernel's, the dispatcher's choice between the two, the residual add."""
import pytest
import torch

from kernels import configs as C
from kernels import library as L
from kernels import ops
from kernels import reference as R
from lowbit import packing
from lowbit import primitives as P
from lowbit.primitives import QParams

from ._triton_util import run_poisoned, triton_path

#: the shipped tiles and a small one, each on a 3-SM "machine": every program walks several output tiles
TILES = (*C.TMA_CANDIDATES, C.TmaGemmConfig(32, 64, 64, 4, 3, 2, 2), C.TmaGemmConfig(64, 64, 32, 4, 2, 1, 4),
         C.TmaGemmConfig(64, 32, 32, 4, 2, 1, 1))
FEW_SMS = C.Target(interpreted=True, num_sms=3)


def _codes(gen, m, n, k, centered):
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    lo, hi = (-15, 16) if centered else (-128, 128)
    w = torch.randint(lo, hi, (n, k), generator=gen, dtype=torch.int8)
    return a, w


def _epilogue(gen, n, bits=8):
    """Random scales, zero points (signed storage form) and bias of an epilogue over ``n`` columns."""
    sa = torch.rand(1, generator=gen) * 0.05 + 0.01
    za = torch.randint(-5, 6, (1,), generator=gen).float()
    sw = torch.rand(n, generator=gen) * 0.01 + 1e-3
    zw = torch.randint(-4, 5, (n,), generator=gen, dtype=torch.int32)
    return sa, za, sw, zw, torch.randn(n, generator=gen)


def _run(launch_fn, out):
    launch_fn(out)()
    return out


@pytest.mark.parametrize("centered", [True, False])
def test_accumulator_exact_for_every_tile(gen, centered):
    """Unit scales, zero zero points: the float output is the int32 accumulator, exact, with partial row, column
    and K tiles (K = 208: 16-aligned, not a tile multiple) and several tiles per program."""
    m, n, k = 300, 260, 208
    a, w = _codes(gen, m, n, k, centered)
    exact = (a.long() @ w.long().T).float()
    one, zero = torch.ones(1), torch.zeros(1)
    sw, zw = torch.ones(n), torch.zeros(n, dtype=torch.int32)
    colsum = w.int().sum(1, dtype=torch.int32)
    for cfg in TILES:
        out = torch.full((m, n), float("nan"))
        L.int8_gemm_tma_launch(a, w, colsum, one, zero, sw, zw, None, False, out, None, None, 8.0, FEW_SMS, cfg,
                               centered)()
        assert torch.equal(out, exact), f"{cfg}: max error {float((out - exact).abs().max())}"


@pytest.mark.parametrize("cfg", TILES[:4], ids=lambda c: f"{c.block_m}x{c.block_n}x{c.block_k}s{c.epi_split}")
def test_every_epilogue_equals_pointer_kernel(gen, cfg):
    """Zero points, scales, bias, GELU, fp16 / bf16 / fp32 out, per-tensor and per-column requant, the residual
    add: the TMA kernel's outputs equal the pointer-load kernel's bit for bit (same epilogue, same accumulator)."""
    m, n, k = 150, 136, 96
    for centered in (True, False):
        a, w = _codes(gen, m, n, k, centered)
        colsum = w.int().sum(1, dtype=torch.int32)
        sa, za, sw, zw, bias = _epilogue(gen, n)
        rq_col = (torch.rand(n, generator=gen) * 0.05 + 0.02, torch.randint(0, 16, (n,), generator=gen).float())
        rq_one = (torch.tensor([0.07]), torch.tensor([3.0]))
        cases = [dict(), dict(bias=bias, gelu=True), dict(bias=bias, dt=torch.float16),
                 dict(bias=bias, rq=rq_one, gelu=True), dict(rq=rq_col), dict(bias=bias, res=True)]
        for case in cases:
            rq = case.get("rq")
            dt = torch.int8 if rq else case.get("dt", torch.float32)
            res = torch.randn(m, n, generator=gen) if case.get("res") else None
            args = (colsum, sa, za, sw, zw, case.get("bias"), case.get("gelu", False))
            rq_args = (rq[0], rq[1], 4.0) if rq else (None, None, 8.0)
            new = run_poisoned(lambda: _run(lambda o: L.int8_gemm_tma_launch(
                a, w, *args, o, *rq_args, FEW_SMS, cfg, centered, res), torch.empty(m, n, dtype=dt)), 99, -7)
            old = _run(lambda o: L.packed_gemm_launch(a, [w], "int8", k, *args, o, *rq_args, FEW_SMS,
                                                      centered=centered, res=res), torch.empty(m, n, dtype=dt))
            assert torch.equal(new, old), f"centered={centered} {sorted(case)}"
            if res is not None:
                plain = _run(lambda o: L.packed_gemm_launch(a, [w], "int8", k, *args, o, None, None, 8.0, FEW_SMS,
                                                            centered=centered), torch.empty(m, n))
                assert torch.equal(new, plain + res)


def test_dispatcher_choice(gen):
    """sm_90 takes the TMA kernel for centred int8 weight codes once 128-row tiles cover the SMs; the pointer-load
    kernel at few rows, for uncentred codes, for K not a multiple of 16, for packed formats, off sm_90, with
    :data:`TMA_GEMM` off, and for an operand that is not a TMA source (misaligned base)."""
    sm90 = C.Target(interpreted=False, arch=90, num_sms=132)

    def kernel(m, k, fmt="int8", target=sm90, a=None, centered=True):
        n = 768
        a = a if a is not None else torch.zeros(m, k, dtype=torch.int8)
        planes = [torch.zeros(n, k, dtype=torch.int8)] if fmt == "int8" else \
            [torch.zeros(n, k // 2, dtype=torch.uint8)]
        lx = L.gemm_launch(a, planes, fmt, k, torch.zeros(n, dtype=torch.int32), torch.ones(1), torch.zeros(1),
                           torch.ones(n), torch.zeros(n, dtype=torch.int32), None, False, torch.empty(m, n), None,
                           None, 8.0, target, centered and fmt == "int8")
        return getattr(lx.kernel, "fn", lx.kernel).__name__, lx.meta.get("BLOCK_N")

    assert kernel(12608, 768) == ("int8_gemm_tma_kernel", 256)
    assert C.tma_gemm_config(12608, 768, 768, sm90) == C.TMA_CANDIDATES[0]
    assert kernel(12608, 768, centered=False)[0] == "packed_gemm_kernel"  # (W8: the loop sums the rows too)
    assert kernel(197, 768)[0] == "packed_gemm_kernel"
    assert kernel(12608, 776 + 4)[0] == "packed_gemm_kernel"
    assert kernel(12608, 768, fmt="int4")[0] == "packed_gemm_kernel"
    assert kernel(12608, 768, target=C.Target(interpreted=False, arch=80))[0] == "packed_gemm_kernel"
    assert kernel(12608, 768, a=torch.zeros(12608 * 768 + 1, dtype=torch.int8)[1:].view(12608, 768))[0] \
        == "packed_gemm_kernel"
    before = C.TMA_GEMM
    C.TMA_GEMM = False
    try:
        assert kernel(12608, 768)[0] == "packed_gemm_kernel"
    finally:
        C.TMA_GEMM = before


def test_weight_descriptor_kept_per_weight(gen):
    w = torch.randint(-8, 8, (64, 128), generator=gen, dtype=torch.int8)
    d1 = L.weight_descriptor(w, [64, 128])
    assert L.weight_descriptor(w, [64, 128]) is d1
    assert L.weight_descriptor(w, [32, 128]) is not d1
    w.add_(1)  # in place: a new version
    assert L.weight_descriptor(w, [64, 128]) is not d1


def _linear_problem(gen, m, k, n, wbits=4, abits=4):
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    qp = QParams(*P.init_act_qparams(x, abits), abits)
    sw, zw = P.init_weight_qparams(w, wbits)
    a = P.quantize(x, qp.s, qp.z, abits, signed=True)
    return a, qp, packing.pack(P.quantize(w, sw, zw, wbits), wbits), sw.flatten(), zw.flatten(), torch.randn(n)


@pytest.mark.parametrize("m", [5, C.UNPACK_MIN_M + 3])
@pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bfloat16])
def test_packed_linear_residual(gen, m, dt, monkeypatch):
    """``ops.packed_linear(..., residual=r)`` is ``r + y`` rounded once in ``out_dtype``, on the Triton path (the
    epilogue; bf16 under the interpreter added by torch) and on the CPU backend; bad residuals are refused."""
    k, n = 64, 48
    a, qp, pw, sw, zw, bias = _linear_problem(gen, m, k, n)
    res = torch.randn(m, n, generator=gen).to(dt)
    y = R.packed_linear(a, qp, pw, sw, zw, bias, out_dtype=dt)
    with triton_path():
        got = run_poisoned(lambda: ops.packed_linear(a, qp, pw, sw, zw, bias, out_dtype=dt, residual=res))
        assert torch.equal(got, ops.packed_linear(a, qp, pw, sw, zw, bias, out_dtype=dt) + res)
    cpu = ops.packed_linear(a, qp, pw, sw, zw, bias, out_dtype=dt, residual=res)
    assert got.dtype == cpu.dtype == dt
    torch.testing.assert_close(got.float(), (y + res).float(), rtol=1e-2 if dt != torch.float32 else 1e-5,
                               atol=1e-2 if dt != torch.float32 else 1e-4)
    assert torch.equal(cpu, ops.packed_linear(a, qp, pw, sw, zw, bias, out_dtype=dt) + res)
    for bad, why in ((res[:, :-1], "shape"), (res.double(), "float64"), (res.to(torch.int32), "int32")):
        with pytest.raises(ValueError, match="residual must be"):
            ops.packed_linear(a, qp, pw, sw, zw, bias, out_dtype=dt, residual=bad)
    with pytest.raises(ValueError, match="requant"):
        ops.packed_linear(a, qp, pw, sw, zw, bias, requant=qp, residual=res.float())
    # the library op refuses a residual with requant too, before it allocates or launches: also with no rows
    real, seen = L.packed_linear, []
    monkeypatch.setattr(L, "packed_linear", lambda *args: seen.append(args) or real(*args))
    with triton_path():
        ops.packed_linear(a, qp, pw, sw, zw, bias, requant=qp)
    *args, residual = seen[0]
    assert residual is None and args[12] is not None  # rq_s
    for rows in (m, 0):
        with pytest.raises(ValueError, match="requantized codes"):
            real(args[0][:rows], *args[1:], res.float()[:rows])
