"""Adam as ``torch.optim.Adam`` computes it, with no read of a tensor back to the host.

``torch.optim.Adam`` without ``capturable`` or ``fused`` keeps each parameter's step count in a tensor and reads it
(``.item()``) for the bias corrections of every parameter on every step; ``fused=True`` avoids that but rounds
differently. :class:`HostAdam` keeps the counts on the host as well (read once from the state after
``load_state_dict``) and runs the multi-tensor update of ``torch.optim.Adam(foreach=True)`` with them::

    m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

(bias corrections in Python floats, as torch computes them): bit-identical to ``torch.optim.Adam``'s single-tensor
and foreach updates, with the same ``state_dict`` (a checkpoint of either loads into the other). Per step: one
``torch._foreach_*`` op each for the moments, the denominator and the update, and one 0-d tensor for the step's
bias correction.

``graphable=True`` (a step captured in a CUDA graph, :mod:`quant.graph_step`): :meth:`HostAdam.prepare` (host) fills
this step's ``-lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)`` into device tensors and :meth:`HostAdam.update` (device
ops only) applies ``p += (m / denom) * step``: equal to torch's Adam to rounding.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor


class HostAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (no weight decay, amsgrad or maximize) whose step counts live on the host.

    The state's ``step`` tensors are written when the state is read (:meth:`state_dict`), not every step; ``beta2``
    and a step's ``sqrt(1 - beta2^t)`` enter as float32 0-d tensors on the parameters' device, the value the float32
    update rounds a Python float to, so the update is unchanged while the CPU's per-tensor fallback of the
    ``torch._foreach_*`` op does not wrap a Python scalar into a tensor once per parameter."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, graphable: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=True)
        self.graphable = bool(graphable)
        self._steps: Dict[Tensor, int] = {}
        self._consts: Dict[tuple, Tensor] = {}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._steps = {}

    def state_dict(self) -> dict:
        with torch.no_grad():
            for p, t in self._steps.items():
                self.state[p]["step"].fill_(float(t))
        sd = super().state_dict()
        for g in sd["param_groups"]:
            g.pop("_lowbit_dev", None)
        return sd

    def _const(self, v: float, like: Tensor) -> Tensor:
        key = (v, like.device)
        t = self._consts.get(key)
        if t is None:
            t = self._consts[key] = torch.full((), v, dtype=torch.float32, device=like.device)
        return t

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every parameter that has a gradient (``graphable``: :meth:`prepare` then :meth:`update`)."""
        if closure is not None:
            raise ValueError("HostAdam.step takes no closure")
        if self.graphable:
            self.prepare()
            self.update()
            return None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            counts = [float(self._count(p)) for p in params]
            step_size = [(group["lr"] / (1 - beta1 ** t)) * -1 for t in counts]
            bc2 = [(1 - beta2 ** t) ** 0.5 for t in counts]
            if len(set(counts)) == 1:
                bc2 = torch.full((), bc2[0], dtype=torch.float32, device=params[0].device)
            self._apply(group, params, step_size, bc2)
        return None

    def prepare(self) -> None:
        """``graphable``, the host half of a step, outside a captured CUDA graph: one more step for every parameter
        that requires grad (all of them get gradients in the optimiser's units) and this step's
        ``-lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)`` filled into the group's 0-d device tensors, which
        :meth:`update` (inside the graph) reads: each replay takes this step's values."""
        self._opt_called = True  # (what torch's LR scheduler looks for: this is the optimiser's step)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.requires_grad]
            if not params:
                continue
            counts = {self._count(p) for p in params}
            if len(counts) != 1:
                raise RuntimeError("a graphed Adam step needs every parameter of a group at the same step count")
            t = float(counts.pop())
            dev = self._group_tensors(group, params[0])
            dev[0].fill_((group["lr"] / (1 - beta1 ** t)) * -1)
            dev[1].fill_((1 - beta2 ** t) ** 0.5)

    def update(self) -> None:
        """``graphable``, the device half of a step (after :meth:`prepare`): device ops only, no host read, so a
        CUDA graph can capture it. The update is ``p += (m / denom) * step_size`` with ``step_size`` the device
        tensor (``addcdiv``'s scalar list would be frozen into the graph): equal to torch's Adam to rounding, not
        bit for bit."""
        with torch.no_grad():
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    self._apply(group, params, *self._group_tensors(group, params[0]))

    def _count(self, p: Tensor) -> int:
        """``p``'s step count after this step (its state created on the first)."""
        st = self.state[p]
        if not st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._steps[p] = 0
        elif p not in self._steps:
            self._steps[p] = int(st["step"])  # once, after load_state_dict (a CPU tensor)
        self._steps[p] += 1
        return self._steps[p]

    def _apply(self, group: dict, params: List[Tensor], step_size, bc2) -> None:
        beta1, beta2 = group["betas"]
        like = params[0]
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, self._const(beta2, like))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bc2)
        if like.device.type == "cpu":  # the per-tensor fallback: a 0-d tensor each, not a wrapped scalar
            torch._foreach_add_(denom, [self._const(group["eps"], like)] * len(denom))
        else:  # (one kernel for the list; the single-tensor overload would read the tensor back)
            torch._foreach_add_(denom, group["eps"])
        if torch.is_tensor(step_size):
            upd = torch._foreach_div(exp_avgs, denom)
            torch._foreach_mul_(upd, step_size)
            torch._foreach_add_(params, upd)
        else:
            torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)

    def _group_tensors(self, group: dict, like: Tensor) -> Tuple[Tensor, Tensor]:
        """The persistent ``(step_size, bias_correction2_sqrt)`` 0-d tensors of ``group`` (graphable mode)."""
        t = group.get("_lowbit_dev")
        if t is None or t[0].device != like.device:
            t = group["_lowbit_dev"] = tuple(torch.zeros((), dtype=torch.float32, device=like.device)
                                             for _ in range(2))
        return t
