"""The CUDA-graph optimiser step, as far as a machine without a GPU can check it: :class:`quant.graph_step.GraphedStep`
with a stand-in graph whose capture records the step without running it and whose replay runs it on the static
batch (what a CUDA graph does), the graphable Adam, and the switch."""
import copy

import pytest
import torch

from quant.adam import HostAdam
from quant.calibrate import calibrate
from quant.graph_step import GraphedStep
from quant.optimize import OptimConfig, _make_optim, _units, graph_body, train_step, use_cuda_graph
from quant.surgery import quantize_model

from .ptq_utils import images, make_model, one_thread  # noqa: F401


class RecordingGraph:
    """``capture(fn)`` keeps ``fn`` (nothing runs) and returns a static output; ``replay()`` runs ``fn`` into it."""

    captures = 0

    def capture(self, fn):
        RecordingGraph.captures += 1
        self.fn, self.out = fn, torch.zeros(())
        return self.out

    def replay(self):
        self.out.copy_(self.fn().detach())


class FailingGraph(RecordingGraph):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


def _setup(seed=0):
    fp = make_model("vit")
    data = images(12, seed=seed)
    q = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), data[:8])
    cfg = OptimConfig(method="e2e", iters=8, batch_size=4, progress=False)
    (unit,) = _units(q, cfg, data[:1])
    for p in q.parameters():
        p.requires_grad_(False)
    for p in unit.params.values():
        p.requires_grad_(True)
    return fp.requires_grad_(False), q, cfg, unit, data


def _run(graph_factory=None, graphable=True, batches=None, warmup=2):
    teacher, student, cfg, unit, data = _setup()
    opt, sched = _make_optim(unit, cfg, graphable=graphable)
    graph = None
    if graph_factory is not None:
        graph = GraphedStep(graph_body(student, teacher, unit, cfg, opt), opt, warmup=warmup,
                            graph_factory=graph_factory)
    losses = []
    for b in batches or [data[i % 3 * 4:(i % 3 + 1) * 4] for i in range(7)]:
        losses.append(float(train_step(student, teacher, b, unit, cfg, opt, sched, graph=graph).detach()))
    return losses, [p.detach().clone() for p in unit.params.values()], graph, opt


def test_graphed_steps_equal_the_same_steps_run_eagerly():
    """Warm-up steps eager, then one capture and replays on the static batch: the losses and the trained parameters
    are those of the graphable step run eagerly every time, bit for bit."""
    RecordingGraph.captures = 0
    eager, p_eager, _, _ = _run(graph_factory=None, graphable=True)
    graphed, p_graphed, graph, _ = _run(graph_factory=RecordingGraph)
    assert graph.captured and RecordingGraph.captures == 1 and graph.calls == 7
    assert graphed == eager
    assert all(torch.equal(a, b) for a, b in zip(p_eager, p_graphed))
    assert len(set(graphed)) == len(graphed)  # every step moved the loss: the replays ran
    params = list(graph.opt.param_groups[0]["params"])
    before = [p._version for p in params]
    graph.release()  # replays run no Python: the versions move once at the end, for caches keyed on them
    assert [p._version for p in params] == [v + 1 for v in before] and not graph.captured


def test_graphable_adam_matches_torch_adam_to_rounding():
    """The graphable update ``p += (m / denom) * step`` against torch's ``addcdiv``: the same optimisation to float
    rounding (the package's eager HostAdam is torch's bit for bit)."""
    graphable, p_a, _, _ = _run(graphable=True)
    plain, p_b, _, _ = _run(graphable=False)
    assert graphable == pytest.approx(plain, rel=1e-5)
    for a, b in zip(p_a, p_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_graphable_adam_state_dict_resumes_into_torch_adam():
    g = torch.Generator().manual_seed(0)
    p = [torch.randn(6, 5, generator=g).requires_grad_(), torch.randn(4, generator=g).requires_grad_()]
    opt = HostAdam([{"params": p, "lr": 1e-2}], graphable=True)
    for _ in range(3):
        for t in p:
            t.grad = torch.randn(t.shape, generator=g)
        opt.step()
    sd = opt.state_dict()
    assert all(s["step"] == 3 for s in sd["state"].values()) and "_lowbit_dev" not in sd["param_groups"][0]
    ref = torch.optim.Adam([{"params": [t.detach().clone().requires_grad_() for t in p], "lr": 1e-2}])
    ref.load_state_dict(copy.deepcopy(sd))  # (loading shares the state's tensors: one copy each)
    again = HostAdam([{"params": p, "lr": 1e-2}], graphable=True)
    again.load_state_dict(copy.deepcopy(sd))
    grads = [torch.randn(t.shape, generator=g) for t in p]
    for t, gr in zip(p, grads):
        t.grad = gr
    for t, gr in zip(ref.param_groups[0]["params"], grads):
        t.grad = gr.clone()
    again.step()
    ref.step()
    for a, b in zip(p, ref.param_groups[0]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_other_shapes_run_eagerly_and_a_failed_capture_falls_back(capsys):
    teacher, student, cfg, unit, data = _setup()
    batches = [data[:4], data[4:8], data[8:12], data[:4], data[:2], data[4:8]]  # one short batch after capture
    eager, _, _, _ = _run(graph_factory=None, batches=batches)
    graphed, _, graph, _ = _run(graph_factory=RecordingGraph, batches=batches)
    assert graphed == eager and graph.captured
    failed, _, graph, _ = _run(graph_factory=FailingGraph)
    eager7, _, _, _ = _run(graph_factory=None)
    assert failed == eager7 and graph.failed and not graph.captured
    err = capsys.readouterr().err
    assert err.count("warning: the optimiser step could not be captured") == 1 and "--no-cuda-graph" in err


def test_graphed_step_needs_a_graphable_adam_and_the_switch():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="graphable"):
        GraphedStep(lambda x: x.sum(), HostAdam([p]))
    cfg = OptimConfig(iters=1)
    assert cfg.cuda_graph and not use_cuda_graph(cfg, torch.device("cpu"))
    assert use_cuda_graph(cfg, torch.device("cuda")) and not use_cuda_graph(OptimConfig(iters=1, cuda_graph=False),
                                                                             torch.device("cuda"))


def test_cli_flag_turns_graphs_off():
    from quant.run import build_parser
    assert build_parser().parse_args(["--model", "demo", "--bits", "w4a4", "--no-cuda-graph"]).no_cuda_graph
    assert not build_parser().parse_args(["--model", "demo", "--bits", "w4a4"]).no_cuda_graph
