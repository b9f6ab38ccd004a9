"""Optimisation of a calibrated quantized model against its frozen float teacher (no labels).

Methods
-------
``rtn``        initialisation only (:mod:`quant.calibrate`), no training.
``e2e``        the paper's joint optimisation: every quantization parameter, rescale/shift and refinement of the
               whole network at once, ``iters`` steps, loss::

                   L = sum_l mean((F_l^q - F_l)^2) + T^2 KL(softmax(z / T) || softmax(z^q / T)) + lambda sum ||dW||^2

               (``F_l`` the output of transformer block ``l``, ``z`` the logits; the teacher runs on the fly).
``blockwise``  block-by-block reconstruction with the same quantizers (the design the paper argues against):
               unit ``i`` = block ``i`` plus the layers run between block ``i-1`` and it (patch embedding,
               patch merging), trained ``iters`` steps on ``mean((F_i^q - F_i)^2) + lambda ||dW||^2`` with every
               other unit frozen; a final unit (the head) is trained on the KL term.
``is-vit``     I&S-ViT's three-stage smooth optimisation (:mod:`quant.sos`) as its authors train it: channel-wise
               post-LayerNorm activations with float weights, exact fold into LayerNorm, then layer-wise
               quantization; in both reconstruction stages the linear weights and biases are trained block by
               block with every quantizer parameter frozen (``iters`` steps per block and stage; no
               checkpoint/resume).
``is-vit-quant`` the same stages training the quantizers instead (stage 1: step sizes, zero points, ``r`` and
               ``shift`` with float weights; stage 3: every quantizer and the refinements): the package's variant.

Adam with lr ``lr_q`` (1e-3) for step sizes, zero points, rescale and shift and ``lr_w`` (1e-4; ``is-vit`` 4e-5)
for the refinements ``dW``; per unit a linear warm-up over ``warmup`` steps (default 5/24 of ``iters``, the paper's
5k of 24k; ``is-vit`` none) then cosine decay to zero. Batches are drawn without replacement from a seeded permutation per epoch,
and transformed by ``augment`` (:mod:`calib.augment`, seeded by the step; none by default), then, with
``hard_steps``, moved towards where student and teacher disagree (:func:`hard_batch`).
Checkpoints (trainable parameters, optimiser, scheduler, RNG states, sampler position) are written atomically
every ``save_every`` steps; ``resume=True`` continues from one bit-exactly.

``images`` is an in-memory ``[N, 3, H, W]`` tensor or a :class:`calib.stream.CalibImages` (``quant.run``'s
on-disk cache, read batch by batch through a DataLoader, so memory does not grow with ``N``); batches are the same
either way. Under ``torchrun`` (``dist``, :mod:`quant.distributed`) ``e2e`` runs data-parallel: each rank takes its
shard of every global batch of ``batch_size`` and DDP averages the suitably scaled gradients.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from calib.augment import augment_batch
from calib.invert import normalisation
from calib.stream import CalibImages, as_images
from lowbit import primitives as P
from lowbit.errors import UserError
from quant.adam import HostAdam
from quant.distributed import Dist
from quant.graph_step import GraphedStep
from quant.modules import QuantConv2dPatch, QuantLinear, quant_modules
from quant.sos import sos
from quant.surgery import blocks

METHODS = ("rtn", "blockwise", "e2e", "is-vit", "is-vit-quant")
#: the weight learning rate by method: I&S-ViT's authors train weights and biases with Adam at 4e-5
#: (``block_recon.py``), the package's methods the refinements ``dW`` at 1e-4
LR_W = {None: 1e-4, "is-vit": 4e-5}


@dataclass
class OptimConfig:
    method: str = "e2e"
    iters: int = 24000
    batch_size: int = 32
    lr_q: float = 1e-3
    #: None: the method's default (:data:`LR_W`)
    lr_w: Optional[float] = None
    #: None: the method's default, 5/24 of ``iters`` (``is-vit``: 0, as its authors' cosine schedule)
    warmup: Optional[int] = None
    temperature: float = 4.0
    l2: float = 1e-5
    seed: int = 0
    save_every: int = 0
    state_path: Optional[str] = None
    resume: bool = False
    bf16: bool = False
    progress: bool = True
    stop_after: Optional[int] = None
    augment: Tuple[str, ...] = ()
    hard_steps: int = 0
    hard_step_size: float = 0.05
    #: blockwise: where a block's input comes from: the quantized ``student`` up to it, or the FP ``teacher`` (I&S-ViT
    #: stage 1 as published: ``save_inp_oup_data(..., last_stage=False)`` takes the FP model's block input)
    block_inputs: str = "student"
    #: on CUDA, capture each unit's step once as a CUDA graph and replay it (:mod:`quant.graph_step`)
    cuda_graph: bool = True
    #: blockwise: the quantized layers run between blocks (patch embedding, Swin's patch-merging reduction) are units
    #: of their own, reconstructed on their own outputs (I&S-ViT's layer reconstruction), not trained with the next
    #: block
    layer_units: bool = False
    #: blockwise, the unit after the last block: ``kl`` (temperature KL to the teacher's logits) or ``mse`` (logit
    #: MSE, I&S-ViT's reconstruction loss of the head)
    head_loss: str = "kl"

    def __post_init__(self):
        if self.lr_w is None:
            self.lr_w = LR_W.get(self.method, LR_W[None])
        if self.warmup is None and self.method == "is-vit":
            self.warmup = 0
        if self.block_inputs not in ("student", "teacher") or self.head_loss not in ("kl", "mse"):
            raise UserError(f"block inputs must be 'student' or 'teacher' and the head loss 'kl' or 'mse', got "
                            f"{self.block_inputs!r} and {self.head_loss!r}")
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.hard_steps < 0 or self.hard_step_size <= 0:
            raise UserError(f"hard steps must be >= 0 and the hard step size > 0, got {self.hard_steps} and "
                            f"{self.hard_step_size}")
        if self.iters < 0 or self.batch_size < 1:
            raise UserError(f"iters must be >= 0 and batch size >= 1, got {self.iters} and {self.batch_size}")
        if (self.save_every or self.resume) and not self.state_path:
            raise UserError("checkpointing/resume needs a state_path")
        if self.method.startswith("is-vit") and (self.resume or self.stop_after is not None):
            raise UserError(f"--method {self.method} does not support --resume/--stop-after; run it in one go")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.iters * 5 / 24)) if self.warmup is None else self.warmup

    def fingerprint(self) -> dict:
        keep = ("method", "iters", "batch_size", "lr_q", "lr_w", "warmup", "temperature", "l2", "seed", "bf16")
        fp = {k: v for k, v in asdict(self).items() if k in keep}
        if self.augment:
            fp["augment"] = list(self.augment)
        if self.hard_steps:
            fp["hard"] = [self.hard_steps, self.hard_step_size]
        if (self.block_inputs, self.head_loss) != ("student", "kl"):
            fp["recon"] = [self.block_inputs, self.head_loss]
        if self.layer_units:
            fp["layer_units"] = True
        return fp


class EpochSampler:
    """Index batches drawn without replacement from ``randperm(n, seed + epoch)``; ``state_dict`` = position."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._make_perm()

    def _make_perm(self) -> Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))

    def next(self) -> Tensor:
        out = []
        need = self.batch_size
        while need:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._make_perm()
            take = min(need, self.n - self.pos)
            out.append(self._perm[self.pos:self.pos + take])
            self.pos += take
            need -= take
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.pos = int(sd["epoch"]), int(sd["pos"])
        self._perm = self._make_perm()


