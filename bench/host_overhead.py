"""``python -m bench.host_overhead [--model vit_b] [--bits w4a4] [--iters 20] [--json OUT]``: the host (Python)
time of an exported model's eager forward on the Triton path, with every kernel launch replaced by a counter.

Runs on any machine (CPU tensors, ``kernels.ops.set_backend("triton")``; nothing is computed by the kernels, so the
outputs are meaningless): what remains is the per-call cost that makes eager GPU forwards host-bound (argument
checks, quantizer preparation, launch building, torch ops between the kernels). Prints launches per forward by
kernel and the median milliseconds per forward (batch 1, random-init model calibrated on 2 random images). The
Triton launch itself (``kernel[grid](...)``) is not included: on a GPU add its cost per launch.
"""
from __future__ import annotations

import argparse
import collections
import copy
import os
import statistics
import sys
import tempfile
import time
from typing import List, Optional

import torch

import export
from bench.optimizer_overhead import TINY, build, counted_launches
from calib.common import atomic_write_json
from quant.calibrate import calibrate
from quant.surgery import quantize_model


def measure(model: str = "vit_b", bits: str = "w4a4", iters: int = 20, repeats: int = 5) -> dict:
    name, fp, size = build(model)
    q = calibrate(quantize_model(copy.deepcopy(fp), bits), torch.randn(2, 3, size, size))
    launches: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = export.export_model(q, os.path.join(tmp, "m.lowbit"), arch=model if model != "tiny" else name,
                                   config=TINY[1] if model == "tiny" else {}, bits=bits)
        m = export.load(path)
    x = torch.randn(1, 3, size, size)
    with counted_launches(launches), torch.inference_mode():
        m(x)
        launches.clear()
        m(x)
        per_forward = dict(launches)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                m(x)
            times.append(1e3 * (time.perf_counter() - t0) / iters)
    return {"model": model, "bits": bits, "launches": per_forward, "launches_total": sum(per_forward.values()),
            "host_ms_median": statistics.median(times), "host_ms_runs": times, "torch": torch.__version__}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b", help="model alias (quant.run --model), or 'tiny'")
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    if args.iters < 1 or args.repeats < 1:
        print("error: --iters and --repeats must be >= 1", file=sys.stderr)
        return 2
    r = measure(args.model, args.bits, args.iters, args.repeats)
    for k, v in sorted(r["launches"].items()):
        print(f"{k:32s} {v:5d} launches per forward")
    print(f"{'total':32s} {r['launches_total']:5d}")
    print(f"host time per forward (launches stubbed): {r['host_ms_median']:.2f} ms "
          f"(median of {args.repeats} x {args.iters})")
    if args.json:
        atomic_write_json(r, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
