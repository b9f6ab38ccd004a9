"""The error type of user-facing problems (bad model name, bits, data, device, files), and the device check."""
import torch


class UserError(ValueError):
    """A problem with what the user asked for; the message names it and the fix."""


def check_device(name: str, flag: str = "--device") -> torch.device:
    """``torch.device(name)`` for ``cpu`` or ``cuda[:N]`` present on this machine, else :class:`UserError`."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown {flag} {name!r}; use cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {name} asked for but CUDA is not available on this machine; use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise UserError(f"unsupported {flag} {name!r}; use cpu or cuda[:N]")
    return dev
