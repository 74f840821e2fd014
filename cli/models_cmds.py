"""`nightshift models`: the local registry of named models under NIGHTSHIFT_HOME."""

from __future__ import annotations

import click
from nightshift.cli import output
from nightshift.worker.convert import BITS, GROUP_SIZES, RECIPES


@click.group("models")
def models():
    """List, pull, import, convert, alias and remove local models."""


@models.command("list")
@output.json_option
def list_cmd(as_json):
    """The models in the local registry."""
    from nightshift.worker import registry

    found = registry.list_models()
    if as_json:
        output.print_json([m.to_dict() for m in found])
        return
    if not found:
        click.echo("No models yet: nightshift models pull smollm2")
        return
    output.table(
        ["NAME", "ARCHITECTURE", "PARAMETERS", "BITS", "SIZE", "SOURCE"],
        [[m.name, m.architecture, f"{m.parameters / 1e6:.1f}M", m.bits or "float",
          output.size(m.size_bytes), m.source] for m in found],
    )


@models.command("pull")
@click.argument("name")
@output.json_option
def pull_cmd(name, as_json):
    """Install a model: smollm2 (the offline default) or an org/name repo where a network exists."""
    from nightshift.worker import registry

    info = registry.pull(name)
    if as_json:
        output.print_json(info.to_dict())
    else:
        output.echo(f"{info.name}: {info.architecture}, {info.parameters / 1e6:.1f}M parameters, "
                    f"{output.size(info.size_bytes)} at {info.path}")


@models.command("import-gguf")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="Registry name [default: the file name, lowercased].")
@output.json_option
def import_gguf_cmd(path, name, as_json):
    """Make an mlx-lm model folder from a GGUF file (Llama architecture)."""
    from nightshift.worker import registry

    info = registry.import_gguf(path, name)
    if as_json:
        output.print_json(info.to_dict())
    else:
        output.echo(f"imported {path} as {info.name} ({output.size(info.size_bytes)})")


@models.command("convert")
@click.argument("source")
@click.option("--name", required=True, help="Registry name of the converted model.")
@click.option("--q-bits", type=click.Choice([str(b) for b in BITS]),
              help="Bits per weight of the quantized layers [default: 4; mixed recipes set "
              "their own].")
@click.option("--q-group-size", type=click.Choice([str(g) for g in GROUP_SIZES]), default="64",
              show_default=True, help="Weights sharing one scale and bias.")
@click.option("--recipe", type=click.Choice(RECIPES),
              help="Per-layer bits: embed_head_6 (embedding and lm_head at 6 bits, the rest at "
              "--q-bits), or mlx-lm's mixed recipes [default: every layer at --q-bits].")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Float dtype of what stays unquantized [default: the source's].")
@output.json_option
def convert_cmd(source, name, q_bits, q_group_size, recipe, dtype, as_json):
    """Quantize a float model (registry name, folder or repo id) into the registry.

    mlx-lm does the conversion (weights are read lazily); a model of hundreds of
    billions of parameters takes hours. --json prints the new registry entry.

    \b
    nightshift models convert ./Llama-3_1-Nemotron-Ultra-253B --name nemotron-q4 \\
        --recipe embed_head_6
    nightshift models convert ./my-model --name my-model-q3 --recipe mixed_3_4
    """
    from nightshift.worker import registry
    from nightshift.worker.convert import ConvertOptions

    options = ConvertOptions(q_bits=int(q_bits) if q_bits else None,
                             q_group_size=int(q_group_size), recipe=recipe,
                             dtype=dtype)
    if not as_json:
        output.echo(f"converting {source} ({options.describe()}) ...", err=True)
    info = registry.convert(source, name, options)
    if as_json:
        output.print_json(info.to_dict())
    else:
        output.echo(f"converted {source} as {info.name}: {info.parameters / 1e6:.1f}M parameters, "
                    f"bits {info.bits}, {output.size(info.size_bytes)} at {info.path}")


@models.command("rm")
@click.argument("name")
def rm_cmd(name):
    """Remove a model from the registry (its folder is deleted)."""
    from nightshift.worker import registry

    registry.remove(name)
    output.echo(f"removed {name}")


@models.command("alias")
@click.argument("name", required=False)
@click.argument("model", required=False)
@output.json_option
def alias_cmd(name, model, as_json):
    """Give a model another name, or list the aliases (no arguments).

    A job's model (a line's body.model, submit --model) may be an alias: a file written
    for OpenAI runs as it is. The job records the model the alias names.

    \b
    nightshift models alias gpt-4o-mini smollm2
    nightshift models alias                   # list them
    nightshift models unalias gpt-4o-mini
    """
    from nightshift.worker import aliases

    if name is None:
        table = aliases.aliases()
        if as_json:
            output.print_json(table)
        elif not table:
            click.echo("No aliases yet: nightshift models alias gpt-4o-mini smollm2")
        else:
            output.table(["ALIAS", "MODEL"], [[a, m] for a, m in table.items()])
        return
    if model is None:
        raise click.UsageError("give the model the alias names: nightshift models alias "
                               "NAME MODEL (no arguments lists the aliases)")
    target = aliases.set_alias(name, model)
    if as_json:
        output.print_json({"alias": name, "model": target})
    else:
        output.echo(f"{name} -> {target}")


@models.command("unalias")
@click.argument("name")
def unalias_cmd(name):
    """Remove an alias (the model stays)."""
    from nightshift.worker import aliases

    model = aliases.remove_alias(name)
    output.echo(f"removed alias {name} (of {model})")
