"""Triton packed GEMMs (2bit/int3/int4/int8) against kernels.reference.packed_linear (interpreter on CPU).

Every value of M in {1, 3, 197}, K in {48, 64, 200, 768}, N in {7, 10, 384, 1000} and every weight width
appears, without the full cartesian product (a 197x768x1000 GEMM takes seconds in the interpreter).
"""
import pytest
import torch
import torch.nn.functional as F

from kernels import ops
from kernels import reference as R
from lowbit import packing
from lowbit import primitives as P
from lowbit.primitives import QParams

from ._triton_util import assert_codes_match_up_to_ties, run_poisoned, triton_path

CASES = [  # (M, K, N, w_bits, a_bits, out_dtype for the GELU variant)
    (1, 48, 7, 1.58, 8, torch.float16),
    (3, 64, 10, 4, 4, torch.bfloat16),
    (197, 200, 384, 3, 3, torch.float16),
    (3, 768, 1000, 1.58, 8, torch.bfloat16),
    (197, 48, 10, 8, 8, torch.float16),
    (1, 200, 1000, 4, 8, torch.float32),
    (197, 768, 7, 6, 6, torch.bfloat16),
    (3, 48, 384, 2, 4, torch.float16),
    (1, 64, 1000, 3, 3, torch.float32),
]


def _problem(gen, m, k, n, wbits, abits):
    x = torch.randn(m, k, generator=gen) * torch.linspace(0.3, 3, k)
    w = torch.randn(n, k, generator=gen) * (torch.rand(n, 1, generator=gen) + 0.2)
    bias = torch.randn(n, generator=gen)
    qp = QParams(*P.init_act_qparams(x, abits), abits)
    sw, zw = P.init_weight_qparams(w, wbits)
    if wbits not in (1.58,):
        zw = torch.clamp(zw + torch.randint(-1, 2, zw.shape, generator=gen), 0, P.qmax(wbits))  # varied zero points
    a = P.quantize(x, qp.s, qp.z, abits, signed=True)
    pw = packing.pack(P.quantize(w, sw, zw, wbits), wbits)
    return a, qp, pw, sw.flatten(), zw.flatten(), bias


@pytest.mark.parametrize("m,k,n,wbits,abits,dt", CASES)
def test_packed_linear_matches_reference(gen, m, k, n, wbits, abits, dt):
    a, qp, pw, sw, zw, bias = _problem(gen, m, k, n, wbits, abits)
    ref = R.packed_linear(a, qp, pw, sw, zw, bias)
    with triton_path():
        y = run_poisoned(lambda: ops.packed_linear(a, qp, pw, sw, zw, bias))
        yg = run_poisoned(lambda: ops.packed_linear(a, qp, pw, sw, zw, bias, gelu=True, out_dtype=dt))
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    ref_g = R.packed_linear(a, qp, pw, sw, zw, bias, gelu=True)
    assert yg.dtype == dt
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dt]
    torch.testing.assert_close(yg.float(), ref_g.to(dt).float(), rtol=tol, atol=tol * float(ref_g.abs().max()))


@pytest.mark.parametrize("m,k,n,wbits,abits,dt", CASES[:3] + CASES[4:5])
def test_packed_linear_requant_codes(gen, m, k, n, wbits, abits, dt):
    a, qp, pw, sw, zw, bias = _problem(gen, m, k, n, wbits, abits)
    y = R.packed_linear(a, qp, pw, sw, zw, bias, gelu=True)
    rq = QParams(*P.init_act_qparams(y, abits), abits)
    ref = R.packed_linear(a, qp, pw, sw, zw, bias, gelu=True, requant=rq)
    with triton_path():
        codes = run_poisoned(lambda: ops.packed_linear(a, qp, pw, sw, zw, bias, gelu=True, requant=rq), 99, -99)
    assert codes.dtype == torch.int8 and codes.shape == (m, n)
    assert_codes_match_up_to_ties(codes, ref, y / rq.s)


