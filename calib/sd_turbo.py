"""One-step SD-Turbo pieces, differentiable end to end: prompt-embedding injection into the CLIP text encoder,
the single Euler step at t=999 (trailing spacing), VAE decode to images in [0, 1].

Prompt layout fed to the text encoder (length ``tokenizer.model_max_length``, 77 for CLIP)::

    [BOS, e_1 .. e_T, EOS, PAD, ..., PAD]      T learned token embeddings at positions 1..T, EOS at T + 1

The learned embeddings replace the output of the encoder's input token-embedding layer at positions 1..T (a
forward hook; transformers 5 has no ``inputs_embeds`` on ``CLIPTextModel``); CLIP adds position embeddings after
that layer, as for ordinary tokens. The pooled (EOS) embedding is the final hidden state at position T + 1.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch

from calib import common
from lowbit.errors import UserError

DEFAULT_SD = "stabilityai/sd-turbo"


@dataclass
class SDTurbo:
    """The frozen parts of an SD-Turbo pipeline used for one-step generation."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def token_dim(self) -> int:
        return self.text_encoder.get_input_embeddings().embedding_dim

    @classmethod
    def from_pipeline(cls, pipe) -> "SDTurbo":
        sd = cls(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, pipe.scheduler)
        for m in (sd.text_encoder, sd.unet, sd.vae):
            m.eval().requires_grad_(False)
        return sd

    def to(self, device, dtype: torch.dtype = torch.float32) -> "SDTurbo":
        """Text encoder stays fp32 (prompts are fp32); UNet and VAE take ``dtype`` (bf16 on GPU)."""
        self.text_encoder.to(device, torch.float32)
        self.unet.to(device, dtype)
        self.vae.to(device, dtype)
        return self

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        self.vae.enable_gradient_checkpointing()


OFFLINE_HINT = (f"offline, download '{DEFAULT_SD}' elsewhere (e.g. `huggingface-cli download {DEFAULT_SD} "
                f"--local-dir sd-turbo`), copy the folder here and pass it with --sd-path /path/to/sd-turbo")


def check_sd_path(path: str) -> None:
    """Fail fast, before anything heavy is loaded, when ``path`` (``--sd-path``) can not give a pipeline: a local
    folder without ``model_index.json``, a missing path that is no hub id, or a hub id that is not in the local cache
    while the hub is unreachable. Raises :class:`lowbit.errors.UserError`."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise UserError(f"--sd-path {path!r} is not a diffusers pipeline folder (no model_index.json); pass the "
                            f"folder of a saved SD-Turbo pipeline or the hub id {DEFAULT_SD}")
        return
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise UserError(f"--sd-path {path!r} does not exist; pass a local diffusers folder of SD-Turbo or the hub "
                        f"id {DEFAULT_SD}") from None
    if not common.hub_online() and not isinstance(try_to_load_from_cache(path, "model_index.json"), str):
        raise UserError(f"--sd-path {path!r} is neither a local folder nor in the hub cache, and the hub is not "
                        f"reachable; {OFFLINE_HINT}")


def load_sd_turbo(path: str = DEFAULT_SD) -> SDTurbo:
    """Load SD-Turbo (a diffusers folder or hub id) with its scheduler set to Euler, trailing spacing.

    Hub ids are read from the local cache only when the hub is unreachable. :class:`lowbit.errors.UserError` on
    failure."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    check_sd_path(path)
    local_only = os.path.isdir(path) or not common.hub_online()
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # no multi-line advice (accelerate, hub retries) around our error line
    try:
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False,
                                                       local_files_only=local_only)
    except Exception as e:  # noqa: BLE001 - hub/network/file errors all mean the same thing to the user
        msg = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"could not load the SD-Turbo pipeline from --sd-path {path!r} ({type(e).__name__}: {msg}); "
                        f"{OFFLINE_HINT}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return SDTurbo.from_pipeline(pipe)


