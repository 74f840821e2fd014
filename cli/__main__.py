"""`python -m cli` is `nightshift`."""

from cli.main import cli

cli(prog_name="nightshift")