def test_packed_linear_per_column_requant(gen):
    """A requant quantizer with a step and zero point per output column (Q, K, V over a qkv projection) matches the
    reference column by column; a vector of the wrong length is refused."""
    m, k, n, wbits, abits = 37, 64, 48, 4, 4
    a, qp, pw, sw, zw, bias = _problem(gen, m, k, n, wbits, abits)
    y = R.packed_linear(a, qp, pw, sw, zw, bias)
    parts = [QParams(*P.init_act_qparams(y[:, i * 16:(i + 1) * 16], abits), abits) for i in range(3)]
    rq = ops.stacked_qparams(parts, (16, 16, 16))
    assert rq.s.shape == (n,) and len(set(rq.s.tolist())) == 3
    ref = R.packed_linear(a, qp, pw, sw, zw, bias, requant=rq)
    with triton_path():
        codes = run_poisoned(lambda: ops.packed_linear(a, qp, pw, sw, zw, bias, requant=rq), 99, -99)
        with pytest.raises(ValueError, match="one value per output column"):
            ops.packed_linear(a, qp, pw, sw, zw, bias, requant=QParams(rq.s[:-1], rq.z[:-1], abits))
    assert codes.dtype == torch.int8 and codes.shape == (m, n)
    assert_codes_match_up_to_ties(codes, ref, y / rq.s)
    for i, part in enumerate(parts):  # each column block is that block's own per-tensor quantization
        cols = slice(i * 16, (i + 1) * 16)
        assert torch.equal(ref[:, cols], P.quantize(y[:, cols], part.s, part.z, abits, signed=True))


def test_packed_linear_batched_leading_dims_and_colsum_cache(gen):
    a, qp, pw, sw, zw, bias = _problem(gen, 6, 64, 10, 4, 8)
    a3 = a.reshape(2, 3, 64)
    ref = R.packed_linear(a3, qp, pw, sw, zw)
    with triton_path():
        y = run_poisoned(lambda: ops.packed_linear(a3, qp, pw, sw, zw))
        cs = ops.weight_colsum(pw)
        assert ops.weight_colsum(pw) is cs
        pw.planes["lo"].zero_()  # in-place change: the cached column sums must be recomputed
        assert ops.weight_colsum(pw) is not cs and int(ops.weight_colsum(pw).abs().sum()) == 0
        y0 = ops.packed_linear(a3, qp, pw, sw, zw)
    assert y.shape == (2, 3, 10)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    ref0 = R.packed_linear(a3, qp, pw, sw, zw)
    torch.testing.assert_close(y0, ref0, rtol=1e-5, atol=1e-5 * float(ref0.abs().max()))


@pytest.mark.parametrize("wbits,abits", [(1.58, 8), (4, 4), (3, 3)])
def test_training_path_equals_inference_path(gen, wbits, abits):
    """fake-quant float matmul (optimiser) == integer kernel (deployment) on the same parameters, with the
    rescale/shift folded into the weight and bias."""
    m, k, n = 5, 64, 10
    x = torch.randn(m, k, generator=gen) * torch.linspace(0.5, 4, k) + torch.linspace(-1, 1, k)
    w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    r, shift = torch.rand(k, generator=gen) + 0.5, torch.randn(k, generator=gen) * 0.5
    wf, bf = P.fold_rescale(w, b, r, shift)
    qp = QParams(*P.init_act_qparams(P.apply_rescale(x, r, shift), abits), abits)
    sw, zw = P.init_weight_qparams(wf, wbits)
    with triton_path():
        y_train = ops.fake_quantize(x, qp, r, shift) @ ops.fake_quantize_weight(wf, sw, zw, wbits).T + bf
        pw = packing.pack(P.quantize(wf, sw, zw, wbits), wbits)
        y_inf = ops.packed_linear(ops.quantize(x, qp, r, shift), qp, pw, sw.flatten(), zw.flatten(), bf)
    torch.testing.assert_close(y_inf, y_train, rtol=1e-4, atol=1e-4 * float(y_train.abs().max()))
    assert float((y_train - (x @ w.T + b)).abs().max()) > 1e-3  # quantization actually happened


