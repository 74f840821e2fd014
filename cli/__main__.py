"""`python -m nightshift.cli` is `nightshift`."""

from nightshift.cli.main import cli

cli(prog_name="nightshift")