class _Capture:
    """Forward hooks storing each block's output (``outputs[i]``); raises :class:`_Stop` after block ``stop_at``."""

    class _Stop(Exception):
        pass

    def __init__(self, block_list: List[nn.Module], stop_at: Optional[int] = None):
        self.outputs: List[Optional[Tensor]] = [None] * len(block_list)
        self.handles = [b.register_forward_hook(self._hook(i, i == stop_at)) for i, b in enumerate(block_list)]

    def _hook(self, i, stop):
        def fn(module, inputs, output):
            self.outputs[i] = output
            if stop:
                raise _Capture._Stop()
        return fn

    def run(self, model: nn.Module, x: Tensor):
        try:
            return model(x)
        except _Capture._Stop:
            return None

    def close(self):
        for h in self.handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def refinement_l2(modules) -> Tensor:
    return sum((P.f32(m.dW) ** 2).sum() for m in modules if isinstance(m, (QuantLinear, QuantConv2dPatch)))


def kl_logits(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                    reduction="batchmean", log_target=True) * t * t


def e2e_loss(student: nn.Module, teacher: nn.Module, x: Tensor, cfg: OptimConfig,
             forward: Optional[nn.Module] = None) -> Dict[str, Tensor]:
    """The e2e loss terms on batch ``x``: ``mse`` (sum over blocks), ``kl``, ``l2`` and ``total``. ``forward``
    runs the student (its DDP wrapper; default the student itself)."""
    sb, tb = blocks(student), blocks(teacher)
    with torch.no_grad(), _Capture(tb) as tc:
        t_logits = teacher(x)
    with _Capture(sb) as sc:
        s_logits = (forward or student)(x)
    mse = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(sc.outputs, tc.outputs))
    kl = kl_logits(s_logits, t_logits, cfg.temperature)
    l2 = refinement_l2(quant_modules(student))
    return {"mse": mse, "kl": kl, "l2": l2, "total": mse + kl + cfg.l2 * l2}