def test_packed_linear_bad_input(gen):
    a, qp, pw, sw, zw, bias = _problem(gen, 3, 64, 10, 4, 8)
    with triton_path():
        with pytest.raises(TypeError, match="int8"):
            ops.packed_linear(a.float(), qp, pw, sw, zw)
        with pytest.raises(ValueError, match="K=48"):
            ops.packed_linear(a[:, :48], qp, pw, sw, zw)
        with pytest.raises(ValueError, match="one value per output channel"):
            ops.packed_linear(a, qp, pw, sw[:9], zw)
        with pytest.raises(ValueError, match="bias must have shape"):
            ops.packed_linear(a, qp, pw, sw, zw, bias[:3])
        with pytest.raises(TypeError, match="out_dtype"):
            ops.packed_linear(a, qp, pw, sw, zw, out_dtype=torch.int32)
        with pytest.raises(ValueError, match="bits must be one of"):
            ops.packed_linear(a, qp, pw, sw, zw, requant=QParams(qp.s, qp.z, 12))
        with pytest.raises(ValueError, match="is on meta"):
            ops.packed_linear(a, qp, pw, sw.to("meta"), zw)
        with pytest.raises(TypeError, match="PackedWeight"):
            ops.packed_linear(a, qp, torch.zeros(10, 32, dtype=torch.uint8), sw, zw)
        bad = packing.PackedWeight("int4", 3, pw.n, pw.k, pw.planes)
        with pytest.raises(ValueError, match="does not match"):
            ops.packed_linear(a, qp, bad, sw, zw)
        short = packing.PackedWeight("int4", 4, pw.n, pw.k, {"lo": pw.planes["lo"][:, :5]})
        with pytest.raises(ValueError, match="plane 'lo'"):
            ops.packed_linear(a, qp, short, sw, zw)


def _exact_problem(gen, fmt_bits, m=70, n=150, k=300):
    """Codes and unit scales / zero zero points, so the float output is the exact int32 accumulator."""
    wb = fmt_bits
    q = torch.randint(0, P.qmax(wb) + 1, (n, k), generator=gen)
    pw = packing.pack(q, wb)
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    stored = packing.unpack(pw).to(torch.int64) if pw.fmt != "int8" else pw.planes["q"][:, :k].to(torch.int64)
    exact = (a.to(torch.int64) @ stored.T).float()
    return a, pw, exact


@pytest.mark.parametrize("wbits", [1.58, 3, 4, 8])
def test_gpu_tile_configs_exact_in_interpreter(gen, wbits):
    """Every GEMM autotune candidate and an H100 table row, run by the interpreter on a problem with partial row,
    column and K tiles and several grouped row tiles: the int32 accumulator is exact."""
    from kernels import configs as C
    from kernels import library as L
    a, pw, exact = _exact_problem(gen, wbits)
    planes = [pw.planes[name] for name, _ in packing.FORMATS[pw.fmt].planes]
    one, zero = torch.ones(1), torch.zeros(1)
    sw, zw = torch.ones(pw.n), torch.zeros(pw.n, dtype=torch.int32)
    cs = ops.weight_colsum(pw)
    table_cfg = C.gemm_config(pw.fmt, 197, 768, 768, C.Target(interpreted=False, arch=90))
    assert table_cfg is not None
    for cfg in (*C.GEMM_CANDIDATES, table_cfg, C.GemmConfig(16, 32, 64, 4, 1, group_m=2)):
        out = torch.full((a.shape[0], pw.n), float("nan"))
        L.packed_gemm_launch(a, planes, pw.fmt, pw.k, cs, one, zero, sw, zw, None, False, out, None, None, 8.0,
                             C.Target(interpreted=True), config=cfg)()
        assert torch.equal(out, exact), f"{pw.fmt} {cfg}: max error {float((out - exact).abs().max())}"


