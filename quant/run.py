"""``python -m quant.run``: quantize a timm ViT/DeiT/Swin and report FP vs quantized accuracy.

Pipeline: load the float model (hub or ``--checkpoint``), draw ``--calib-size`` images from ``--data``,
initialise the quantizers on the first ``--init-size`` (32) of them, optimise (``--method``), evaluate FP and
quantized top-1/top-5 on ``--val``, write ``report.json``, ``report.txt`` and ``quantized.pt`` into ``--out``.
The quantized model is evaluated as it is deployed: float tensors rounded to the checkpoint's fp16 and integer
arithmetic (``"int"`` mode, :mod:`quant.modules`), so its top-1 is that of the exported file on the CPU.

Everything is validated before work starts; outputs are written into a temporary folder renamed to ``--out`` at
the very end, so a failed run leaves no partial output. Exit status 2 and ``error: ...`` on bad input.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from calib import data as D
from calib import stream as S
from calib.augment import parse_augment
from calib.invert import PRIOR_NAMES, InvertConfig, write_image_folder
from export import export_model
from export.exporter import round_float_tensors_
from lowbit import packing
from lowbit.bits import parse_bits
from lowbit.errors import UserError, check_device
from lowbit.models import eval_transform, load_model, resolve
from quant import distributed as DI
from quant import fidelity as FI
from quant.calibrate import calibrate
from quant.correction import add_act_correction, train_act_correction
from quant.modules import (
    FORWARDS,
    SOFTMAX_QUANTIZERS,
    ActCorrection,
    QuantConv2dPatch,
    QuantLinear,
    quant_modules,
    set_forward,
    set_mode,
)
from quant.optimize import METHODS, OptimConfig, optimize
from quant.surgery import quantize_model

INVERT = "invert"
RUN_DEFAULTS = {"iters": 24000, "calib_size": 1024, "batch_size": 32, "val_size": None, "invert_steps": 200,
                "export": None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quant.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="alias (vit_s, vit_b, deit_t/s/b, swin_t/s/b) or any timm name")
    p.add_argument("--bits", required=True, help="w<W>a<A>, e.g. w1.58a8, w3a3, w4a4, w6a6, w8a8")
    p.add_argument("--data", default=INVERT,
                   help=f"ImageFolder of calibration images (labels unused), or '{INVERT}': classifier-only data-free "
                        f"images synthesized from the FP model (calib.invert)")
    p.add_argument("--val", default=None, help="ImageFolder (root/<class>/<img>, sorted class order) for top-1/top-5")
    p.add_argument("--val-size", type=int, default=None,
                   help="evaluate on this many images of --val (seeded; default all, demo: 2000)")
    p.add_argument("--calib-size", type=int, default=None,
                   help="calibration images drawn from --data (seeded; default 1024, demo: 128)")
    p.add_argument("--init-size", type=int, default=32, help="images used to initialise the quantizers")
    p.add_argument("--iters", type=int, default=None,
                   help="optimisation steps (blockwise: per block; default 24000, demo: 300)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32")
    p.add_argument("--invert-steps", type=int, default=None,
                   help=f"optimisation steps per batch of --data {INVERT} images (default 200, demo: 100)")
    p.add_argument("--synthesis", default="lowbit", choices=("lowbit", "psaq"),
                   help=f"patch-diversity loss of --data {INVERT}: lowbit (the package's) or psaq (PSAQ-ViT's "
                        f"patch-similarity entropy as published; calib.invert)")
    p.add_argument("--augment", default="none", metavar="OPS",
                   help="augment each optimisation batch: 'none' or a comma list of shift, flip, mix "
                        "(calib.augment; the teacher sees the same augmented images)")
    p.add_argument("--hard-steps", type=int, default=0,
                   help="move each optimisation batch this many signed-gradient steps up the student-teacher KL "
                        "(adaptive hard samples; each step costs about one more forward/backward)")
    p.add_argument("--hard-step-size", type=float, default=0.05, help="step of --hard-steps, in normalised units")
    p.add_argument("--invert-prior", default="auto", choices=("auto", *PRIOR_NAMES),
                   help="image prior of --data invert: smooth (strong TV, faint starting noise, random resized crops "
                        "and colour shifts), noise (the first recipe: weak TV from unit noise; calib.invert), mixed "
                        "(batches alternate smooth and noise), or auto: "
                        "smooth for 8-bit or float activations, mixed below (what measured better on the demo)")
    p.add_argument("--method", default="e2e", choices=METHODS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="output folder (must not exist unless --overwrite; default runs/<model>-<bits>-<method>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--checkpoint", default=None, help="local weights (.pth/.safetensors) instead of the hub")
    p.add_argument("--model-args", default=None, help='JSON kwargs for timm.create_model, e.g. \'{"img_size": 64}\'')
    p.add_argument("--lr-q", type=float, default=1e-3, help="lr of step sizes, zero points, rescale/shift")
    p.add_argument("--lr-w", type=float, default=None,
                   help="lr of the weight refinement (default 1e-4; is-vit: 4e-5, its authors')")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5/24 of --iters; is-vit: 0)")
    p.add_argument("--temperature", type=float, default=4.0, help="KL temperature T")
    p.add_argument("--l2", type=float, default=1e-5, help="weight of the refinement L2 term")
    p.add_argument("--no-rescale", action="store_true", help="disable the channel rescale/shift")
    p.add_argument("--act-correction", action="store_true",
                   help="DFQ-ViT activation correction: a learned [D, D] matrix per block, trained after --method")
    p.add_argument("--correction-iters", type=int, default=500, help="activation-correction steps")
    p.add_argument("--correction-lr", type=float, default=1e-4, help="activation-correction Adam lr")
    p.add_argument("--softmax-quantizer", default=None, choices=SOFTMAX_QUANTIZERS,
                   help="quantizer of the attention probabilities: uniform (integer P V) or sulq (I&S-ViT); "
                        "default uniform, is-vit: sulq (as its authors)")
    p.add_argument("--forward", default="int", choices=FORWARDS,
                   help="forward pass of the optimisation: int (the deployed integer arithmetic through "
                        "kernels.ops, straight-through/LSQ gradients) or fake (float fake-quant, for comparison)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast during optimisation (CUDA only)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="run each optimiser step eagerly on CUDA (default: captured once per unit as a CUDA graph)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint <out>.state.pt")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps, leaving the checkpoint for --resume (time-sliced jobs)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1) // 2,
                   help="DataLoader processes that decode the calibration images into the cache once, read the "
                        "calibration batches from it, and decode --val (0: all in the main process)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--fidelity-size", type=int, default=None,
                   help="held-out images for the label-free agreement/KL with the FP model (quant.fidelity; default "
                        "256 from --val/--data, 64 synthesized for --data invert; 0: skip)")
    p.add_argument("--export", default=None, metavar="PATH", help="also write the packed checkpoint here "
                   "(export.load, python -m export.infer); an existing file needs --overwrite; '<out>' stands for "
                   "--out (demo default: <out>/model.lowbit)")
    return p


@torch.no_grad()
def evaluate(models: Dict[str, nn.Module], folder: D.ImageFolder, transform, batch_size: int, device,
             size: Optional[int] = None, seed: int = 0, workers: int = 0) -> Dict[str, dict]:
    """Top-1/top-5 accuracy (%) of each model over the labelled images of ``folder`` (each batch decoded once)."""
    hits = {name: [0, 0] for name in models}
    n = 0
    for x, y in D.stream(folder, transform, batch_size, size, seed, workers):
        x = x.to(device)
        for name, model in models.items():
            logits = model(x).float().cpu()
            pred = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hits[name][0] += int((pred[:, 0] == y).sum())
            hits[name][1] += int((pred == y[:, None]).any(-1).sum())
        n += y.numel()
    return {name: {"top1": 100.0 * t1 / max(n, 1), "top5": 100.0 * t5 / max(n, 1), "images": n}
            for name, (t1, t5) in hits.items()}


def model_size(fp_model: nn.Module, student: nn.Module) -> dict:
    """Bytes of the float model (fp32) and of the deployed one: packed weight codes, fp32 scale + uint8 zero point
    per output channel, fp32 input step + uint8 zero point per activation quantizer, fp32 ``r``/``shift``, and every
    other float parameter (biases, norms, embeddings) in fp32."""
    fp = sum(p.numel() * 4 for p in fp_model.parameters())
    q = fp
    for m in quant_modules(student):
        if isinstance(m, (QuantLinear, QuantConv2dPatch)):
            n, k = m.weight.shape[0], m.weight[0].numel()
            fmt = packing.FORMATS[packing.format_for_bits(m.w_bits)]
            kp = packing.padded_k(k, fmt.name)
            q += sum(n * kp // per_byte for _, per_byte in fmt.planes) + n * 5 - m.weight.numel() * 4
            q += 5 * int(m.act.enabled)
            if getattr(m, "rescale", False):
                q += 8 * k
        else:
            q += 5 * sum(int(a.enabled) for a in (m.q_quant, m.k_quant, m.v_quant, m.p_quant))
    q += sum(m.matrix.numel() * 4 for m in student.modules() if isinstance(m, ActCorrection))
    return {"fp32_bytes": fp, "quantized_bytes": q}


def peak_memory(device: torch.device) -> dict:
    out = {"cpu_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def format_table(report: dict) -> str:
    """The report as an aligned two-column text table."""
    fp, q = report.get("fp") or {}, report.get("quantized") or {}
    lit = report["fp_top1_literature"]
    mem = " / ".join(f"{k.split('_')[0]} {v / 2**20:.0f}" for k, v in report["peak_memory"].items())
    acc = lambda d, k: f"{d[k]:.2f}" if k in d else "-"  # noqa: E731
    rows = [
        ("model", f"{report['model']} ({report['timm_name']})"),
        ("bits / method", f"{report['bits']} / {report['method']} ({report.get('forward', 'int')} forward)"),
        ("FP top-1 (reference)", "-" if lit is None else f"{lit:.2f}"),
        ("FP top-1 / top-5", f"{acc(fp, 'top1')} / {acc(fp, 'top5')}"),
        ("quantized top-1 / top-5", f"{acc(q, 'top1')} / {acc(q, 'top5')}"),
        FI.table_row(report.get("fidelity")),
        ("val images (skipped)", f"{q.get('images', '-')} ({report['skipped_images']['val']})"),
        ("calib images (skipped)", f"{report['calib_images']} ({report['skipped_images']['calib']})"),
        ("loss first -> last", "-" if not report["losses"] else
         f"{report['losses']['first']:.4g} -> {report['losses']['last']:.4g} ({report['steps']} steps)"),
        ("optimisation time (s)", "-" if not report.get("steps") else f"{report['optimize_s']:.1f}" + (
            "" if report.get("resumed") else f" ({1000 * report['optimize_s'] / report['steps']:.0f} ms/step)")),
        ("time (s)", f"{report['time_s']:.1f}"),
        ("peak memory (MiB)", mem),
        ("model size fp32 -> quantized (MiB)",
         f"{report['size']['fp32_bytes'] / 2**20:.2f} -> {report['size']['quantized_bytes'] / 2**20:.2f}"),
    ]
    if report.get("export"):
        rows.append(("exported model", f"{report['export']['path']} ({report['export']['bytes'] / 2**20:.2f} MiB; "
                                       "python -m export.infer --checkpoint PATH --val DIR)"))
    if report.get("out"):
        rows.append(("report and checkpoint", os.path.join(report["out"], "") + " (report.txt, report.json, "
                                              "quantized.pt)"))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a.ljust(w)}  {b}" for a, b in rows) + "\n"


def synthesize_calibration(fp_model: nn.Module, folder: str, args: argparse.Namespace) -> D.ImageFolder:
    """``--data invert``: classifier-only data-free images in ``folder`` (resumable: finished classes are kept)."""
    import math

    n_cls = int(getattr(fp_model, "num_classes", 0) or 0)
    if n_cls < 1:
        raise UserError(f"--data {INVERT} needs a classifier with a head (num_classes > 0)")
    if args.calib_size >= n_cls:
        per_class, classes = math.ceil(args.calib_size / n_cls), None
    else:
        gen = torch.Generator().manual_seed(args.seed)
        per_class, classes = 1, sorted(torch.randperm(n_cls, generator=gen)[: args.calib_size].tolist())
    write_image_folder(fp_model, folder, per_class, classes,
                       cfg=InvertConfig(steps=args.invert_steps, synthesis=args.synthesis, prior=args.invert_prior),
                       seed=args.seed, progress=not args.no_progress)
    return D.scan(folder, "--data")


def invert_prior(prior: str, bits) -> str:
    """``--invert-prior``, ``auto`` resolved for ``bits``: ``smooth`` for 8-bit or float activations, else ``mixed``
    (on the demo, e2e: smooth 66.43 / mixed 65.57 / noise 61.29 at W1.58A8; 73.01 / 73.82 / 73.43 at W4A4; 64.08 /
    66.37 / 66.35 at W3A3)."""
    if prior != "auto":
        return prior
    return "smooth" if bits.act_float or bits.a_bits >= 8 else "mixed"


def state_path(out: str) -> str:
    return os.path.abspath(out).rstrip(os.sep) + ".state.pt"


def cache_path(out: str) -> str:
    """The calibration cache (:func:`calib.stream.build_cache`), kept until the run completes (for --resume)."""
    return os.path.abspath(out).rstrip(os.sep) + ".calib"


def run(args: argparse.Namespace) -> dict:
    """The whole job for parsed ``args`` (see the module docstring); returns the report. ``--out`` is held
    (:func:`claim_out`) from the end of the checks to the end of the run."""
    try:
        return _run(args)
    finally:
        release_out(args.out)


def _run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    try:
        cfg_bits = parse_bits(args.bits)
    except ValueError as e:
        raise UserError(f"--bits: {e}") from None
    args.invert_prior = invert_prior(args.invert_prior, cfg_bits)
    if args.softmax_quantizer is None:
        args.softmax_quantizer = "sulq" if args.method == "is-vit" and not cfg_bits.act_float else "uniform"
    spec = resolve(args.model)
    export_given = args.export is not None
    for k, v in {**RUN_DEFAULTS, **(spec.run_defaults or {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = os.path.join("runs", f"{args.model.replace('/', '_')}-{cfg_bits.name}-{args.method}")
    if args.export is not None:
        args.export = args.export.replace("<out>", args.out)
    device = check_device(args.device)
    if args.bf16 and device.type != "cuda":
        raise UserError("--bf16 needs --device cuda (bf16 autocast is a GPU option)")
    for flag, v, lo in (("--calib-size", args.calib_size, 1), ("--init-size", args.init_size, 1),
                        ("--batch-size", args.batch_size, 1), ("--iters", args.iters, 0),
                        ("--hard-steps", args.hard_steps, 0), ("--save-every", args.save_every, 0),
                        ("--workers", args.workers, 0),
                        ("--stop-after", args.stop_after, 1), ("--invert-steps", args.invert_steps, 1),
                        ("--correction-iters", args.correction_iters, 0),
                        ("--fidelity-size", args.fidelity_size, 0), ("--val-size", args.val_size, 1)):
        if v is not None and v < lo:
            raise UserError(f"{flag} must be >= {lo}, got {v}")
    if not args.hard_step_size > 0:
        raise UserError(f"--hard-step-size must be > 0, got {args.hard_step_size}")
    try:
        augment = parse_augment(args.augment)
    except ValueError as e:
        raise UserError(f"--augment: {e}") from None
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise UserError(f"--out {args.out!r} already exists; pick another folder or pass --overwrite")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {args.out!r} is a file, not a folder; pick another path")
    writable_folder(out, "--out")
    claim_out(out)
    if args.export:
        if not export_given and (cfg_bits.act_float or args.act_correction or args.softmax_quantizer != "uniform"):
            args.export = None  # the model's default export does not apply to this configuration
        else:
            _check_export(args.export, args.overwrite, cfg_bits)
            if not os.path.abspath(args.export).startswith(out + os.sep):
                writable_folder(os.path.abspath(args.export), "--export")
    try:
        model_args = json.loads(args.model_args) if args.model_args else {}
        if not isinstance(model_args, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise UserError(f"--model-args must be a JSON object such as '{{\"img_size\": 64}}' ({e})") from None
    calib_folder = None if args.data == INVERT else D.scan(args.data, "--data")
    n_calib = args.calib_size if calib_folder is None else min(args.calib_size, len(calib_folder))
    speak = int(os.environ.get("RANK", "0")) == 0
    if n_calib < args.calib_size and speak:
        print(f"warning: --data holds {n_calib} images, fewer than --calib-size {args.calib_size}: calibrating on "
              f"{n_calib}", file=sys.stderr)
    if args.batch_size > n_calib:  # a batch would hold every image several times over (and the memory for it)
        if speak:
            print(f"warning: --batch-size {args.batch_size} is larger than the {n_calib} calibration images: "
                  f"using --batch-size {n_calib}", file=sys.stderr)
        args.batch_size = n_calib
    val_folder = D.scan(args.val, "--val") if args.val else None
    if (calib_folder is not None and val_folder is None and args.fidelity_size != 0
            and len(calib_folder) <= n_calib and speak):
        print(f"warning: --data has no images beyond the {n_calib} it calibrates on, so the fidelity check will "
              f"synthesize its held-out images (about one more synthesis batch of time); --val DIR or "
              f"--fidelity-size 0 avoids that", file=sys.stderr)
    if val_folder is not None and not val_folder.classes:
        raise UserError(f"--val folder {args.val!r} has no class sub-folders; lay it out as root/<class>/<img>")
    if args.stop_after is not None and not args.save_every:
        raise UserError("--stop-after needs checkpoints: pass --save-every N (N > 0)")
    if args.resume and not os.path.isfile(state_path(out)):
        raise UserError(f"--resume: no checkpoint at {state_path(out)!r}; run without --resume to start afresh")
    DI.check_args(args.method, args.device, args.batch_size)
    dist, device = DI.setup(device)  # torchrun: join the process group (this rank's cuda:LOCAL_RANK)

    torch.manual_seed(args.seed)
    fp_model = load_model(args.model, args.checkpoint, model_args)
    if val_folder is not None:
        warning = D.check_val_classes(val_folder, getattr(fp_model, "num_classes", None))
        if warning and dist.is_main:
            print(f"warning: {warning}", file=sys.stderr)
    transform = eval_transform(fp_model, spec)
    fp_model.to(device)

    def prepare_calibration() -> D.ImageFolder:
        folder = calib_folder if calib_folder is not None else synthesize_calibration(fp_model, out + ".invert",
                                                                                      args)
        S.build_cache(folder, transform, args.calib_size, cache_path(out), args.seed, args.workers,
                      progress=not args.no_progress)
        return folder

    calib_folder = dist.main_first(prepare_calibration)  # under torchrun rank 0 prepares, the others wait
    images = S.CachedImages(cache_path(out), transform, args.workers)
    try:
        student = quantize_model(copy.deepcopy(fp_model), cfg_bits, rescale=not args.no_rescale,
                                 softmax_quantizer=args.softmax_quantizer)
    except ValueError as e:
        raise UserError(f"--model {args.model}: {e}") from None
    calibrate(student, images.head(args.init_size).to(device))
    set_forward(student, args.forward)
    ocfg = OptimConfig(method=args.method, iters=args.iters, batch_size=args.batch_size, lr_q=args.lr_q,
                       lr_w=args.lr_w, warmup=args.warmup, temperature=args.temperature, l2=args.l2,
                       seed=args.seed, save_every=args.save_every, state_path=state_path(out), resume=args.resume,
                       bf16=args.bf16, cuda_graph=not args.no_cuda_graph, progress=not args.no_progress,
                       stop_after=args.stop_after, augment=augment,
                       hard_steps=args.hard_steps, hard_step_size=args.hard_step_size)
    fingerprint = {"model": args.model, "bits": cfg_bits.name, "calib_size": args.calib_size, "data": args.data,
                   **({"synthesis": args.synthesis, "prior": args.invert_prior} if args.data == INVERT else {}),
                   "model_args": model_args,
                   "rescale": not args.no_rescale,
                   "softmax_quantizer": args.softmax_quantizer, "forward": args.forward}
    t_opt = time.time()
    history = optimize(student, fp_model, images, ocfg, fingerprint, dist)
    t_opt = time.time() - t_opt
    if not history["completed"]:
        return {"completed": False, "steps": history["steps"], "state_path": ocfg.state_path, "rank": dist.rank}
    if not dist.is_main:  # the parameters are the same on every rank; rank 0 evaluates, exports and reports
        return {"completed": True, "steps": history["steps"], "rank": dist.rank}
    correction = None
    if args.act_correction:
        add_act_correction(student)
        correction = train_act_correction(student, fp_model, images, args.correction_iters, args.batch_size,
                                          args.correction_lr, progress=not args.no_progress)
    if not cfg_bits.act_float:
        round_float_tensors_(student)
        set_mode(student, "int")
    fp_acc = q_acc = None
    if val_folder is not None:
        accs = evaluate({"fp": fp_model, "quantized": student}, val_folder, transform, args.batch_size, device,
                        args.val_size, args.seed, args.workers)
        fp_acc, q_acc = accs["fp"], accs["quantized"]
    fidelity = FI.measure(fp_model, student, args, calib_folder, val_folder, transform, device)
    losses = history["losses"]
    report = {
        "model": args.model, "timm_name": spec.timm_name, "bits": cfg_bits.name, "method": args.method,
        "data": args.data,
        "fp_top1_literature": spec.fp_top1, "fp": fp_acc, "quantized": q_acc, "fidelity": fidelity,
        "calib_images": len(images), "init_images": min(args.init_size, len(images)),
        "skipped_images": {"calib": 0 if calib_folder is None else len(calib_folder.skipped),
                           "val": 0 if val_folder is None else len(val_folder.skipped)},
        "steps": history["steps"], "iters": args.iters, "forward": args.forward, "augment": list(augment),
        "invert_prior": args.invert_prior if args.data == INVERT else None,
        "optimize_s": t_opt,
        "resumed": bool(args.resume), "batch_size": args.batch_size, "seed": args.seed,
        "losses": {"first": losses[0], "last": losses[-1]} if losses else None,
        "time_s": time.time() - t0, "peak_memory": peak_memory(device), "size": model_size(fp_model, student),
        "device": str(device), "world_size": dist.world, "completed": True, "data_free": args.data == INVERT,
        "out": out,
        "eval_arithmetic": "float fake-quant (A16)" if cfg_bits.act_float else "int (the exported model's)",
        "act_correction": None if correction is None else {
            "steps": correction["steps"], "first": correction["losses"][0] if correction["losses"] else None,
            "last": correction["losses"][-1] if correction["losses"] else None},
    }
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if args.export:
            path = os.path.abspath(args.export)
            if path.startswith(out + os.sep):
                path = os.path.join(tmp, os.path.relpath(path, out))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            export_model(student, path, arch=args.model, config=model_args, bits=cfg_bits.name,
                         overwrite=args.overwrite)
            report["export"] = {"path": os.path.abspath(args.export), "bytes": os.path.getsize(path)}
        torch.save({"model": args.model, "timm_name": spec.timm_name, "bits": cfg_bits.name,
                    "model_args": model_args, "rescale": not args.no_rescale,
                    "softmax_quantizer": args.softmax_quantizer, "act_correction": args.act_correction,
                    "state_dict": {k: v.detach().cpu() for k, v in student.state_dict().items()}},
                   os.path.join(tmp, "quantized.pt"))
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(tmp, "report.txt"), "w") as f:
            f.write(format_table(report))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(ocfg.state_path):
        os.remove(ocfg.state_path)
    shutil.rmtree(out + ".invert", ignore_errors=True)
    images.close()
    shutil.rmtree(cache_path(out), ignore_errors=True)
    return report


_MADE: dict = {}


def lock_path(out: str) -> str:
    """The lock a running ``quant.run`` holds on its ``--out`` (its PID inside), removed when it ends."""
    return os.path.abspath(out).rstrip(os.sep) + ".lock"


def claim_out(out: str) -> None:
    """Take ``--out`` for this process (rank 0 under torchrun), or refuse while another live run holds it: two runs
    on one ``--out`` would replace each other's output. A lock left by a process that no longer runs is taken
    over."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    path = lock_path(out)
    made, folder = [], os.path.dirname(path)
    while not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _MADE[path] = made  # removed again if empty when the run ends
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(open(path).read().strip() or 0)
                if pid in (0, os.getpid()):
                    raise ProcessLookupError  # this process's own (an earlier run() in it), or unreadable
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                _remove(path)  # stale: its process is gone
                continue
            except PermissionError:
                pass  # alive, another user's
            raise UserError(f"--out {out!r} is being written by another quant.run (process {pid}); wait for it "
                            f"or pick another --out") from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return


