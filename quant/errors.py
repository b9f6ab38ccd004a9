"""The error type of user-facing problems (bad model name, bits, data, device, files)."""


class UserError(ValueError):
    """A problem with what the user asked for; the message names it and the fix."""