@pytest.mark.parametrize("wbits", [1.58, 2, 3, 4])
def test_unpack_codes_kernel_exact(gen, wbits):
    """The unpack kernel writes exactly the stored codes less each row's zero point (partial N and K tiles)."""
    from kernels import configs as C
    from kernels import library as L
    n, k = 70, 200
    q = torch.randint(0, int(P.qmax(wbits)) + 1, (n, k), generator=gen)
    zw = torch.randint(0, int(P.qmax(wbits)) + 1, (n,), generator=gen, dtype=torch.int32)
    assert zw.unique().numel() > 1
    pw = packing.pack(q, wbits)
    planes = [pw.planes[name] for name, _ in packing.FORMATS[pw.fmt].planes]
    out = torch.full((n, k), -77, dtype=torch.int8)
    with triton_path():
        L.unpack_codes_launch(planes, pw.fmt, k, zw, out, C.Target(interpreted=True))()
    assert torch.equal(out.long(), q.long() - zw.long()[:, None])


@pytest.mark.parametrize("wbits", [1.58, 3, 4])
def test_unpack_first_path_equals_fused_path(gen, wbits, monkeypatch):
    """From ``UNPACK_MIN_M`` rows the dispatcher unpacks the weight and runs the int8 GEMM: the output is
    bit-identical to the fused kernel's and matches the reference (GELU + requant epilogue too)."""
    from kernels import configs as C
    m, k, n = C.UNPACK_MIN_M + 3, 200, 70
    a, qp, pw, sw, zw, bias = _problem(gen, m, k, n, wbits, 4)
    rq = QParams(torch.tensor(0.05), torch.tensor(3.0), 4)
    assert C.unpack_first(pw.fmt, m)
    with triton_path():
        y = ops.packed_linear(a, qp, pw, sw, zw, bias)
        yq = ops.packed_linear(a, qp, pw, sw, zw, bias, gelu=True, requant=rq)
        monkeypatch.setattr(C, "UNPACK_MIN_M", 1 << 62)
        y_fused = ops.packed_linear(a, qp, pw, sw, zw, bias)
        yq_fused = ops.packed_linear(a, qp, pw, sw, zw, bias, gelu=True, requant=rq)
    assert torch.equal(y, y_fused) and torch.equal(yq, yq_fused)
    ref = R.packed_linear(a, qp, pw, sw, zw, bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_unpacked_codes_are_kept_per_weight(gen, monkeypatch):
    """At ``UNPACK_MIN_M`` rows and more a packed weight is unpacked once and its codes reused (same outputs); an
    in-place change of a plane or of the zero points unpacks again; with the cache off every call unpacks and the
    kept copy is dropped."""
    from kernels import configs as C
    from kernels import library as L
    m, k, n = C.UNPACK_MIN_M, 64, 24
    a, qp, pw, sw, zw, bias = _problem(gen, m, k, n, 4, 4)
    calls = []
    real = L.unpack_codes
    monkeypatch.setattr(L, "unpack_codes", lambda *args: calls.append(1) or real(*args))
    with triton_path():
        y1 = ops.packed_linear(a, qp, pw, sw, zw, bias)
        y2 = ops.packed_linear(a, qp, pw, sw, zw, bias)
        assert len(calls) == 1 and torch.equal(y1, y2) and "_lowbit_unpacked" in pw.__dict__
        ops.packed_linear(a[:3], qp, pw, sw, zw, bias)  # few rows: the packed weight is read in the GEMM loop
        assert len(calls) == 1
        plane = next(iter(pw.planes.values()))
        plane[0, 0] ^= 0x11  # (int4: two codes of row 0 change)
        y3 = ops.packed_linear(a, qp, pw, sw, zw, bias)
        assert len(calls) == 2 and not torch.equal(y3[:, 0], y1[:, 0])
        ref = R.packed_linear(a, qp, pw, sw, zw, bias)
        torch.testing.assert_close(y3, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        zw2 = zw.clone()
        zw2[1] = (zw2[1] + 1) % 16
        ops.packed_linear(a, qp, pw, sw, zw2, bias)
        assert len(calls) == 3
        with torch.inference_mode():  # (the zero points are then rebuilt per call as inference tensors)
            assert torch.equal(ops.packed_linear(a, qp, pw, sw, zw, bias), y3)
            assert torch.equal(ops.packed_linear(a, qp, pw, sw, zw, bias), y3)
        assert len(calls) == 4
        ops.cache_unpacked(False)
        try:
            y4 = ops.packed_linear(a, qp, pw, sw, zw, bias)
            ops.packed_linear(a, qp, pw, sw, zw, bias)
            assert len(calls) == 6 and torch.equal(y4, y3) and "_lowbit_unpacked" not in pw.__dict__
        finally:
            ops.cache_unpacked(True)


@pytest.mark.parametrize("wbits,abits", [(1.58, 8), (3, 3), (4, 4), (8, 8)])
def test_linear_codes_equals_packed_linear(gen, wbits, abits):
    """``ops.linear_codes`` (the optimiser's integer forward, unpacked codes through the int8 loader) is bit-equal
    to ``ops.packed_linear`` on the packed codes and matches the reference, GELU + requant epilogue too."""
    m, k, n = 37, 200, 70
    a, qp, pw, sw, zw, bias = _problem(gen, m, k, n, wbits, abits)
    codes = packing.unpack(pw)
    rq = QParams(torch.tensor(0.05), torch.tensor(3.0), 4)
    with triton_path():
        y = ops.linear_codes(a, qp, codes, wbits, sw, zw, bias)
        yq = ops.linear_codes(a, qp, codes, wbits, sw, zw, bias, gelu=True, requant=rq)
        assert torch.equal(y, ops.packed_linear(a, qp, pw, sw, zw, bias))
        assert torch.equal(yq, ops.packed_linear(a, qp, pw, sw, zw, bias, gelu=True, requant=rq))
    ref = R.linear_codes(a, qp, codes, wbits, sw, zw, bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("wbits,abits", [(1.58, 8), (3, 3), (4, 4), (6, 6), (8, 8)])
def test_linear_float_weight_equals_packed_linear(gen, wbits, abits):
    """``ops.linear_float_weight`` (the optimiser's integer forward: codes from the float weight in one pass, their
    sums beside them) is bit-equal to ``ops.packed_linear`` of the packed codes, on the Triton path and on the
    reference path; zero points off the integer grid are rounded as everywhere."""
    m, k, n = 37, 200, 70
    x = (torch.randn(m, k, generator=gen) + 1.5) * torch.linspace(0.3, 3, k)  # off-centre: a zero point far from
    w = torch.randn(n, k, generator=gen) * (torch.rand(n, 1, generator=gen) + 0.2)  # mid-range, so its terms count
    bias = torch.randn(n, generator=gen)
    qp = QParams(*P.init_act_qparams(x, abits), abits)
    assert int(P.signed_zero_point(qp.z, abits)) != 0
    sw, zw = P.init_weight_qparams(w, wbits)
    if wbits != 1.58:
        zw = torch.clamp(zw + torch.rand(zw.shape, generator=gen) * 2 - 1, 0, P.qmax(wbits))  # not integers
    a = P.quantize(x, qp.s, qp.z, abits, signed=True)
    pw = packing.pack(P.quantize(w, sw, zw, wbits), wbits)
    zr = P.round_zero_point(zw, wbits).flatten()
    ref = R.packed_linear(a, qp, pw, sw.flatten(), zr, bias)
    assert torch.equal(ops.linear_float_weight(a, qp, w, sw, zw, wbits, bias), ref)
    with triton_path():
        y = run_poisoned(lambda: ops.linear_float_weight(a, qp, w, sw, zw, wbits, bias))
        assert torch.equal(y, ops.packed_linear(a, qp, pw, sw.flatten(), zr, bias))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