def release_out(out: Optional[str]) -> None:
    """Remove this process's :func:`claim_out` lock, if it holds one."""
    if not out:
        return
    path = lock_path(out)
    try:
        if int(open(path).read().strip() or 0) == os.getpid():
            _remove(path)
    except (OSError, ValueError):
        pass
    for folder in _MADE.pop(path, []):  # deepest first: the folders claim_out made, if nothing else went there
        try:
            os.rmdir(folder)
        except OSError:
            break


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def writable_folder(path: str, flag: str) -> None:
    """Refuse, before any work, a ``path`` that cannot be created: its nearest existing ancestor must be a folder
    this process can write in (tried with a temporary file: permissions alone miss read-only file systems)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path!r}: {folder} is a file, not a folder; pick another path")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".lowbit-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"{flag} {path!r}: cannot write in {folder} ({e.strerror}); pick a writable folder") from None


def _check_export(path: str, overwrite: bool, bits) -> None:
    if os.path.exists(path) and not overwrite:
        raise UserError(f"--export {path!r} already exists; pick another path or pass --overwrite")
    if os.path.isdir(path):
        raise UserError(f"--export {path!r} is a folder; give a file path such as model.lowbit")
    if bits.act_float:
        raise UserError(f"--export needs quantized activations; {bits.name} keeps them in float (A16)")


def interrupted_message(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves: the last checkpoint and the command that continues from it, or that none was kept."""
    state = state_path(args.out) if args.out else None
    if state and os.path.isfile(state):
        return f"interrupted; the last checkpoint is {state}: continue with the same flags and --resume"
    return "interrupted before the first checkpoint; nothing to resume (--save-every N keeps one every N steps)"


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun rank 0 speaks for all (errors are shared)
    try:
        report = run(args)
    except UserError as e:
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not quiet:
            print(interrupted_message(args), file=sys.stderr)
        return 130
    finally:
        DI.shutdown()
    if quiet:
        return 0
    if report.get("completed"):
        print(format_table(report), end="")
    else:
        print(f"stopped after {report['steps']} steps; checkpoint {report['state_path']}; continue with the same "
              f"flags and --resume", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
