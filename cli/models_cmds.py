"""`nightshift models`: the local registry of named models under NIGHTSHIFT_HOME."""

from __future__ import annotations

import click

from cli import output
from cli.main import cli


@cli.group("models")
def models():
    """List, pull, import, convert and remove local models."""


@models.command("list")
@output.json_option
def list_cmd(as_json):
    """The models in the local registry."""
    from worker import registry

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
    from worker import registry

    info = registry.pull(name)
    if as_json:
        output.print_json(info.to_dict())
    else:
        click.echo(f"{info.name}: {info.architecture}, {info.parameters / 1e6:.1f}M parameters, "
                   f"{output.size(info.size_bytes)} at {info.path}")


@models.command("import-gguf")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="Registry name [default: the file name, lowercased].")
@output.json_option
def import_gguf_cmd(path, name, as_json):
    """Make an mlx-lm model folder from a GGUF file (Llama architecture)."""
    from worker import registry

    info = registry.import_gguf(path, name)
    if as_json:
        output.print_json(info.to_dict())
    else:
        click.echo(f"imported {path} as {info.name} ({output.size(info.size_bytes)})")


@models.command("rm")
@click.argument("name")
def rm_cmd(name):
    """Remove a model from the registry (its folder is deleted)."""
    from worker import registry

    registry.remove(name)
    click.echo(f"removed {name}")
