"""``python -m bench.optimizer_overhead [--models vit_s,deit_b,swin_b] [--bits w4a4] [--batch 32] [--json OUT]``:
what one steady-state e2e optimiser step costs the host, against a plain fp32 distillation step of the same timm
model (teacher forward, student forward, per-block MSE + KL, backward, Adam), on any machine (CPU tensors).

Counted per step (the third of three, after two warm-up steps), with ``torch.profiler``:

* **host-device syncs**: ``aten::_local_scalar_dense`` events (every ``.item()``, ``float(t)``, ``bool(t)``);
  on a GPU each one drains the queue, so the host's time adds to the device's instead of hiding under it;
* **aten ops**: every ``aten::`` event (nested ones too, the same rule for both steps), and the **dispatched ops**:
  the outermost operator calls that reach a backend (``TorchDispatchMode``), each at least one kernel launch on a
  GPU (``torch._foreach_*`` ops count once, as on a GPU; the CPU's profiler lists them once per tensor);
* **Triton launches**: the step once more on the Triton path (``kernels.ops.set_backend("triton")``) with every launch
  replaced by a counter (the kernels' outputs are left unwritten: counts only);
* **step milliseconds** on this machine (median of ``--repeats`` steps, no profiler): CPU compute included, so
  read it as a ratio to the plain step's.

The e2e step is :func:`quant.optimize.train_step`, the function :func:`quant.optimize.optimize` runs; the model
is random-init (no weights are needed to count), calibrated on 4 random images.
"""
from __future__ import annotations

import argparse
import collections
import copy
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable, List, Optional

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from calib.common import atomic_write_json, atomic_write_text
from kernels import ops
from kernels.launch import Launch
from lowbit.models import resolve
from quant.calibrate import calibrate
from quant.optimize import OptimConfig, _Capture, _make_optim, _units, kl_logits, train_step
from quant.surgery import blocks, quantize_model

#: small stand-in for the test suite
TINY = ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10))


def build(model: str, seed: int = 0):
    """``(timm name, fp model, input size)`` of a random-init model alias (``tiny``: :data:`TINY`)."""
    name, cfg = TINY if model == "tiny" else (resolve(model).timm_name, {})
    torch.manual_seed(seed)
    fp = timm.create_model(name, pretrained=False, **cfg).eval()
    return name, fp, fp.patch_embed.img_size[0]


@contextmanager
def counted_launches(counter: collections.Counter, stub: bool = True):
    """Triton path, ``counter[kernel name] += 1`` per :class:`kernels.launch.Launch`; with ``stub`` the launch is
    only counted (CPU tensors: nothing computed), else it runs too (on a GPU)."""
    real = Launch.__call__

    def call(self):
        counter.update([getattr(self.kernel, "__name__", "autotuned")])
        if not stub:
            real(self)
    Launch.__call__ = call
    ops.set_backend("triton")
    try:
        yield counter
    finally:
        ops.set_backend(None)
        Launch.__call__ = real


class _Dispatched(TorchDispatchMode):
    """Counts the operator calls that reach a backend (outermost: what a GPU would launch)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def profile_counts(step: Callable[[], object]) -> dict:
    """``{"syncs", "aten_ops", "dispatched_ops", "top_ops"}`` of one call of ``step``: ``torch.profiler`` CPU
    events, then the dispatched operator calls of a second call (:class:`_Dispatched`)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names = collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    mode = _Dispatched()
    with mode:
        step()
    return {"syncs": names.get("aten::_local_scalar_dense", 0), "aten_ops": sum(names.values()),
            "dispatched_ops": sum(mode.ops.values()), "top_ops": dict(mode.ops.most_common(12))}


