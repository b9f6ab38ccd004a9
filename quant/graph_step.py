"""One CUDA graph per optimiser unit: the step (loss, backward, Adam update) captured once, then replayed.

A step of :func:`quant.optimize.train_step` launches a few thousand small kernels and reads nothing back to the
host, so on a GPU it is bound by the host's launch rate; a captured graph replays all of them in one launch.
:class:`GraphedStep` runs the first ``warmup`` steps eagerly (on a side stream, as capture requires: kernels
compiled, Adam's state and the caches allocated), captures the next one on a static copy of the batch, and from
then on copies each batch into that buffer and replays::

    opt.prepare()            host: step counts; this step's lr / (1 - beta1^t), sqrt(1 - beta2^t) into 0-d tensors
    static_x.copy_(x)
    graph.replay()           device: zero grads, loss, backward, opt.update() reading those tensors
    sched.step()             host: the next learning rate

The optimiser is a :class:`quant.adam.HostAdam` in ``graphable`` mode (its only per-step values live in device
tensors). Every replay runs the kernels the capture recorded, so a graphed step gives the losses of the same step
run eagerly in graphable mode (``bench.gpu`` compares them); the returned loss is a copy (the graph's own output
is overwritten by the next replay). Shapes must stay fixed: a batch of another shape (a last, smaller batch) runs
eagerly. ``graph_factory`` stands in for ``torch.cuda.CUDAGraph`` (tests on machines without a GPU).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Optional

import torch
from torch import Tensor


class _CudaGraph:
    """``torch.cuda.CUDAGraph`` behind the two calls :class:`GraphedStep` makes: ``capture(fn)`` records ``fn()``
    without running it and returns its (static) output; ``replay()`` runs what was recorded."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], Tensor]) -> Tensor:
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class GraphedStep:
    """``step(x) -> loss`` of ``body(x)`` (zero grads, loss, backward, ``opt.update()``; nothing read back), with
    ``opt.prepare()`` before each call; captured into a graph after ``warmup`` eager calls (see the module
    docstring). ``graph_factory()`` makes the graph (default: a CUDA graph); a capture that fails falls back to
    eager steps with one warning."""

    def __init__(self, body: Callable[[Tensor], Tensor], opt, warmup: int = 3,
                 graph_factory: Optional[Callable[[], object]] = None):
        if not getattr(opt, "graphable", False):
            raise ValueError("a graphed step needs HostAdam(..., graphable=True)")
        self.body, self.opt, self.warmup = body, opt, int(warmup)
        self.graph_factory = graph_factory or _CudaGraph
        self.calls = 0
        self.graph = None
        self.failed = False
        self.static_x: Optional[Tensor] = None
        self.static_loss: Optional[Tensor] = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _stream(self, x: Tensor):
        if x.is_cuda:  # warm-up and capture off the default stream (what torch.cuda.graph expects)
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            return side, torch.cuda.stream(side)
        return None, contextlib.nullcontext()

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.opt.prepare()
        if self.graph is None and (self.failed or self.calls <= self.warmup):
            return self._eager(x)
        if self.graph is None:
            return self._capture(x)
        if x.shape != self.static_x.shape or x.dtype != self.static_x.dtype or x.device != self.static_x.device:
            return self.body(x)  # (a batch of another shape: eager, the graph kept for the next one)
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_loss.detach().clone()

    def release(self) -> None:
        """End of the unit: drop the graph, and move the version counter of every parameter the replays changed (a
        replay runs no Python, so caches keyed on a tensor's version would not see its new values otherwise)."""
        if self.graph is not None:
            for group in self.opt.param_groups:
                for p in group["params"]:
                    torch.autograd.graph.increment_version(p)
        self.graph = self.static_x = self.static_loss = None

    def _eager(self, x: Tensor) -> Tensor:
        side, ctx = self._stream(x)
        with ctx:
            loss = self.body(x)
        if side is not None:
            torch.cuda.current_stream(x.device).wait_stream(side)
        return loss

    def _capture(self, x: Tensor) -> Tensor:
        self.static_x = x.detach().clone()
        graph = self.graph_factory()
        side, ctx = self._stream(x)
        try:
            with ctx:
                self.static_loss = graph.capture(lambda: self.body(self.static_x))
            if side is not None:
                torch.cuda.current_stream(x.device).wait_stream(side)
        except Exception as e:  # an op that cannot be captured: the rest of this unit runs eagerly
            self.failed, self.static_x, self.static_loss = True, None, None
            print(f"warning: the optimiser step could not be captured as a CUDA graph ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); running it eagerly (pass --no-cuda-graph to skip "
                  f"the attempt)", file=sys.stderr)
            return self._eager(x)  # (this step's prepare() stands: the eager body reads the same tensors)
        self.graph = graph
        graph.replay()  # capturing records the step without running it
        return self.static_loss.detach().clone()
