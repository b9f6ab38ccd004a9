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
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor


class HostAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (no weight decay, amsgrad or maximize) whose step counts live on the host.

    The state's ``step`` tensors are written when the state is read (:meth:`state_dict`), not every step; ``beta2``
    and a step's ``sqrt(1 - beta2^t)`` enter as float32 0-d tensors on the parameters' device, the value the float32
    update rounds a Python float to, so the update is unchanged while the CPU's per-tensor fallback of the
    ``torch._foreach_*`` op does not wrap a Python scalar into a tensor once per parameter."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=True)
        self._steps: Dict[Tensor, int] = {}
        self._consts: Dict[tuple, Tensor] = {}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._steps = {}

    def state_dict(self) -> dict:
        with torch.no_grad():
            for p, t in self._steps.items():
                self.state[p]["step"].fill_(float(t))
        return super().state_dict()

    def _const(self, v: float, like: Tensor) -> Tensor:
        key = (v, like.device)
        t = self._consts.get(key)
        if t is None:
            t = self._consts[key] = torch.full((), v, dtype=torch.float32, device=like.device)
        return t

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("HostAdam.step takes no closure")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params: List[Tensor] = []
            grads, exp_avgs, exp_avg_sqs, counts = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self._steps[p] = 0
                elif p not in self._steps:
                    self._steps[p] = int(st["step"])  # once, after load_state_dict (a CPU tensor)
                self._steps[p] += 1
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(st["exp_avg"])
                exp_avg_sqs.append(st["exp_avg_sq"])
                counts.append(float(self._steps[p]))
            if not params:
                continue
            like = params[0]
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, self._const(beta2, like))
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            step_size = [(group["lr"] / (1 - beta1 ** t)) * -1 for t in counts]
            bias_correction2_sqrt = [(1 - beta2 ** t) ** 0.5 for t in counts]
            denom = torch._foreach_sqrt(exp_avg_sqs)
            if len(set(counts)) == 1 and all(p.device == like.device for p in params):
                torch._foreach_div_(denom, torch.full((), bias_correction2_sqrt[0], dtype=torch.float32,
                                                      device=like.device))
            else:
                torch._foreach_div_(denom, bias_correction2_sqrt)
            if like.device.type == "cpu":  # the per-tensor fallback: a 0-d tensor each, not a wrapped scalar
                torch._foreach_add_(denom, [self._const(group["eps"], like)] * len(denom))
            else:  # (one kernel for the list; the single-tensor overload would read the tensor back)
                torch._foreach_add_(denom, group["eps"])
            torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)
        return None