def median_ms(step: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def e2e_stepper(fp: torch.nn.Module, bits: str, x: torch.Tensor) -> Callable[[], object]:
    """One :func:`quant.optimize.train_step` of ``e2e`` per call, on ``x`` (optimiser and schedule kept)."""
    student = calibrate(quantize_model(copy.deepcopy(fp), bits), x[:4])
    cfg = OptimConfig(method="e2e", iters=1000, batch_size=x.shape[0], progress=False)
    (unit,) = _units(student, cfg, x[:1])
    for p in student.parameters():
        p.requires_grad_(False)
    for p in unit.params.values():
        p.requires_grad_(True)
    opt, sched = _make_optim(unit, cfg)
    teacher = copy.deepcopy(fp).requires_grad_(False)
    return lambda: train_step(student, teacher, x, unit, cfg, opt, sched)


def plain_stepper(fp: torch.nn.Module, x: torch.Tensor, temperature: float = 4.0) -> Callable[[], object]:
    """One plain fp32 distillation step of a trainable copy of the timm model per call: teacher forward (no grad),
    student forward, per-block MSE + KL, backward, ``torch.optim.Adam`` as on a GPU (its default there: the
    multi-tensor ``foreach`` update, a few ops for all parameters; the CPU's default loops over them)."""
    student = copy.deepcopy(fp).train(False).requires_grad_(True)
    teacher = copy.deepcopy(fp).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=1e-5, foreach=True)

    def step():
        with torch.no_grad(), _Capture(blocks(teacher)) as tc:
            t_logits = teacher(x)
        with _Capture(blocks(student)) as sc:
            s_logits = student(x)
        loss = sum(F.mse_loss(s, t) for s, t in zip(sc.outputs, tc.outputs)) \
            + kl_logits(s_logits, t_logits, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def measure_steps(fp: torch.nn.Module, bits: str, x: torch.Tensor, repeats: int = 3) -> dict:
    """``{"plain", "e2e", "ratios"}``: counts and step times of the plain fp32 step and of the e2e step of ``fp``
    at ``bits`` on batch ``x`` (on ``x``'s device; the model is moved there). On the CPU the e2e step runs twice,
    on the reference path (``"e2e"``) and on the Triton path with stubbed launches (``"triton_path"``); on a GPU
    once, on the Triton path, its launches counted as they run."""
    fp = fp.to(x.device)
    gpu = x.is_cuda
    out = {}
    for key, make in (("plain", lambda: plain_stepper(fp, x)), ("e2e", lambda: e2e_stepper(fp, bits, x))):
        step = make()
        step(), step()  # warm-up: optimiser state allocated, memos filled, kernels compiled
        res = profile_counts(step)
        res["step_ms"] = median_ms(step, repeats)
        if key == "e2e":
            launches: collections.Counter = collections.Counter()
            try:
                with counted_launches(launches, stub=not gpu):
                    step()
                    launches.clear()
                    tri = profile_counts(step)
                    tri["launches"] = dict(launches)
                    tri["launches_total"] = sum(launches.values())
            except ValueError as err:  # a value check on the host read the unwritten outputs
                tri = {"error": f"{type(err).__name__}: {err}"}
            res["triton_path"] = tri
        out[key] = res
    p, e = out["plain"], out["e2e"]
    out["ratios"] = {"aten_ops": e["aten_ops"] / p["aten_ops"], "dispatched_ops": e["dispatched_ops"] /
                     p["dispatched_ops"], "step_ms": e["step_ms"] / p["step_ms"]}
    if "aten_ops" in e["triton_path"]:
        t = e["triton_path"]
        out["ratios"]["aten_ops_triton_path"] = t["aten_ops"] / p["aten_ops"]
        out["ratios"]["dispatched_ops_triton_path"] = t["dispatched_ops"] / p["dispatched_ops"]
    return out


def measure(model: str = "vit_s", bits: str = "w4a4", batch: int = 32, repeats: int = 3) -> dict:
    """:func:`measure_steps` of a random-init model alias on CPU tensors."""
    name, fp, size = build(model)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    return {"model": model, "timm_name": name, "bits": bits, "batch": batch, "torch": torch.__version__,
            "threads": torch.get_num_threads(), **measure_steps(fp, bits, x, repeats)}


def table(results: List[dict]) -> str:
    rows = [("model / bits / batch", "step", "syncs", "aten ops", "x plain", "dispatched", "x plain",
             "Triton launches", "step ms")]
    for r in results:
        head = f"{r['model']} {r['bits']} b{r['batch']}"
        p, e, t, q = r["plain"], r["e2e"], r["e2e"]["triton_path"], r["ratios"]
        rows.append((head, "plain fp32", str(p["syncs"]), f"{p['aten_ops']:,}", "1.00", f"{p['dispatched_ops']:,}",
                     "1.00", "-", f"{p['step_ms']:.0f}"))
        rows.append(("", "e2e (CPU path)", str(e["syncs"]), f"{e['aten_ops']:,}", f"{q['aten_ops']:.2f}",
                     f"{e['dispatched_ops']:,}", f"{q['dispatched_ops']:.2f}", "-", f"{e['step_ms']:.0f}"))
        if "error" in t:
            rows.append(("", "e2e (Triton path)", "-", "-", "-", "-", "-", "-", t["error"][:60]))
        else:
            rows.append(("", "e2e (Triton path)", str(t["syncs"]), f"{t['aten_ops']:,}",
                         f"{q['aten_ops_triton_path']:.2f}", f"{t['dispatched_ops']:,}",
                         f"{q['dispatched_ops_triton_path']:.2f}", str(t["launches_total"]), "-"))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(row)) for row in rows)


def markdown(results: List[dict]) -> str:
    """``bench/OPTIMIZER.md``: the table of :func:`table` with the machine and versions, from the results alone."""
    rows = table(results).splitlines()
    cells = [[c.strip() for c in line.split("  ") if c.strip()] for line in rows]
    width = len(cells[0])
    out = ["# Host cost of one optimiser step", "",
           "`python -m bench.optimizer_overhead` (CPU tensors; counts do not depend on the batch size, step times "
           "do and include the CPU's compute). Plain fp32 = the timm model's distillation step with "
           "`torch.optim.Adam(foreach=True)`; dispatched ops = operator calls that reach a backend (a kernel launch "
           "each on a GPU, views aside); aten ops = every profiler event, nested ones too.", "",
           "| " + " | ".join(cells[0]) + " |", "|" + " --- |" * width]
    for line in rows[1:]:
        c = [x.strip() for x in line.split("  ") if x.strip()]
        if len(c) == width - 1:  # a continuation row: no model column
            c = [""] + c
        out.append("| " + " | ".join(c) + " |")
    r0 = results[0]
    out += ["", f"torch {r0['torch']}, {r0['threads']} threads; models random-init, calibrated on 4 random images; "
            f"the Triton path's launches are counted, not run (outputs unwritten)."]
    return "\n".join(out) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.optimizer_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vit_s,deit_b,swin_b", help="comma list of model aliases, or 'tiny'")
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--md", help="write the table as markdown here (e.g. bench/OPTIMIZER.md)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        print("error: --batch and --repeats must be >= 1", file=sys.stderr)
        return 2
    results = []
    for m in args.models.split(","):
        try:
            results.append(measure(m, args.bits, args.batch, args.repeats))
        except KeyError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(table(results[-1:]), flush=True)
    if args.json:
        atomic_write_json({"results": results}, args.json)
    if args.md:
        atomic_write_text(markdown(results), args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
