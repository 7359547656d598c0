"""The `magic` command: argument parsing, one subcommand per job, and the printing.

The top of the stack: it may import every package (configs, model, sharding,
train); nothing imports it. Each subcommand imports its work lazily so that
`magic params` and `magic --help` start without loading jax.
"""

from .main import build_parser, console_main, main

__all__ = ["build_parser", "console_main", "main"]
