"""HostAdam: torch.optim.Adam's update bit for bit, its state_dict both ways, and no read back to the host."""
import pytest
import torch

from quant.adam import HostAdam


def _run(make, steps=20, swap_at=None, swap_to=None):
    g = torch.Generator().manual_seed(0)
    p = [torch.randn(50, 13, generator=g).requires_grad_(), torch.randn(7, generator=g).requires_grad_(),
         torch.randn(3, 3, generator=g).requires_grad_()]
    groups = lambda: [{"params": p[:2], "lr": 1e-3}, {"params": p[2:], "lr": 1e-4}]  # noqa: E731
    sched_fn = lambda s: (s + 1) / 7  # noqa: E731
    opt = make(groups())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, sched_fn)
    for i in range(steps):
        for t in p:
            t.grad = torch.randn(t.shape, generator=g) * 1e-3
        if i in (3, 4):
            p[1].grad = None  # skipped parameters keep their own step count
        opt.step()
        sched.step()
        if i == swap_at:  # resume from a checkpoint into the other optimiser class
            sd, ssd = opt.state_dict(), sched.state_dict()
            opt = swap_to(groups())
            sched = torch.optim.lr_scheduler.LambdaLR(opt, sched_fn)
            opt.load_state_dict(sd)
            sched.load_state_dict(ssd)
    return [t.detach() for t in p]


@pytest.mark.parametrize("case", ["plain", "resume_from_torch", "resume_into_torch"])
def test_host_adam_is_torch_adam_bit_for_bit(case):
    ref = _run(lambda g: torch.optim.Adam(g))
    if case == "plain":
        got = _run(HostAdam)
    elif case == "resume_from_torch":
        got = _run(lambda g: torch.optim.Adam(g), swap_at=9, swap_to=HostAdam)
    else:
        got = _run(HostAdam, swap_at=9, swap_to=lambda g: torch.optim.Adam(g))
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    late = _run(lambda g: torch.optim.Adam(g), steps=21)
    assert not any(torch.equal(a, b) for a, b in zip(ref, late))  # one more step moves every parameter


def test_host_adam_step_reads_nothing_back():
    p = torch.randn(5, requires_grad=True)
    opt = HostAdam([p])
    p.grad = torch.ones(5)
    opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        p.grad = torch.ones(5)
        opt.step()
    names = [e.name for e in prof.events()]
    assert "aten::_local_scalar_dense" not in names and any(n.startswith("aten::_foreach") for n in names)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        q = torch.randn(5, requires_grad=True)
        ref = torch.optim.Adam([q])
        for _ in range(2):
            q.grad = torch.ones(5)
            ref.step()
    assert "aten::_local_scalar_dense" in [e.name for e in prof.events()]  # torch's own does read the step back


def test_host_adam_step_is_a_few_ops_per_parameter():
    """Counted, not timed: one op per parameter for each of the seven update ops (the CPU's foreach fallback runs
    them per tensor, with no scalar wrapped into a tensor per parameter); the step counters are not touched until
    the state is read."""
    ps = [torch.randn(4, requires_grad=True) for _ in range(6)]
    opt = HostAdam(ps)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(4)
        opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    per_tensor = [e.name for e in prof.events() if e.name.startswith("aten::") and not e.name.startswith(
        ("aten::_foreach", "aten::full", "aten::empty", "aten::fill_"))]
    assert len(per_tensor) <= 7 * len(ps), sorted(set(per_tensor))
    assert all(float(opt.state[p]["step"]) == 0 for p in ps)  # not yet written
    assert all(s["step"] == 3 for s in opt.state_dict()["state"].values())