def prompt_input_ids(tokenizer, n_tokens: int, batch: int) -> tuple[torch.Tensor, int]:
    """Token ids ``[batch, L]`` of the layout in the module docstring and the EOS index.

    Placeholders at 1..T are BOS ids: never equal to EOS (PAD may be) and below it, so CLIP's own pooling (first EOS,
    or argmax id for legacy configs) lands on position T + 1."""
    length = tokenizer.model_max_length
    if n_tokens + 2 > length:
        raise ValueError(f"{n_tokens} prompt tokens + BOS + EOS exceed the text encoder's {length} positions")
    ids = torch.full((length,), tokenizer.pad_token_id, dtype=torch.long)
    ids[: n_tokens + 1] = tokenizer.bos_token_id
    ids[n_tokens + 1] = tokenizer.eos_token_id
    return ids.expand(batch, length).clone(), n_tokens + 1


@contextlib.contextmanager
def inject_token_embeddings(text_encoder: torch.nn.Module, embeds: torch.Tensor):
    """Within the block, the input token-embedding layer's output at positions ``1..T`` is ``embeds [B, T, D]``."""
    n = embeds.shape[1]

    def hook(_module, _inputs, out):
        return torch.cat([out[:, :1], embeds.to(out.dtype), out[:, n + 1:]], dim=1)

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_prompt_embeddings(sd: SDTurbo, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``embeds [B, T, D]`` -> (conditioning ``[B, L, D]`` for the UNet, pooled EOS embedding ``[B, D]``)."""
    ids, eos = prompt_input_ids(sd.tokenizer, embeds.shape[1], embeds.shape[0])
    with inject_token_embeddings(sd.text_encoder, embeds):
        hidden = sd.text_encoder(ids.to(embeds.device))[0]
    return hidden, hidden[:, eos]


def encode_text(sd: SDTurbo, prompts: list[str]) -> torch.Tensor:
    """Plain text prompts -> conditioning ``[B, L, D]``, tokenised as the stock pipeline does."""
    ids = sd.tokenizer(prompts, padding="max_length", max_length=sd.tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    return sd.text_encoder(ids.to(next(sd.text_encoder.parameters()).device))[0]


def description_token_embeddings(sd: SDTurbo, text: str, n_tokens: int) -> torch.Tensor:
    """Token embeddings ``[n, D]`` (n <= n_tokens) of ``text`` without BOS/EOS, truncated to ``n_tokens``."""
    ids = sd.tokenizer(text, add_special_tokens=False).input_ids[:n_tokens]
    table = sd.text_encoder.get_input_embeddings().weight
    return table[torch.tensor(ids, dtype=torch.long, device=table.device)].detach().float()


def latent_shape(sd: SDTurbo, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    f = 2 ** (len(sd.vae.config.block_out_channels) - 1)
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of the VAE factor {f}, got {height}x{width}")
    return batch, sd.unet.config.in_channels, height // f, width // f


def one_step_sigma(scheduler) -> tuple[float, int]:
    """(sigma, timestep) of the single Euler step: timestep 999 with trailing spacing."""
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    with warnings.catch_warnings():  # diffusers' np.array(tensor) trips numpy 2's copy-keyword deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        sched.set_timesteps(1)
    return float(sched.sigmas[0]), int(sched.timesteps[0])


def one_step_generate(sd: SDTurbo, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] (fp32) from conditioning ``[B, L, D]`` and unit noise latents.

    ``x = noise * sigma`` (init_noise_sigma of trailing spacing), ``eps = unet(x / sqrt(sigma^2 + 1), t, cond)``,
    ``x0 = x - sigma * eps`` (epsilon prediction; v prediction: ``x0 = x / (sigma^2+1) - sigma eps / sqrt(sigma^2+1)``),
    ``image = clamp(vae.decode(x0 / scaling_factor) / 2 + 0.5, 0, 1)``.
    """
    sigma, t = one_step_sigma(sd.scheduler)
    dtype = sd.unet.dtype
    x = noise.to(sd.device, torch.float32) * sigma
    scale = (sigma ** 2 + 1) ** 0.5
    timestep = torch.tensor(t, device=sd.device)
    out = sd.unet((x / scale).to(dtype), timestep, encoder_hidden_states=cond.to(dtype)).sample.float()
    kind = sd.scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = x - sigma * out
    elif kind == "v_prediction":
        x0 = out * (-sigma / scale) + x / (sigma ** 2 + 1)
    else:
        raise ValueError(f"scheduler prediction_type {kind!r} is not supported (use epsilon or v_prediction)")
    image = sd.vae.decode((x0 / sd.vae.config.scaling_factor).to(sd.vae.dtype)).sample.float()
    return (image / 2 + 0.5).clamp(0, 1)
