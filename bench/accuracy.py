"""Accuracy table of the demo model: ``python -m bench.accuracy --data ../shared/data/cifar10 --out bench/``.

Each cell (bits, method, calibration data) is one ``quant.run`` pipeline run, built from its own command line
(``quant.run.build_parser().parse_args([...])``) and executed in-process, so a cell is exactly a user's CLI run
(a sweep cell identical to a table cell reuses its result):

    --model demo --bits B --method M [--act-correction] --data <cifar10>/train|invert --calib-size N
    --val <cifar10>/test --val-size V --iters I --invert-steps S --seed 0 --out <temp folder>

Methods: ``rtn``, ``blockwise``, ``e2e``, ``is-vit`` (SOS as I&S-ViT's authors train it), ``is-vit-quant`` (the
package's quantizer-training SOS), ``e2e+sulq`` / ``e2e+sulql`` (``e2e`` with I&S-ViT's published SULQ / the
package's learned-step SULQ), ``e2e+ac`` (``e2e`` with ``--act-correction``), and the
forward-pass comparison ``e2e+intfwd`` / ``e2e+fakefwd`` (``e2e`` with ``--forward int`` / ``--forward fake``: the
optimiser's forward in the deployed integer arithmetic, the default, or in float fake-quant); ``e2e+psaq``
(data-free only: ``e2e`` on images synthesized with ``--synthesis psaq``, PSAQ-ViT's loss as published);
``e2e+eqt`` (``e2e`` with the optimisation wall-clock of ``blockwise``: ``--iters`` times the step-time ratio that
:func:`equal_time_iters` measures).
Data: ``real`` (``--calib-size`` images of ``<data>/train``) and ``free`` (``--data invert``; the data-free images
of each ``--synthesis`` are synthesized once with ``quant.run.synthesize_calibration`` and copied into each cell's
``<out>.invert`` folder,
which ``quant.run`` then finds complete, so the images are the ones a fresh CLI run makes). The calibration-size
sweep runs ``--sweep-methods`` at ``--sweep-bits`` on ``--sweep-sources`` images (default real; ``free``: that many
data-free images, synthesized once per size, the paper's Figure 7) for each of ``--sizes``, evaluated on
``--sweep-val-size`` test images. ``--part table|sweep`` (with ``--bits``/``--sources``/``--sweep-bits``) splits the
work between processes sharing one ``--out``: each saves its finished cells merged into the file under a lock.

Results: ``<out>/accuracy.json`` = ``{"settings": {...}, "cells": {key: record}}``; each finished cell is added
atomically (temp file + ``os.replace``) and skipped when the script runs again with the same settings.
At the end (or with ``--render-only``) ``<out>/ACCURACY.md`` (FP row on top, top-1 % and seconds per run, the
settings, date, versions, machine) and ``<out>/calib_size.png`` are generated from the JSON alone; a
``<out>/tsne.json`` of ``python -m bench.tsne`` adds a section linking its ``tsne.png``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

METHODS = ("rtn", "blockwise", "e2e", "e2e+eqt", "is-vit", "is-vit-quant", "e2e+ac", "e2e+ac+eqt", "e2e+intfwd",
           "e2e+fakefwd", "e2e+sulq", "e2e+sulql", "e2e+psaq")
VARIANT_FLAGS = {"ac": ["--act-correction"], "intfwd": ["--forward", "int"], "fakefwd": ["--forward", "fake"],
                 "sulq": ["--softmax-quantizer", "sulq"], "sulql": ["--softmax-quantizer", "sulq-learned"],
                 "psaq": ["--synthesis", "psaq"], "eqt": []}
FREE_ONLY = ("psaq",)  # variants that change only the data-free images: no real-data cell
SOURCES = ("real", "free", "free-noise", "free-mixed")
# data-free sources: their quant.run --invert-prior
PRIOR_OF = {"free": "smooth", "free-noise": "noise", "free-mixed": "mixed"}
DEFAULT_BITS = ("w1.58a8", "w3a3", "w4a4", "w6a6")
DEFAULT_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 5000, 10000)
SETTING_KEYS = ("model", "iters", "val_size", "sweep_val_size", "calib_size", "invert_steps", "correction_iters",
                "batch_size", "seed", "device")
PARTS = ("all", "table", "sweep")


@dataclass(frozen=True)
class Cell:
    """One table or sweep entry; ``key`` names it in the JSON."""

    kind: str  # "table" or "sweep"
    bits: str
    method: str
    source: str
    calib_size: int

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.bits}/{self.method}/{self.source}/{self.calib_size}"

    @property
    def twin_key(self) -> str:
        """The same run listed under the other kind (a sweep size equal to the table's ``--calib-size``)."""
        return Cell("sweep" if self.kind == "table" else "table", self.bits, self.method, self.source,
                    self.calib_size).key


def _csv(values: str, allowed=None, what: str = "") -> List[str]:
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{what}: give a comma-separated list")
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{what}: unknown {bad}; use some of {', '.join(allowed)}")
    return items


def _bits_list(v: str) -> List[str]:
    from lowbit.bits import parse_bits
    items = _csv(v, what="bits")
    for b in items:
        try:
            parse_bits(b)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bits {b!r}: {e}") from None
    return items


def _sizes(v: str) -> List[int]:
    try:
        sizes = [int(s) for s in _csv(v, what="--sizes")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes comma-separated integers, got {v!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError("--sizes must be >= 1")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="CIFAR-10 root holding train/ and test/ (<class>/<img> folders)")
    p.add_argument("--out", default="bench", help="folder of accuracy.json, ACCURACY.md and calib_size.png")
    p.add_argument("--model", default="demo", help="quant.run --model")
    p.add_argument("--bits", type=_bits_list, default=list(DEFAULT_BITS), help="table bit configs")
    p.add_argument("--methods", type=lambda v: _csv(v, METHODS, "--methods"), default=list(METHODS),
                   help="table methods (e2e+ac: e2e with --act-correction)")
    p.add_argument("--sources", type=lambda v: _csv(v, SOURCES, "--sources"), default=["real", "free"],
                   help="calibration data: real (<data>/train), free (data-free, --data invert, the default smooth "
                        "prior), free-noise (--invert-prior noise, the first recipe) and/or free-mixed "
                        "(--invert-prior mixed)")
    p.add_argument("--iters", type=int, default=None, help="quant.run --iters (default: the model's, demo 300)")
    p.add_argument("--val-size", type=int, default=10000, help="cifar10/test images evaluated (seeded subset)")
    p.add_argument("--sweep-val-size", type=int, default=2000, help="cifar10/test images of the sweep's cells")
    p.add_argument("--calib-size", type=int, default=1024, help="calibration images of the table")
    p.add_argument("--invert-steps", type=int, default=None, help="quant.run --invert-steps (default: the model's)")
    p.add_argument("--correction-iters", type=int, default=None, help="quant.run --correction-iters for e2e+ac")
    p.add_argument("--batch-size", type=int, default=None, help="quant.run --batch-size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forward", choices=("int", "fake"), default=None,
                   help="quant.run --forward of these cells (default quant.run's; the e2e+intfwd/fakefwd variants "
                        "keep their own); recorded per cell, not a setting")
    p.add_argument("--device", default=None, help="quant.run --device (default: cuda if present)")
    p.add_argument("--workers", type=int, default=None, help="quant.run --workers")
    p.add_argument("--sizes", type=_sizes, default=list(DEFAULT_SIZES), help="calibration sizes of the sweep")
    p.add_argument("--sweep-bits", type=_bits_list, default=["w4a4", "w1.58a8"], help="bit configs of the sweep")
    p.add_argument("--sweep-sources", type=lambda v: _csv(v, SOURCES, "--sweep-sources"), default=["real"],
                   help="calibration data of the sweep (free: data-free images of each size, the paper's Figure 7)")
    p.add_argument("--sweep-methods", type=lambda v: _csv(v, METHODS, "--sweep-methods"),
                   default=["e2e", "blockwise"], help="methods of the sweep")
    p.add_argument("--no-sweep", action="store_true", help="skip the calibration-size sweep")
    p.add_argument("--part", choices=PARTS, default="all",
                   help="run only the table or only the sweep (several processes may share one --out: each "
                        "finished cell is merged into accuracy.json under a file lock)")
    p.add_argument("--render-only", action="store_true", help="only write ACCURACY.md and calib_size.png")
    p.add_argument("--note", action="append", default=[],
                   help="a remark on how the run was made, kept in accuracy.json and listed under Settings")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset pass-through flags with what ``quant.run`` would use for ``--model`` (its ``run_defaults``)."""
    import torch

    from lowbit.models import resolve
    from quant.run import RUN_DEFAULTS
    from quant.run import build_parser as run_parser
    run_ns = run_parser().parse_args(["--model", args.model, "--bits", "w8a8"])
    defaults = {**RUN_DEFAULTS, **(resolve(args.model).run_defaults or {}),
                "correction_iters": run_ns.correction_iters, "workers": run_ns.workers,
                "device": "cuda" if torch.cuda.is_available() else "cpu"}
    for k in ("iters", "invert_steps", "correction_iters", "batch_size", "workers", "device"):
        if getattr(args, k) is None:
            setattr(args, k, defaults[k])
    return args


def settings_of(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in SETTING_KEYS}


def plan(args: argparse.Namespace) -> List[Cell]:
    cells = []
    if args.part in ("all", "table"):
        cells += [Cell("table", b, m, s, args.calib_size) for b in args.bits for m in args.methods
                  for s in args.sources if runs_on(m, s)]
    if not args.no_sweep and args.part in ("all", "sweep"):
        cells += [Cell("sweep", b, m, s, n) for s in args.sweep_sources for b in args.sweep_bits
                  for n in args.sizes for m in args.sweep_methods
                  if runs_on(m, s)]
    return cells


def variants_of(method: str) -> List[str]:
    """``"e2e+ac"`` -> ``["ac"]``: the flags (:data:`VARIANT_FLAGS`) a method adds to its base."""
    return method.split("+")[1:]


def runs_on(method: str, source: str) -> bool:
    """Whether ``method`` has a cell on ``source`` (variants of the synthesis only run data-free)."""
    return source != "real" or not set(variants_of(method)) & set(FREE_ONLY)


def synthesis_of(method: str) -> str:
    """The ``--synthesis`` a method's data-free cell uses."""
    return "psaq" if "psaq" in variants_of(method) else "lowbit"


def cell_argv(cell: Cell, args: argparse.Namespace, out: str, iters: Optional[int] = None) -> List[str]:
    """The ``python -m quant.run`` command line of ``cell`` writing into ``out`` (``iters`` overrides ``--iters``)."""
    method, *variants = cell.method.split("+")
    ac = "ac" in variants
    data = os.path.join(args.data, "train") if cell.source == "real" else "invert"
    argv = ["--model", args.model, "--bits", cell.bits, "--method", method, "--data", data,
            "--calib-size", str(cell.calib_size), "--val", os.path.join(args.data, "test"),
            "--seed", str(args.seed), "--out", out, "--no-progress"]
    for v in variants:
        argv += VARIANT_FLAGS[v]
    if cell.source in PRIOR_OF:
        argv += ["--invert-prior", PRIOR_OF[cell.source]]
    if getattr(args, "forward", None) and "--forward" not in argv:
        argv += ["--forward", args.forward]
    val_size = args.sweep_val_size if cell.kind == "sweep" else args.val_size
    for flag, v in (("--iters", args.iters if iters is None else iters), ("--val-size", val_size),
                    ("--invert-steps", args.invert_steps if cell.source in PRIOR_OF else None),
                    ("--correction-iters", args.correction_iters if ac else None), ("--batch-size", args.batch_size),
                    ("--device", args.device), ("--workers", args.workers)):
        if v is not None:
            argv += [flag, str(v)]
    return argv


def load_results(path: str) -> dict:
    """The JSON; data-free cells run before ``--invert-prior`` existed (no such flag in their argv: the noise
    prior) are listed under the source ``free-noise``."""
    if not os.path.isfile(path):
        return {"settings": None, "cells": {}}
    with open(path) as f:
        results = json.load(f)
    cells = {}
    for k, r in results.get("cells", {}).items():
        if r.get("source") == "free" and "argv" in r and "--invert-prior" not in r["argv"]:
            r = {**r, "source": "free-noise"}
            k = Cell(r["kind"], r["bits"], r["method"], r["source"], r["calib_size"]).key
        cells.setdefault(k, r)
    results["cells"] = cells
    return results


def save_results(path: str, results: dict) -> None:
    """Write ``results`` atomically; cells already in the file that ``results`` lacks (another process's) are kept,
    under an exclusive lock on ``<path>.lock``."""
    import fcntl
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = load_results(path)
        if on_disk["settings"] == results["settings"]:
            for k, v in on_disk["cells"].items():
                results["cells"].setdefault(k, v)
            for k, v in (on_disk.get("invert_time_s") or {}).items():
                results.setdefault("invert_time_s", {}).setdefault(k, v)
            if "notes" in on_disk:  # written by add_notes; the file's are the latest
                results["notes"] = on_disk["notes"]
        _write_json(path, results)


def _write_json(path: str, results: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".accuracy-", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def record_of(cell: Cell, report: dict, argv: List[str], wall_s: float) -> dict:
    return {"kind": cell.kind, "bits": cell.bits, "method": cell.method, "source": cell.source,
            "calib_size": cell.calib_size, "top1": report["quantized"]["top1"], "top5": report["quantized"]["top5"],
            "fp_top1": report["fp"]["top1"], "val_images": report["quantized"]["images"],
            "calib_images": report["calib_images"], "steps": report["steps"], "time_s": wall_s,
            "forward": report.get("forward"), "optimize_s": report.get("optimize_s"), "argv": argv}


def equal_time_iters(args: argparse.Namespace, bits: str, probe_iters: int = 5, rounds: int = 3) -> dict:
    """The ``--iters`` giving ``e2e`` the optimisation wall-clock that ``blockwise`` takes at ``args.iters`` (steps
    per unit): both optimisers (``--forward``) run ``probe_iters`` steps per unit on the same random batch-sized
    images, round-robin in this process ``rounds`` times; ``ratio`` = median blockwise / median e2e seconds.
    Returns ``{"ratio", "iters", "probe_s": {method: [seconds]}}``."""
    import copy
    import statistics

    import torch

    from calib.invert import model_io
    from lowbit.bits import parse_bits
    from lowbit.models import load_model
    from quant.calibrate import calibrate
    from quant.modules import set_forward
    from quant.optimize import OptimConfig, optimize
    from quant.run import build_parser as run_parser
    from quant.surgery import quantize_model

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    fp = load_model(args.model).to(device)
    x = torch.randn(2 * args.batch_size, *model_io(fp)["input_size"]).to(device)
    student = calibrate(quantize_model(copy.deepcopy(fp), parse_bits(bits)), x[:32])
    set_forward(student, getattr(args, "forward", None) or run_parser().get_default("forward"))
    secs: Dict[str, List[float]] = {"blockwise": [], "e2e": []}
    for _ in range(rounds):
        for method in secs:
            s = copy.deepcopy(student)
            cfg = OptimConfig(method=method, iters=probe_iters, batch_size=args.batch_size, seed=args.seed,
                              progress=False)
            t0 = time.perf_counter()
            optimize(s, fp, x, cfg)
            secs[method].append(time.perf_counter() - t0)
    ratio = statistics.median(secs["blockwise"]) / statistics.median(secs["e2e"])
    return {"ratio": ratio, "iters": max(1, round(args.iters * ratio)), "probe_s": secs}


def run_cell(cell: Cell, args: argparse.Namespace, workdir: str, invert_cache: Optional[str]) -> dict:
    """Run ``cell`` through ``quant.run.run`` in a temporary ``--out`` under ``workdir``; return its record
    (``e2e+eqt``: ``--iters`` from :func:`equal_time_iters`, kept under ``budget``)."""
    from quant.run import build_parser as run_parser
    from quant.run import run
    out = tempfile.mkdtemp(prefix="cell-", dir=workdir)
    os.rmdir(out)
    budget = equal_time_iters(args, cell.bits) if "eqt" in variants_of(cell.method) else None
    argv = cell_argv(cell, args, out, None if budget is None else budget["iters"])
    if cell.source in PRIOR_OF and invert_cache is not None:
        shutil.copytree(invert_cache, out + ".invert")
    t0 = time.time()
    try:
        report = run(run_parser().parse_args(argv))
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out + ".invert", ignore_errors=True)
    wall = time.time() - t0
    if not report.get("completed") or report.get("quantized") is None:
        raise RuntimeError(f"cell {cell.key} did not complete: {report}")
    rec = record_of(cell, report, argv, wall)
    if budget is not None:
        rec["budget"] = budget
    return rec


def invert_tag(synthesis: str, prior: str) -> str:
    """``""`` for the first recipe (lowbit loss, noise prior), else e.g. ``"psaq-smooth-"``."""
    return "".join(f"{t}-" for t, first in ((synthesis, "lowbit"), (prior, "noise")) if t != first)


def invert_cache_name(args: argparse.Namespace, synthesis: str, size: int, prior: str = "smooth") -> str:
    """The work folder of the ``size`` data-free images of one ``--synthesis`` and ``--invert-prior``."""
    return f"invert-{invert_tag(synthesis, prior)}{size}-{args.invert_steps}-{args.seed}"


def synthesize_once(args: argparse.Namespace, folder: str, synthesis: str = "lowbit",
                    size: Optional[int] = None, prior: str = "smooth") -> Optional[float]:
    """The ``size`` (default ``--calib-size``) data-free images, made by ``quant.run.synthesize_calibration`` with
    the arguments a cell's run resolves to; returns the synthesis seconds summed over resumed runs
    (``calib.invert.write_image_folder``'s ``.synthesis.json``), ``None`` when some were not timed (or the folder
    has no record), 0 when ``folder`` was complete already."""
    import torch

    from lowbit.models import load_model
    from quant.run import build_parser as run_parser
    from quant.run import synthesize_calibration
    done = folder + ".done"
    if os.path.exists(done):
        return 0.0
    ns = run_parser().parse_args(["--model", args.model, "--bits", "w8a8", "--data", "invert",
                                  "--calib-size", str(size or args.calib_size), "--seed", str(args.seed),
                                  "--invert-steps", str(args.invert_steps), "--synthesis", synthesis,
                                  "--invert-prior", prior])
    ns.no_progress = args.no_progress
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    synthesize_calibration(load_model(args.model).to(device), folder, ns)
    open(done, "w").close()
    record = os.path.join(folder, ".synthesis.json")
    if not os.path.isfile(record):
        return None
    with open(record) as f:
        rec = json.load(f)
    return None if rec["partial"] else rec["seconds"]


def run_all(args: argparse.Namespace) -> dict:
    """Run every planned cell not yet in ``<out>/accuracy.json``; returns the results."""
    from tqdm import tqdm
    if not args.data or not all(os.path.isdir(os.path.join(args.data, s)) for s in ("train", "test")):
        raise SystemExit(f"error: --data {args.data!r} must be a CIFAR-10 root holding train/ and test/ "
                         f"(e.g. --data ../shared/data/cifar10)")
    path = os.path.join(args.out, "accuracy.json")
    results = load_results(path)
    settings = settings_of(args)
    if results["settings"] is not None and results["settings"] != settings:
        raise SystemExit(f"error: {path} was made with other settings {results['settings']}, not {settings}; "
                         f"rerun with those flags, or pass another --out (or delete the file) to start afresh")
    results["settings"] = settings
    cells = [c for c in plan(args) if c.key not in results["cells"]]
    workdir = os.path.join(args.out, ".accuracy-work")
    os.makedirs(workdir, exist_ok=True)
    caches = {}
    for syn, prior, n in sorted({(synthesis_of(c.method), PRIOR_OF[c.source], c.calib_size) for c in cells
                                 if c.source in PRIOR_OF}):
        caches[syn, prior, n] = os.path.join(workdir, invert_cache_name(args, syn, n, prior))
        secs = synthesize_once(args, caches[syn, prior, n], syn, n, prior)
        if secs != 0:
            results.setdefault("invert_time_s", {})[f"{invert_tag(syn, prior)}{n}"] = secs
            save_results(path, results)
    for cell in tqdm(cells, desc="accuracy cells", unit="cell", disable=args.no_progress):
        twin = results["cells"].get(cell.twin_key) if args.sweep_val_size == args.val_size else None
        if twin is not None:
            rec = {**twin, "kind": cell.kind, "reused_from": cell.twin_key}
        else:
            rec = run_cell(cell, args, workdir, caches.get((synthesis_of(cell.method), PRIOR_OF.get(cell.source),
                                                            cell.calib_size)))
        results["cells"][cell.key] = rec
        save_results(path, results)
    save_results(path, results)
    return results


def _versions() -> str:
    import timm
    import torch
    return f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}"


def _machine(device: str) -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    s = f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPU cores"
    if device.startswith("cuda") and torch.cuda.is_available():
        s += f", {torch.cuda.get_device_name(0)}"
    return s


def fmt_acc(x: float) -> str:
    return f"{x:.2f}"


def fmt_time(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def render_markdown(results: dict, tsne: Optional[dict] = None) -> str:
    """``ACCURACY.md`` from the results: FP row, then one row per (bits, method); a column pair (top-1 %, s) per
    calibration source; the t-SNE figure's section when ``tsne`` (``tsne.json`` of ``bench.tsne``) is given."""
    st, cells = results["settings"] or {}, results["cells"]
    table = [r for r in cells.values() if r["kind"] == "table"]
    sources = [s for s in SOURCES if any(r["source"] == s for r in table)]
    fps = sorted({round(r["fp_top1"], 6) for r in table})
    size = st.get("calib_size")
    head = {"real": f"real ({size} cifar10/train)", "free": f"data-free, smooth prior ({size})",
            "free-noise": f"data-free, noise prior ({size})", "free-mixed": f"data-free, mixed prior ({size})"}
    lines = [f"# Accuracy of the {st.get('model')} model (CIFAR-10 test top-1 %)", "",
             "Generated by `python -m bench.accuracy` from `accuracy.json`; do not edit by hand.", ""]
    cols = ["bits", "method"] + [c for s in sources for c in (f"{head[s]} top-1", "time (s)")]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    if fps:
        lines.append("| FP32 | - | " + " | ".join(f"{fmt_acc(fps[0])} | -" for _ in sources) + " |")
    order = {m: i for i, m in enumerate(METHODS)}
    rows = sorted({(r["bits"], r["method"]) for r in table},
                  key=lambda bm: (_bits_order(bm[0]), order[bm[1]]))
    by = {(r["bits"], r["method"], r["source"]): r for r in table}
    for b, m in rows:
        vals = []
        for s in sources:
            r = by.get((b, m, s))
            vals += ["-", "-"] if r is None else [fmt_acc(r["top1"]), fmt_time(r["time_s"])]
        lines.append(f"| {b.upper()} | {m} | " + " | ".join(vals) + " |")
    timed = sorted((r for r in table if r.get("optimize_s") and r["steps"]),
                   key=lambda r: (_bits_order(r["bits"]), order[r["method"]], r["source"]))
    if timed:
        lines += ["", "## Optimisation step time", "",
                  "Seconds of `quant.run`'s optimisation (`optimize_s` in its report) per step, of the runs above that "
                  "recorded it (the machine is shared, so concurrent runs slow each other).", "",
                  "| bits | method | data | forward | steps | optimisation (s) | ms/step |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['bits'].upper()} | {r['method']} | {r['source']} | {r.get('forward') or '-'} | {r['steps']} | "
                  f"{fmt_time(r['optimize_s'])} | {1000 * r['optimize_s'] / r['steps']:.0f} |" for r in timed]
    lines += seed_section(table)
    lines += budget_section(table)
    sweep = [r for r in cells.values() if r["kind"] == "sweep" and r["source"] == "real"]
    if sweep:
        sweep_fp = sorted({round(r["fp_top1"], 6) for r in sweep})
        sweep_n = sorted({r["val_images"] for r in sweep})
        lines += ["", "## Calibration-set size (real cifar10/train images)", "",
                  f"Top-1 % on {', '.join(f'{n:,}' for n in sweep_n)} cifar10/test images (seeded subset; FP32 on "
                  f"them: {', '.join(fmt_acc(f) for f in sweep_fp)}).", "",
                  "![e2e vs blockwise against calibration-set size](calib_size.png)", ""]
        lines += size_table(sweep, str)
    lines += free_sweep_section(cells)
    if tsne is not None:
        lines += ["", *tsne_section(tsne)]
    n_val = sorted({r["val_images"] for r in table})
    lines += ["", "## Settings", "",
              f"- model `{st.get('model')}`; `quant.run` flags per cell: `--iters {st.get('iters')}`, "
              f"`--calib-size {size}` (sweep: the column), `--invert-steps {st.get('invert_steps')}` (data-free), "
              f"`--correction-iters {st.get('correction_iters')}` (e2e+ac), `--batch-size {st.get('batch_size')}`, "
              f"`--val-size {st.get('val_size')}` (sweep: `{st.get('sweep_val_size', st.get('val_size'))}`), "
              f"`--seed {st.get('seed')}`, `--device {st.get('device')}`",
              f"- table: top-1 on {', '.join(map(str, n_val))} cifar10/test images (a seeded subset when fewer than "
              f"10,000); FP row: the float model on the same images",
              "- methods: `rtn` (initialisation only), `blockwise`, `e2e` (the paper), `is-vit` (I&S-ViT SOS as its "
              "authors train it: weights and biases, quantizers frozen), `is-vit-quant` (the same stages training the "
              "quantizers), `e2e+sulq` / `e2e+sulql` (e2e with I&S-ViT's published SULQ / the learned-step SULQ), "
              "`e2e+ac` (e2e then DFQ-ViT `--act-correction`), `e2e+intfwd` / `e2e+fakefwd` (e2e with "
              "`--forward int`, the optimiser's forward in the deployed integer arithmetic, / `--forward fake`, "
              "float fake-quant; same gradients), `e2e+psaq` (e2e on data-free images synthesized with PSAQ-ViT's "
              "patch-similarity entropy as published, `--synthesis psaq`; the other data-free cells use the "
              "package's `lowbit` loss), `e2e+eqt` (e2e given blockwise's optimisation wall-clock: more steps)",
              "- quantized top-1 is the exported model's: `quant.run` evaluates in `\"int\"` mode (integer arithmetic, "
              "float tensors at the checkpoint's fp16), bit-equal to `export.load` on the CPU",
              "- time: wall seconds of one `quant.run` (load, calibration, optimisation, evaluation, export)"
              + _invert_time_note(results.get("invert_time_s") or {}),
              f"- generated {results.get('generated', datetime.date.today().isoformat())}; {_versions()}; "
              f"{_machine(st.get('device') or 'cpu')}", ""]
    if len(fps) > 1:
        lines.insert(-1, f"- note: FP top-1 differs between cells ({', '.join(fmt_acc(f) for f in fps)})")
    for note in results.get("notes", []):
        lines.insert(-1, f"- note: {note}")
    return "\n".join(lines)


def free_sweep_section(cells: Dict[str, dict]) -> List[str]:
    """The paper's Figure 7 as a table: top-1 against the number of data-free images, per bits and method."""
    free = [r for r in cells.values() if r["kind"] == "sweep" and r["source"] == "free"]
    if not free:
        return []
    n_val = sorted({r["val_images"] for r in free})
    lines = ["", "## Data-free calibration-set size (the paper's Figure 7)", "",
             f"Top-1 % on {', '.join(f'{n:,}' for n in n_val)} cifar10/test images (seeded subset; FP32 on them: "
             f"{', '.join(fmt_acc(f) for f in sorted({round(r['fp_top1'], 6) for r in free}))}) after calibrating on "
             f"that many data-free images (`--data invert`, made once per size).", ""]
    return lines + size_table(free, lambda n: f"{n:,} synthetic")


def size_table(rows: List[dict], head) -> List[str]:
    """Markdown table of top-1 per (bits, method) row and calibration-size column (``head(size)`` its title)."""
    order = {m: i for i, m in enumerate(METHODS)}
    sizes = sorted({r["calib_size"] for r in rows})
    by = {(r["bits"], r["method"], r["calib_size"]): r for r in rows}
    lines = ["| bits | method | " + " | ".join(head(n) for n in sizes) + " |", "|" + "---|" * (len(sizes) + 2)]
    for b, m in sorted({(r["bits"], r["method"]) for r in rows}, key=lambda bm: (_bits_order(bm[0]), order[bm[1]])):
        lines.append(f"| {b.upper()} | {m} | " + " | ".join(
            fmt_acc(by[(b, m, n)]["top1"]) if (b, m, n) in by else "-" for n in sizes) + " |")
    return lines


def _invert_time_note(times: Dict[str, float]) -> str:
    if not times:
        return ""
    def label(k: str) -> str:
        syn = "psaq" if "psaq-" in k else "lowbit"
        prior = next((p for p in ("smooth", "mixed") if f"{p}-" in k), "noise")
        return f"{syn} loss, {prior} prior, {int(k.rsplit('-', 1)[-1]):,} images"
    def took(v: Optional[float]) -> str:
        return f"{fmt_time(v)} s" if v is not None else "time not recorded (made over interrupted runs)"
    parts = [f"{label(k)}: {took(v)}" for k, v in sorted(times.items(), key=lambda kv: label(kv[0]))]
    return (f"; each set of data-free images was synthesized once ({'; '.join(parts)}) and reused by every "
            f"data-free cell using that loss, prior and size")


SEED_PAIRS = (("SULQ softmax quantizer", "e2e+sulq", ("e2e+sulql",)),
              ("SOS stage training", "is-vit", ("is-vit-quant",)),
              ("patch-similarity synthesis loss", "e2e+psaq", ("e2e+intfwd", "e2e+fakefwd", "e2e")))


def forward_of(r: dict) -> str:
    """The optimiser forward of a cell; cells that recorded none ran before the integer forward (float fake-quant)."""
    return r.get("forward") or "fake"


def seed_section(table: List[dict]) -> List[str]:
    """Each seed method as its authors published it beside the package's variant of it (:data:`SEED_PAIRS`), on
    the same bits, calibration source and optimiser forward."""
    rows = []
    for what, published, variants in SEED_PAIRS:
        for f in sorted((r for r in table if r["method"] == published),
                        key=lambda r: (_bits_order(r["bits"]), SOURCES.index(r["source"]))):
            v = next((r for m in variants for r in table if r["method"] == m and r["bits"] == f["bits"]
                      and r["source"] == f["source"] and forward_of(r) == forward_of(f)), None)
            if v is not None:
                rows.append(f"| {what} | {f['bits'].upper()} | {f['source']} | {forward_of(f)} | {published} "
                            f"{fmt_acc(f['top1'])} | {v['method']} {fmt_acc(v['top1'])} | "
                            f"{v['top1'] - f['top1']:+.2f} |")
    if not rows:
        return []
    return ["", "## Seed methods as published vs the package's variants", "",
            "Each published method beside the package's variant of the same step, on the same bits, calibration "
            "images and optimiser forward (`e2e+psaq`'s variant is e2e on the package's `lowbit` synthesis). "
            "Positive: the package's variant is better.", "",
            "| step | bits | data | forward | as published top-1 | package's variant top-1 | variant - published |",
            "|---|---|---|---|---|---|---|", *rows]


def budget_section(table: List[dict]) -> List[str]:
    """Blockwise vs e2e at its own steps vs ``e2e+eqt`` (e2e given blockwise's optimisation wall-clock)."""
    eq = sorted((r for r in table if r.get("budget")), key=lambda r: (_bits_order(r["bits"]), r["source"]))
    if not eq:
        return []
    by = {(r["bits"], r["method"], r["source"]): r for r in table}
    lines = ["", "## Equal optimisation budget", "",
             "`e2e+eqt` runs e2e for as many steps as take the optimisation wall-clock of `blockwise` at the same "
             "bits (`--iters` steps per unit): both optimisers are timed round-robin in one process on a few steps "
             "(`equal_time_iters`), and e2e gets `--iters` times the ratio.", "",
             "| bits | data | blockwise top-1 | e2e top-1 (steps) | e2e+eqt top-1 (steps) | time ratio blockwise / e2e |",
             "|---|---|---|---|---|---|"]
    for r in eq:
        bw, e2e = by.get((r["bits"], "blockwise", r["source"])), by.get((r["bits"], "e2e", r["source"]))
        bw_s = "-" if bw is None else fmt_acc(bw["top1"])
        e2e_s = "-" if e2e is None else f"{fmt_acc(e2e['top1'])} ({e2e['steps']})"
        lines.append(f"| {r['bits'].upper()} | {r['source']} | {bw_s} | {e2e_s} | {fmt_acc(r['top1'])} "
                     f"({r['steps']}) | {r['budget']['ratio']:.2f} |")
    return lines


def tsne_section(t: dict) -> List[str]:
    """Markdown lines linking ``tsne.png`` (made by ``python -m bench.tsne``), with its per-source numbers."""
    st = t["settings"]
    names = ", ".join(st["class_names"])
    lines = ["## Real vs data-free features (t-SNE, the paper's Figure 6)", "",
             "![t-SNE of the demo's last-block features, real vs data-free images](tsne.png)", "",
             f"`python -m bench.tsne`: last-block (pre-logits) features of the `{st['model']}` model for classes "
             f"{names}; t-SNE perplexity {st['perplexity']:g}, {st['iters']} iterations, KL {t['kl']:.3f}. "
             f"Same-source share: the fraction of a point's {st['knn']} nearest neighbours in feature space from "
             f"its own source (chance: that source's share of the other points).", "",
             "| source | images | FP top-1 on them (%) | same-source share | chance |", "|---|---|---|---|---|"]
    for s in t["sources"]:
        lines.append(f"| {s['name']} | {s['images']} | {fmt_acc(s['top1'])} | {s['knn_same_source']:.3f} | "
                     f"{s['knn_same_source_chance']:.3f} |")
    if st.get("invert_steps"):
        lines += ["", f"Data-free images: `calib.invert` as in `quant.run --data invert`, `--invert-steps "
                      f"{st['invert_steps']}`, `--invert-prior {st.get('invert_prior') or 'noise'}`, "
                      f"{st['free_per_class']} per class; real: {st['real_per_class']} per class of `{st['data']}`."]
    return lines


def _bits_order(b: str):
    from lowbit.bits import parse_bits
    c = parse_bits(b)
    return (c.w_bits, c.a_bits)


def render_plot(results: dict, path: str) -> Optional[str]:
    """``calib_size.png``: top-1 against calibration-set size (log x), one panel per bit config of the sweep."""
    sweep = [r for r in results["cells"].values() if r["kind"] == "sweep" and r["source"] == "real"]
    if not sweep:
        return None
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bits = sorted({r["bits"] for r in sweep}, key=_bits_order, reverse=True)
    fp = sweep[0]["fp_top1"]
    fig, axes = plt.subplots(1, len(bits), figsize=(5 * len(bits), 3.8), squeeze=False)
    for ax, b in zip(axes[0], bits):
        for m in [m for m in METHODS if any(r["method"] == m and r["bits"] == b for r in sweep)]:
            pts = sorted((r["calib_size"], r["top1"]) for r in sweep if r["bits"] == b and r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.axhline(fp, color="gray", ls="--", lw=1, label="FP32")
        ax.set_xscale("log")
        sizes = sorted({r["calib_size"] for r in sweep if r["bits"] == b})
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes], rotation=45 if len(sizes) > 5 else 0)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("calibration images")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{(results['settings'] or {}).get('model', '')}, CIFAR-10 test, {b.upper()}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def add_notes(out: str, notes: List[str]) -> None:
    """Append ``notes`` (new ones only) to ``<out>/accuracy.json``."""
    path = os.path.join(out, "accuracy.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist; run python -m bench.accuracy --data ... first")
    import fcntl
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(path)
        have = results.setdefault("notes", [])
        have += [n for n in notes if n not in have]
        _write_json(path, results)


def render(out: str) -> Dict[str, str]:
    """Write ``ACCURACY.md`` and ``calib_size.png`` from ``<out>/accuracy.json``; returns their paths."""
    path = os.path.join(out, "accuracy.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist; run python -m bench.accuracy --data ... first")
    results = load_results(path)
    results["generated"] = datetime.date.today().isoformat()
    tsne_json = os.path.join(out, "tsne.json")
    tsne = load_results(tsne_json) if os.path.isfile(tsne_json) else None
    md = os.path.join(out, "ACCURACY.md")
    with open(md + ".tmp", "w") as f:
        f.write(render_markdown(results, tsne))
    os.replace(md + ".tmp", md)
    written = {"markdown": md}
    png = render_plot(results, os.path.join(out, "calib_size.png"))
    if png:
        written["plot"] = png
    return written


def main(argv: Optional[List[str]] = None) -> int:
    from lowbit.errors import UserError
    args = build_parser().parse_args(argv)
    if not args.render_only:
        try:
            run_all(resolve_defaults(args))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.note:
        add_notes(args.out, args.note)
    for what, p in render(args.out).items():
        print(f"wrote {what}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