def hard_batch(student: nn.Module, teacher: nn.Module, x: Tensor, cfg: OptimConfig, lo: Tensor,
               hi: Tensor) -> Tensor:
    """``x`` moved ``cfg.hard_steps`` signed-gradient steps of ``cfg.hard_step_size`` (normalised units) up the
    student-teacher disagreement ``T^2 KL(teacher || student)``, kept in the valid pixel range ``[lo, hi]``: the
    inputs on which the current student errs most (PSAQ-ViT V2's adaptive samples, refreshed every step and not
    kept). Only ``x`` is differentiated; no parameter gradient is touched."""
    xa = x.detach().clone()
    with P.unchecked_values():
        for _ in range(cfg.hard_steps):
            xa.requires_grad_(True)
            with torch.enable_grad():
                loss = kl_logits(student(xa), teacher(xa), cfg.temperature)
                (g,) = torch.autograd.grad(loss, xa)
            xa = torch.maximum(torch.minimum(xa.detach() + cfg.hard_step_size * g.sign(), hi), lo)
    return xa.detach()


@torch.no_grad()
def evaluate_loss(student: nn.Module, teacher: nn.Module, images, cfg: OptimConfig,
                  batch_size: int = 32) -> float:
    """Mean e2e loss ``total`` over ``images`` (a tensor or :class:`calib.stream.CalibImages`; no gradient): the
    distillation loss used to compare methods."""
    source = as_images(images)
    tot, n = 0.0, 0
    for i in range(0, len(source), batch_size):
        x = source.take(range(i, min(len(source), i + batch_size)))
        tot += float(e2e_loss(student, teacher, x, cfg)["total"]) * x.shape[0]
        n += x.shape[0]
    return tot / n


@dataclass
class _Unit:
    params: Dict[str, nn.Parameter]
    block: Optional[int]  # index of the block whose output is reconstructed; None = the logits (KL)
    layer: Optional[str] = None  # a layer outside the blocks reconstructed on its own output (``layer_units``)


