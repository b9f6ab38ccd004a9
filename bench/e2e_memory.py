"""Accelerator memory of one e2e optimisation step, computed from tensor sizes (runs on the CPU, no GPU needed).

``python -m bench.e2e_memory --model vit_base_patch16_224 --bits w4a4 --batch 32 --gpus 1,8``

Counts, in bytes:

- static: FP teacher parameters, student parameters and buffers, one gradient and two Adam moments per trainable
  parameter (all fp32), plus under DDP one gradient bucket copy;
- saved for backward: the unique storages autograd keeps from the student's forward (``saved_tensors_hooks``),
  measured at two batch sizes and split into a batch-independent part (fake-quantized / folded weight copies) and a
  per-image part.

Per GPU at a global batch ``B`` over ``N`` GPUs: ``static + fixed + per_image * B / N``. Not counted: the CUDA
context, the teacher's transient activations, the backward's temporaries and allocator slack (budget ~1.3-1.5x).
"""
from __future__ import annotations

import argparse
import copy

import torch


def _saved_bytes(student, teacher, x, cfg) -> int:
    from quant.optimize import e2e_loss

    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = e2e_loss(student, teacher, x, cfg)["total"]
    loss.backward()
    student.zero_grad(set_to_none=True)
    return sum(seen.values())


def measure(model: str, bits: str, batches=(1, 3), model_args=None) -> dict:
    import timm

    from quant.calibrate import calibrate
    from quant.optimize import OptimConfig
    from quant.surgery import quantize_model

    torch.manual_seed(0)
    fp = timm.create_model(model, pretrained=False, **(model_args or {})).eval()
    size = fp.patch_embed.img_size
    x = torch.randn(max(batches), 3, *size)
    q = calibrate(quantize_model(copy.deepcopy(fp), bits), x[:1])
    n_fp = sum(p.numel() for p in fp.parameters())
    n_q = sum(p.numel() for p in q.parameters()) + sum(b.numel() for b in q.buffers())
    n_tr = sum(p.numel() for p in q.parameters() if p.requires_grad)
    saved = {b: _saved_bytes(q, fp, x[:b], OptimConfig()) for b in batches}
    lo, hi = min(batches), max(batches)
    per_image = (saved[hi] - saved[lo]) / (hi - lo)
    return {"model": model, "bits": bits, "teacher_bytes": 4 * n_fp, "student_bytes": 4 * n_q,
            "grad_adam_bytes": 12 * n_tr, "ddp_bucket_bytes": 4 * n_tr,
            "saved_fixed_bytes": saved[lo] - per_image * lo, "saved_per_image_bytes": per_image}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_base_patch16_224", help="timm name")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--batch", type=int, default=32, help="global batch")
    ap.add_argument("--gpus", default="1,8", help="comma list of GPU counts")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    m = measure(args.model, args.bits)
    g = 2 ** 30
    static = m["teacher_bytes"] + m["student_bytes"] + m["grad_adam_bytes"]
    print(f"{m['model']} {m['bits']}: teacher {m['teacher_bytes'] / g:.2f} GiB, student params+buffers "
          f"{m['student_bytes'] / g:.2f} GiB, grad+Adam {m['grad_adam_bytes'] / g:.2f} GiB, saved for backward "
          f"{m['saved_fixed_bytes'] / g:.2f} GiB + {m['saved_per_image_bytes'] / 2**20:.0f} MiB per image")
    for n in (int(v) for v in args.gpus.split(",")):
        per_gpu = static + m["saved_fixed_bytes"] + m["saved_per_image_bytes"] * args.batch / n
        per_gpu += m["ddp_bucket_bytes"] if n > 1 else 0
        print(f"  {n} GPU(s), global batch {args.batch} ({args.batch / n:g} per GPU): {per_gpu / g:.1f} GiB per GPU "
              f"before CUDA context and working space")


if __name__ == "__main__":
    main()
