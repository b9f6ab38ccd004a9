"""torch.library registration: schemas, fake (meta) impls and autograd wiring of the ``lowbit`` ops, and a
graph-break-free ``torch.compile`` through the dispatch functions."""
import os
from pathlib import Path

import pytest
import torch

from kernels import library as L
from kernels import ops
from kernels import reference as R
from lowbit import packing
from lowbit import primitives as P
from lowbit.primitives import QParams

from ._triton_util import triton_path

ROOT = Path(__file__).resolve().parents[2]

TESTS = ("test_schema", "test_faketensor", "test_autograd_registration")


def _f(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_opcheck_quantize_ops(gen):
    x = torch.randn(3, 20, generator=gen)
    r, sh = torch.rand(20, generator=gen) + 0.5, torch.randn(20, generator=gen)
    torch.library.opcheck(L.rescale_quantize.op, (x, r, sh, _f(0.1), _f(7.0), 4.0), test_utils=TESTS)
    torch.library.opcheck(L.layernorm_quantize.op, (x, r, sh, 1e-6, None, None, _f(0.1), _f(7.0), 4.0),
                          test_utils=TESTS)
    torch.library.opcheck(L.fake_quantize_fwd.op, (x, r, sh, _f(0.1), _f(7.0), 4.0), test_utils=TESTS)
    torch.library.opcheck(L.fake_quantize_bwd.op, (torch.randn(3, 20, generator=gen), x, r, None, _f(0.1), _f(7.0),
                                                4.0), test_utils=TESTS)


@pytest.mark.parametrize("bits", [1.58, 3, 4, 8])
def test_opcheck_packed_linear(gen, bits):
    a = torch.randint(-8, 8, (3, 24), dtype=torch.int8, generator=gen)
    pw = packing.pack(torch.randint(0, P.qmax(bits) + 1, (5, 24), generator=gen), bits)
    planes = [pw.planes[n] for n, _ in packing.FORMATS[pw.fmt].planes]
    args = (a, planes, pw.fmt, 24, ops.weight_colsum(pw), _f(0.1), _f(-1.0), torch.rand(5, generator=gen) + 0.1,
            torch.ones(5, dtype=torch.int32), torch.randn(5, generator=gen), True, torch.float16, None, None, 8.0)
    torch.library.opcheck(L.packed_linear.op, args, test_utils=TESTS)
    torch.library.opcheck(L.packed_linear.op, args[:-3] + (_f(0.05), _f(100.0), 8.0), test_utils=TESTS)


def test_opcheck_quant_attention(gen):
    q, k, v = (torch.randint(-5, 5, (1, 2, 9, 32), dtype=torch.int8, generator=gen) for _ in range(3))
    args = (q, k, v, torch.randn(2, 9, 9, generator=gen), None, _f(0), _f(1), _f(-1), _f(0.01), _f(1 / 255),
            _f(0), _f(0.001), 8.0)
    plain = (False, None, None, None, None, 8.0)
    torch.library.opcheck(L.quant_attention.op, args + plain, test_utils=TESTS)
    requant = (True, torch.rand(64, generator=gen) + 0.5, torch.randn(64, generator=gen), _f(0.01), _f(7.0), 4.0)
    torch.library.opcheck(L.quant_attention.op, args + requant, test_utils=TESTS)
    table = P.sulq_table(0.01, 0.3, 0.0, 4, 0.5, True)  # the published form: origin x0 = 0.5, rounded exponent
    args = (q, k, v, None, None, _f(0), _f(1), _f(-1.0), _f(0.01), _f(0.01), _f(0.5), _f(0.3), _f(0), table, _f(0.02),
            4.0)
    torch.library.opcheck(L.quant_attention_sulq.op, args + plain, test_utils=TESTS)
    torch.library.opcheck(L.quant_attention_sulq.op, args + requant, test_utils=TESTS)


def test_compile_fullgraph_through_dispatch(gen):
    """Quantize -> packed linear -> requant, and fake-quant forward+backward, traced without graph breaks."""
    x = torch.randn(4, 32, generator=gen)
    w = torch.randn(6, 32, generator=gen)
    qp = QParams(*P.init_act_qparams(x, 8), 8)
    sw, zw = P.init_weight_qparams(w, 4)
    pw = packing.pack(P.quantize(w, sw, zw, 4), 4)
    rq = QParams(torch.tensor(0.05), torch.tensor(128.0), 8)

    def infer(x):
        a = ops.quantize(x, qp)
        return ops.packed_linear(a, qp, pw, sw, zw, gelu=True, requant=rq)

    s = qp.s.clone().requires_grad_()

    def train(x):
        return ops.fake_quantize(x, QParams(s, qp.z, 8)).square().sum()

    with triton_path():
        eager = infer(x)
        torch._dynamo.reset()
        compiled = torch.compile(infer, fullgraph=True, backend="aot_eager")(x)
        assert torch.equal(compiled, eager)
        xg = x.clone().requires_grad_()
        torch.compile(train, fullgraph=True, backend="aot_eager")(xg).backward()
    xr = x.clone().requires_grad_()
    sr = qp.s.clone().requires_grad_()
    R.rescale_fake_quantize(xr, QParams(sr, qp.z, 8)).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    torch.testing.assert_close(s.grad, sr.grad, rtol=1e-4, atol=1e-4)


def test_dispatch_switch(gen, monkeypatch):
    """CPU tensors take the CPU backend by default, the Triton ops under set_backend("triton"); the override is
    checked, and restored by using_backend."""
    calls = []
    real = L.rescale_quantize
    monkeypatch.setattr(L, "rescale_quantize", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 16, generator=gen)
    qp = QParams(torch.tensor(0.1), torch.tensor(8.0), 4)
    assert ops.backend_for(x) == "cpu"
    assert torch.equal(ops.quantize(x, qp), R.rescale_quantize(x, qp)) and calls == []
    with ops.using_backend("triton"):
        assert ops.backend_for(x) == "triton"
        assert torch.equal(ops.quantize(x, qp), R.rescale_quantize(x, qp)) and calls == [1]
        with ops.using_backend("cpu"):
            ops.quantize(x, qp)
        assert ops.backend_for(x) == "triton"
    assert ops.backend_for(x) == "cpu" and calls == [1]
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("cuda")
    assert ops.backend_for(x) == "cpu"


def test_compiled_kernels_refuse_cpu_tensors(tmp_path):
    """Without the interpreter a kernel compiled for a GPU refuses CPU tensors with the fix, before Triton fails
    (in a process without TRITON_INTERPRET, where ``triton.jit`` builds compiled kernels)."""
    import subprocess
    import sys
    script = tmp_path / "launch_on_cpu.py"
    script.write_text(
        "import torch, triton, triton.language as tl\n"
        "from kernels.launch import Launch\n"
        "@triton.jit\n"
        "def copy_kernel(x_ptr, out_ptr, N: tl.constexpr):\n"
        "    tl.store(out_ptr + tl.arange(0, N), tl.load(x_ptr + tl.arange(0, N)))\n"
        "x = torch.arange(8.0)\n"
        "try:\n"
        "    Launch(copy_kernel, (1,), dict(x_ptr=x, out_ptr=torch.empty_like(x)), dict(N=8))()\n"
        "except RuntimeError as e:\n"
        "    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert "start Python with TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_importing_the_ops_writes_no_environment():
    """Importing the package's modules leaves os.environ as it was (no TRITON_INTERPRET written at import)."""
    import subprocess
    import sys
    code = ("import os; before = dict(os.environ); import kernels.ops, export, quant.run; "
            "assert dict(os.environ) == before, set(os.environ) ^ set(before)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(ROOT))


def test_deployed_qparams_are_checked_once_and_rechecked_when_changed(gen, monkeypatch):
    """Per-call parameter preparation (checks that read device values, zero-point rounding) runs once per
    quantizer parameter tensor and again after it changes in place or is replaced: a deployed model's forward has
    no host sync, and a bad value set later is still refused."""
    calls = []
    real = P.check_step
    monkeypatch.setattr(P, "check_step", lambda s: (calls.append(1), real(s)))
    x = torch.randn(5, 64, generator=gen)
    qp = QParams(torch.tensor(0.05), torch.tensor(7.0), 4)
    with triton_path():
        first = ops.quantize(x, qp)
        for _ in range(3):
            assert torch.equal(ops.quantize(x, qp), first)
        assert len(calls) == 1
        qp.s.mul_(2.0)
        assert not torch.equal(ops.quantize(x, qp), first) and len(calls) == 2
        qp.s.fill_(-1.0)
        with pytest.raises(ValueError, match="step size s must be > 0"):
            ops.quantize(x, qp)
        fresh = QParams(torch.tensor(0.05), torch.tensor(7.0), 4)
        assert torch.equal(ops.quantize(x, fresh), first) and len(calls) == 4
        trained = QParams(torch.tensor(0.05, requires_grad=True), torch.tensor(7.0), 4)
        ops.quantize(x, trained)
        ops.quantize(x, trained)
        assert len(calls) == 6


def test_eager_calls_skip_the_dispatcher_and_match_it(gen, monkeypatch):
    """Eager calls on plain tensors run the op's body directly (no torch.library dispatch: host time), with the
    result of the registered op; fake tensors (and compiled graphs, above) still go through the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = torch.randn(5, 24, generator=gen)
    s, z = _f(0.07), _f(7.0)
    dispatched = []
    op = L.rescale_quantize.op
    monkeypatch.setattr(L.rescale_quantize, "op", lambda *a: dispatched.append(1) or op(*a))
    with triton_path():
        direct = L.rescale_quantize(x, None, None, s, z, 4.0)
        assert dispatched == []
        assert torch.equal(direct, op(x, None, None, s, z, 4.0))
        assert torch.equal(direct, R.rescale_quantize(x, QParams(s, z, 4)))
        with FakeTensorMode() as mode:
            fx = mode.from_tensor(x)
            out = L.rescale_quantize(fx, None, None, mode.from_tensor(s), mode.from_tensor(z), 4.0)
        assert dispatched == [1] and out.shape == x.shape and out.dtype == torch.int8
