"""Model aliases: another name for a model (``nightshift models alias gpt-4o-mini
smollm2``), so a file written for OpenAI, whose lines name OpenAI's models in
``body.model``, runs as it is.

Kept in ``HOME/model_aliases.json`` ({alias: model}), on the machine that submits: a job
records the model an alias stood for when it was submitted, so workers need no aliases.
An alias names a model as ``submit --model`` does (registry name, folder, repo id),
never another alias.
"""

from __future__ import annotations

import json
import os
import re
import secrets

from nightshift.jobs import settings
from nightshift.jobs.errors import ModelError, NotFound
from nightshift.worker import registry

FILE = "model_aliases.json"
# OpenAI's model names and the like: gpt-4o-mini, gpt-4o-2024-08-06, ft:gpt-4o:org::id,
# org/model.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


def aliases() -> dict[str, str]:
    """Every alias and the model it names, sorted by alias.

    Raises:
        ModelError: the file is damaged.
    """
    path = settings.home() / FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the model aliases in {path} ({exc}): fix or delete "
                         "the file") from exc
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ModelError(f"{path} is not an object of alias: model; fix or delete the file")
    return dict(sorted(data.items()))


def reference(name: str) -> str | None:
    """What a job records for the model ``name``: an alias's model, else as
    ``registry.reference`` says (None when unknown). An alias is looked up first, so one
    shaped like a repo id (``openai/gpt-4o``) is never downloaded."""
    return registry.reference(aliases().get(name, name))


def set_alias(name: str, model: str) -> str:
    """Make ``name`` an alias of ``model`` (replacing an alias of that name); returns the
    model it names (an alias's own model where ``model`` is one).

    Raises:
        ModelError: a name that is not valid, or an installed model's.
        NotFound: ``model`` is not a model (see ``registry.resolve``).
    """
    if not _NAME.fullmatch(name):
        raise ModelError(f"{name!r} is not a valid alias: letters, digits and . _ : / -, "
                         "starting with a letter or digit, at most 128 characters")
    # A registry name has no "/" (an alias with one cannot be a folder in the registry).
    if "/" not in name and (settings.models_dir() / name.lower()).is_dir():
        raise ModelError(f"{name!r} is an installed model's name; choose another alias")
    table = aliases()
    model = table.get(model, model)
    if registry.reference(model) is None:
        registry.resolve(model)  # raises NotFound with the registry's own message
    table[name] = model
    _write(table)
    return model


def remove_alias(name: str) -> str:
    """Remove an alias; returns the model it named.

    Raises:
        NotFound: no such alias.
    """
    table = aliases()
    if name not in table:
        raise NotFound(f"no alias {name!r} (nightshift models alias lists them)")
    model = table.pop(name)
    _write(table)
    return model


def _write(table: dict[str, str]) -> None:
    """Replace the file whole: a reader sees the old table or the new, never half."""
    path = settings.home() / FILE
    tmp = path.with_name(f".{FILE}.{secrets.token_hex(4)}.part")
    try:
        tmp.write_text(json.dumps(dict(sorted(table.items())), indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
