"""`magic schedule`: a run's learning rate and batch size against tokens, as text and a picture.

  magic schedule --preset gpt3-175b --devices 256 --plot gpt3-175b-schedule.png

It resolves the config exactly as `magic train` does (the same flags; `--devices` sizes the
batch for a machine other than this one) and draws the run's own schedule function.
"""

from __future__ import annotations

import os

from matrixmagic.configs import ConfigError

from .flags import add_config_arguments, config_assignments
from .paths import check_output_file


def add_schedule_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--devices", type=int, help="size the batch for this many devices (default: this machine's)")
    p.add_argument("--plot", metavar="FILE", help="write the picture here (.png, .pdf, .svg: matplotlib's formats)")


def check_plot_path(path: str) -> str:
    """The --plot file must be a writable file path with a format matplotlib writes: checked
    before any work, so a bad path never costs a resolve and a draw."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if os.path.isdir(path):
        raise ConfigError(f"--plot {path!r} is a directory: give a file in it, e.g. "
                          f"--plot {os.path.join(path, 'schedule.png')}.")
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    if suffix not in formats:
        raise ConfigError(f"--plot {path!r}: name the file with one of matplotlib's formats, e.g. .png "
                          f"({', '.join(sorted(formats))}).")
    return check_output_file(path, "--plot")


def main(args) -> int:
    if args.plot:
        check_plot_path(args.plot)
    if args.devices is not None and args.devices < 1:
        raise ConfigError(f"--devices {args.devices} is invalid: use a positive number of devices.")
    assignments = config_assignments(args)  # a bad --mesh axis fails here, before jax starts
    import jax

    from ..describe import horizon, plot_schedule, schedule_curve, summary_lines
    from ..run import resolve_config

    config = resolve_config(args.preset, assignments, devices=args.devices)
    devices = args.devices or jax.device_count()
    print("\n".join(summary_lines(config, devices)))
    if args.plot:
        curve = schedule_curve(config, horizon(config))
        print(f"wrote {plot_schedule(config, curve, args.plot)}")
    return 0