def _units(student: nn.Module, cfg: OptimConfig, example: Tensor) -> List[_Unit]:
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    if cfg.method == "e2e":
        return [_Unit(trainable, None)]
    blist = blocks(student)
    order: List[object] = []
    qmods = [m for m in quant_modules(student)]
    hooks = [m.register_forward_pre_hook(lambda mod, _i, k=("q", id(m)): order.append(k)) for m in qmods]
    hooks += [b.register_forward_pre_hook(lambda mod, _i, k=("b", i): order.append(k)) for i, b in enumerate(blist)]
    with torch.no_grad():
        student(example[:1])
    for h in hooks:
        h.remove()
    inside = {id(m): i for i, b in enumerate(blist) for m in b.modules()}
    owner, pending = {}, []
    for kind, key in order:
        if kind == "b":
            for mid in pending:
                owner[mid] = key
            pending = []
        elif key not in inside and key not in owner:
            pending.append(key)
    for mid in pending:
        owner[mid] = None
    names = {id(m): n for n, m in student.named_modules()}
    own = lambda m: {f"{names[id(m)]}.{pn}": p for pn, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    by_unit: Dict[Optional[int], Dict[str, nn.Parameter]] = {i: {} for i in range(len(blist))}
    by_unit[None] = {}
    layers: Dict[int, List[_Unit]] = {i: [] for i in range(len(blist))}
    for m in qmods:
        u = inside.get(id(m), owner.get(id(m)))
        if cfg.layer_units and id(m) not in inside and u is not None:
            layers[u].append(_Unit(own(m), u, names[id(m)]))
        else:
            by_unit[u].update(own(m))
    units = []
    for i in range(len(blist)):
        units += layers[i] + [_Unit(by_unit[i], i)]
    return units + [_Unit(by_unit[None], None)]


def _layer_io(model: nn.Module, name: str, x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(input, output)`` of ``model``'s submodule ``name`` in a forward of ``x``, stopped right after it."""
    seen = []

    def grab(module, inputs, output):
        seen.append((inputs[0], output))
        raise _Capture._Stop()
    h = model.get_submodule(name).register_forward_hook(grab)
    try:
        model(x)
    except _Capture._Stop:
        pass
    finally:
        h.remove()
    return seen[0]


def _is_weight(name: str) -> bool:
    """Refinements ``dW`` and (trained only by ``is-vit``) linear biases take the weight learning rate."""
    return name.endswith(("dW", ".bias"))


def _make_optim(unit: _Unit, cfg: OptimConfig, graphable: bool = False):
    ref = [p for n, p in unit.params.items() if _is_weight(n)]
    rest = [p for n, p in unit.params.items() if not _is_weight(n)]
    groups = [g for g in ({"params": rest, "lr": cfg.lr_q}, {"params": ref, "lr": cfg.lr_w}) if g["params"]]
    opt = HostAdam(groups, graphable=graphable)
    warm, total = cfg.warmup_steps, cfg.iters

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _pixel_range(model: nn.Module, device) -> Tuple[Tensor, Tensor]:
    """The normalised values of pixels 0 and 1 per channel, ``[1, 3, 1, 1]`` each."""
    mean, std = normalisation(model, device)
    return (0 - mean) / std, (1 - mean) / std


def fingerprint_diff(saved: dict, now: dict, limit: int = 3) -> str:
    """The settings that differ between two run fingerprints, as ``name: saved -> now`` (nested dicts flattened,
    at most ``limit`` named)."""
    def flat(d, pre=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out
    a, b = flat(saved), flat(now)
    diff = [f"{k.split('.')[-1].replace('_', '-')}: {a.get(k, 'unset')} -> {b.get(k, 'unset')}"
            for k in sorted(set(a) | set(b)) if a.get(k, "unset") != b.get(k, "unset")]
    more = f" (and {len(diff) - limit} more)" if len(diff) > limit else ""
    return ", ".join(diff[:limit]) + more


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_state(path: str, state: dict) -> None:
    """``torch.save`` to ``path`` atomically (temp file in the same folder, then ``os.replace``)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _unit_loss(student, teacher, x, unit: _Unit, cfg: OptimConfig, forward=None) -> Tensor:
    if unit.block is None and cfg.method == "e2e":
        return e2e_loss(student, teacher, x, cfg, forward)["total"]
    mods = quant_modules(student)
    own = {id(p) for p in unit.params.values()}
    mods = [m for m in mods if any(id(p) in own for p in m.parameters())]
    l2 = cfg.l2 * refinement_l2(mods) if mods else 0.0
    if unit.layer is not None:  # the layer on its own: its output against the teacher's layer on the teacher's input
        with torch.no_grad():
            t_in, t_out = _layer_io(teacher, unit.layer, x)
            s_in = t_in if cfg.block_inputs == "teacher" else _layer_io(student, unit.layer, x)[0]
        out = student.get_submodule(unit.layer)(s_in)
        return F.mse_loss(out.float(), t_out.float()) + l2
    if unit.block is None:
        if cfg.block_inputs == "teacher":  # the tail (final norm, pooling, head) on the teacher's last block output
            with torch.no_grad(), _Capture(blocks(teacher)) as tc:
                t_logits = tc.run(teacher, x)
            s_logits = student.forward_head(student.norm(tc.outputs[-1]))
        else:
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
        if cfg.head_loss == "mse":
            return F.mse_loss(s_logits.float(), t_logits.float()) + l2
        return kl_logits(s_logits, t_logits, cfg.temperature) + l2
    if cfg.block_inputs == "teacher":  # the student's block on the teacher's input to it
        t_block = blocks(teacher)[unit.block]
        seen = []
        pre = t_block.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            with torch.no_grad(), _Capture(blocks(teacher), stop_at=unit.block) as tc:
                tc.run(teacher, x)
        finally:
            pre.remove()
        out = blocks(student)[unit.block](seen[0])
        return F.mse_loss(out.float(), tc.outputs[unit.block].float()) + l2
    with torch.no_grad(), _Capture(blocks(teacher), stop_at=unit.block) as tc:
        tc.run(teacher, x)
    with _Capture(blocks(student), stop_at=unit.block) as sc:
        sc.run(student, x)
    return F.mse_loss(sc.outputs[unit.block].float(), tc.outputs[unit.block].float()) + l2


#: the optimiser loop reads its losses back to the host every this many steps (and at checkpoints and the end)
LOSS_READ_EVERY = 25


class _LossLog:
    """Per-step losses kept on the device and read back in one transfer by :meth:`read` (no host-device sync per
    step). A loss that is not finite stops the run there, naming the step, before any checkpoint is written."""

    def __init__(self, losses: List[float], bar, cfg: OptimConfig):
        self.losses, self.bar, self.cfg = losses, bar, cfg
        self.pending: List[Tensor] = []

    def add(self, loss: Tensor) -> None:
        self.pending.append(loss.detach().float().reshape(1))

    def read(self) -> None:
        if not self.pending:
            return
        values = torch.cat(self.pending).cpu().tolist()
        self.pending = []
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise UserError(f"the optimisation diverged: the loss is {v} at step {len(self.losses) + i + 1}; "
                                f"lower the learning rates (--lr-q {self.cfg.lr_q:g}, --lr-w {self.cfg.lr_w:g}) "
                                f"or check the calibration images")
        self.losses.extend(values)
        self.bar.set_postfix(loss=f"{values[-1]:.4g}")


def train_step(student: nn.Module, teacher: nn.Module, x: Tensor, unit: _Unit, cfg: OptimConfig, opt, sched,
               forward: Optional[nn.Module] = None, dist=None, graph: Optional[GraphedStep] = None) -> Tensor:
    """One optimiser step of ``unit`` on batch ``x``: loss (under bf16 autocast with ``cfg.bf16``; scaled to the
    global batch under data parallelism), backward, Adam, learning-rate schedule. Returns the loss, not read back:
    nothing in the step reads a tensor back to the host (the images and quantizers were checked where they
    entered; value checks are off, :func:`lowbit.primitives.unchecked_values`). With ``graph`` (a
    :class:`quant.graph_step.GraphedStep` of :func:`graph_body`) all but the schedule run as its captured graph."""
    if graph is not None:
        loss = graph(x)
        sched.step()
        return loss
    with P.unchecked_values():
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = _unit_loss(student, teacher, x, unit, cfg, forward)
            if dist is not None and dist.enabled:
                loss = loss * (x.shape[0] * dist.world / cfg.batch_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return loss


def graph_body(student: nn.Module, teacher: nn.Module, unit: _Unit, cfg: OptimConfig, opt) -> Callable:
    """``body(x) -> loss``: :func:`train_step`'s device part with a graphable :class:`HostAdam` (zero grads, loss,
    backward, ``opt.update()``), the function :class:`quant.graph_step.GraphedStep` captures."""
    def body(x: Tensor) -> Tensor:
        with P.unchecked_values():
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = _unit_loss(student, teacher, x, unit, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.update()
        return loss
    return body


def use_cuda_graph(cfg: OptimConfig, device: torch.device, dist=None) -> bool:
    """Whether the optimiser captures its steps (``cfg.cuda_graph``, a CUDA device, one process)."""
    return cfg.cuda_graph and device.type == "cuda" and not (dist is not None and dist.enabled)


def _batch_stream(source: CalibImages, sampler: EpochSampler, n: int, dist):
    """The next ``n`` batches (this rank's shard of each) in the order of a copy of ``sampler``; the loop advances
    ``sampler`` itself step by step, so its checkpointed position is that of the batches consumed, not prefetched."""
    shadow = EpochSampler(sampler.n, sampler.batch_size, sampler.seed)
    shadow.load_state_dict(sampler.state_dict())

    def indices():
        for _ in range(n):
            yield dist.shard(shadow.next()).tolist()
    return source.batches(indices())


def optimize(student: nn.Module, teacher: nn.Module, images, cfg: OptimConfig,
             fingerprint: Optional[dict] = None, dist=None) -> dict:
    """Train the calibrated ``student`` against ``teacher`` on ``images`` (``[N, 3, H, W]`` or a
    :class:`calib.stream.CalibImages`; batches go to the student's device).

    Returns ``{"losses": [per-step loss], "steps": int, "completed": bool}``. ``fingerprint`` (e.g. model and bits)
    is stored in checkpoints and must match on resume. ``dist`` (a :class:`quant.distributed.Dist`, under
    ``torchrun``): data-parallel ``e2e``, every rank passes the same arguments; losses are the global batch's,
    rank 0 writes the checkpoints.
    """

    dist = dist or Dist()
    source = as_images(images)
    history = {"losses": [], "steps": 0, "completed": True}
    if dist.enabled and cfg.method != "e2e":
        raise UserError(f"--method {cfg.method} runs in one process; data-parallel (torchrun) is for --method e2e")
    if dist.enabled and cfg.batch_size < dist.world:
        raise UserError(f"the global batch size {cfg.batch_size} must be >= the {dist.world} processes")
    if cfg.method.startswith("is-vit"):
        return sos(student, teacher, source, cfg, optimize,
                   train="quantizers" if cfg.method == "is-vit-quant" else "weights")
    if cfg.method == "rtn" or cfg.iters == 0:
        return history
    device = next(student.parameters()).device
    teacher.eval().requires_grad_(False)
    student.eval()
    units = _units(student, cfg, source.take([0]).to(device))
    total = cfg.iters * len(units)
    fp = {"config": cfg.fingerprint(), **(fingerprint or {})}
    sampler = EpochSampler(len(source), cfg.batch_size, cfg.seed)
    step, opt, sched, st = 0, None, None, None
    if cfg.resume:
        if not os.path.isfile(cfg.state_path):
            raise UserError(f"--resume: no checkpoint at {cfg.state_path!r}; run without --resume to start afresh")
        st = torch.load(cfg.state_path, map_location="cpu", weights_only=False)
        if st["fingerprint"] != fp:
            raise UserError(f"--resume: checkpoint {cfg.state_path!r} was written with other settings: "
                            f"{fingerprint_diff(st['fingerprint'], fp)}; resume with the checkpoint's settings or "
                            f"start afresh")
        params = dict(student.named_parameters())
        with torch.no_grad():
            for n, t in st["params"].items():
                params[n].copy_(t)
        step = st["step"]
        history["losses"] = list(st["losses"])
        sampler.load_state_dict(st["sampler"])
        _set_rng_state(st["rng"])
    for p in student.parameters():
        p.requires_grad_(False)
    trainable = {n: p for u in units for n, p in u.params.items()}
    bar = tqdm(total=total, initial=step, desc=f"{cfg.method} PTQ", disable=not cfg.progress or not dist.is_main,
               dynamic_ncols=True)
    batches = _batch_stream(source, sampler, total - step, dist)
    log = _LossLog(history["losses"], bar, cfg)
    forward = graph = None
    graphed = use_cuda_graph(cfg, device, dist)
    pixel_range = _pixel_range(teacher, device) if cfg.hard_steps else None
    try:
        while step < total:
            ui, local = divmod(step, cfg.iters)
            unit = units[ui]
            if opt is None or local == 0:
                for p in student.parameters():
                    p.requires_grad_(False)
                for p in unit.params.values():
                    p.requires_grad_(True)
                opt, sched = _make_optim(unit, cfg, graphable=graphed)
                if st is not None and local != 0:
                    opt.load_state_dict(st["optimizer"])
                    sched.load_state_dict(st["scheduler"])
                st = None
                if graph is not None:
                    graph.release()
                graph = GraphedStep(graph_body(student, teacher, unit, cfg, opt), opt) if graphed else None
                if dist.enabled:
                    forward = dist.wrap(student, device)  # e2e: one unit, wrapped once
            sampler.next()
            x = next(batches).to(device, non_blocking=True)
            if cfg.augment:
                x = augment_batch(x, cfg.augment, (cfg.seed * 1000003 + step) * 4099 + dist.rank)
            if cfg.hard_steps:
                x = hard_batch(student, teacher, x, cfg, *pixel_range)
            loss = train_step(student, teacher, x, unit, cfg, opt, sched, forward, dist, graph)
            step += 1
            log.add(dist.all_sum(loss) / dist.world if dist.enabled else loss)
            bar.update(1)
            save = cfg.save_every and (step % cfg.save_every == 0 or step == total) and dist.is_main
            if save or step % LOSS_READ_EVERY == 0 or step == total:
                log.read()
            if save:
                save_state(cfg.state_path, {
                    "fingerprint": fp, "step": step, "losses": history["losses"],
                    "params": {n: p.detach().cpu().clone() for n, p in trainable.items()},
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "sampler": sampler.state_dict(), "rng": _rng_state(), "world_size": dist.world})
            if cfg.stop_after is not None and step >= cfg.stop_after and step < total:
                history["completed"] = False
                break
        log.read()
    finally:
        if graph is not None:
            graph.release()
        batches.close()
        bar.close()
        for n, p in student.named_parameters():
            p.requires_grad_(n in trainable)
    dist.barrier()  # rank 0's last checkpoint is on disk before any rank moves on
    history["steps"] = step
    return history
