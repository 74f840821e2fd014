"""Domain errors. The CLI turns these into clear messages; nothing else catches them blindly."""

from __future__ import annotations


class NightshiftError(Exception):
    """Base of every error nightshift reports to a user."""


class InputError(NightshiftError):
    """A submitted file has bad lines. ``problems`` holds ``FILE:LINE: reason`` strings."""

    def __init__(self, problems: list[str], more: int = 0):
        self.problems = problems
        self.more = more
        text = "\n".join(problems)
        if more:
            text += f"\n... and {more} more bad lines"
        super().__init__(text)


class NotFound(NightshiftError):
    """A job, request or model that does not exist."""


class ModelError(NightshiftError):
    """A model cannot be found, imported, converted or loaded."""


class ConfigError(NightshiftError):
    """A setting (flag or environment variable) this installation cannot use."""


class ResourceError(NightshiftError):
    """The machine cannot hold what was asked (memory, disk)."""


class InvalidRequest(NightshiftError):
    """A request to `nightshift serve` that cannot be honoured as asked; ``param`` names
    the parameter at fault and ``code`` is OpenAI's error code, where there are such."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class UploadTooLarge(InvalidRequest):
    """An upload over `nightshift serve --max-upload-mb`."""


def job_not_found(job_id: str) -> NotFound:
    return NotFound(f"no job {job_id!r} (nightshift status lists the jobs)")
