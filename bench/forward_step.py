"""e2e step time of the two ``"quant"`` forwards: ``python -m bench.forward_step [--bits w4a4,w1.58a8]``.

One e2e optimisation step (loss of the student against the frozen FP teacher, backward, Adam step) of the demo
model on a batch of ``--batch-size`` CIFAR-sized random images, with the integer forward (``--forward int``) and the
float fake-quant forward (``--forward fake``), timed round-robin in one process (so both see the same machine load),
on ``--threads`` intra-op threads; prints the median of ``--rounds`` steps per forward and their ratio.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import List, Optional


def measure(bits: str, rounds: int, batch_size: int, seed: int = 0) -> dict:
    """Median seconds per e2e step of each forward (after one warm-up step each)."""
    import torch

    from lowbit.models import load_model
    from quant.calibrate import calibrate
    from quant.modules import FORWARDS, set_forward
    from quant.optimize import OptimConfig, e2e_loss
    from quant.surgery import quantize_model

    torch.manual_seed(seed)
    fp = load_model("demo")
    x = torch.randn(batch_size, 3, 32, 32)
    student = calibrate(quantize_model(copy.deepcopy(fp), bits), x)
    cfg = OptimConfig(progress=False)
    models = {f: copy.deepcopy(student) for f in FORWARDS}
    opts = {}
    for f, m in models.items():
        set_forward(m, f)
        opts[f] = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    times = {f: [] for f in FORWARDS}
    for _ in range(rounds + 1):
        for f, m in models.items():
            t0 = time.perf_counter()
            opts[f].zero_grad()
            e2e_loss(m, fp, x, cfg)["total"].backward()
            opts[f].step()
            times[f].append(time.perf_counter() - t0)
    return {f: statistics.median(t[1:]) for f, t in times.items()}


def main(argv: Optional[List[str]] = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m bench.forward_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", default="w4a4,w1.58a8")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.batch_size < 1 or args.threads < 1:
        print("error: --rounds, --batch-size and --threads must be >= 1", file=sys.stderr)
        return 2
    from lowbit.bits import parse_bits
    bits_list = [b.strip() for b in args.bits.split(",") if b.strip()]
    try:
        for b in bits_list:
            if parse_bits(b).act_float:
                raise ValueError(f"{b} keeps activations in float: there is no integer forward")
    except ValueError as e:
        print(f"error: --bits: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"| bits | int forward (ms/step) | fake forward (ms/step) | int / fake |\n|---|---|---|---|")
    for bits in bits_list:
        t = measure(bits, args.rounds, args.batch_size)
        print(f"| {bits.upper()} | {1000 * t['int']:.0f} | {1000 * t['fake']:.0f} | {t['int'] / t['fake']:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
