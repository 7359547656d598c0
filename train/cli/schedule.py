"""`magic schedule`: a run's learning rate and batch size against tokens, as text and a picture.

  magic schedule --preset gpt3-175b --devices 256 --plot gpt3-175b-schedule.png

It resolves the config exactly as `magic train` does (the same flags; `--devices` sizes the
batch for a machine other than this one) and draws the run's own schedule function.
`--plot` takes a local path or a gs:// URL: the picture is rendered to bytes in memory and
written through train/storage.py, so a bucket path never becomes a local folder named `gs:`.
"""

from __future__ import annotations

import io
import os

from matrixmagic.configs import ConfigError

from .. import storage
from .flags import add_config_arguments, config_assignments
from .paths import check_output_file, output_path


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
    path = output_path(path, "--plot")
    if not storage.is_remote(path) and os.path.isdir(path):  # a gs:// folder: check_output_file says so
        raise ConfigError(f"--plot {path!r} is a directory: give a file in it, e.g. "
                          f"--plot {os.path.join(path, 'schedule.png')}.")
    suffix = _suffix(path)
    if suffix not in formats:
        raise ConfigError(f"--plot {path!r}: name the file with one of matplotlib's formats, e.g. .png "
                          f"({', '.join(sorted(formats))}).")
    return check_output_file(path, "--plot")


def _suffix(path: str) -> str:
    return os.path.splitext(storage.basename(path))[1].lstrip(".").lower()


def render_schedule(config, curve, suffix: str) -> bytes:
    """The schedule picture as the bytes of a `suffix` file (png, pdf, svg, ...): drawn by
    describe.plot_schedule into memory, its format named through matplotlib's rc setting
    (a file object carries no suffix)."""
    import matplotlib

    from ..describe import plot_schedule

    buffer = io.BytesIO()
    with matplotlib.rc_context({"savefig.format": suffix}):
        plot_schedule(config, curve, buffer)
    return buffer.getvalue()


def main(args) -> int:
    if args.plot:
        args.plot = check_plot_path(args.plot)
    if args.devices is not None and args.devices < 1:
        raise ConfigError(f"--devices {args.devices} is invalid: use a positive number of devices.")
    assignments = config_assignments(args)  # a bad --mesh axis fails here, before jax starts
    import jax

    from ..describe import horizon, schedule_curve, summary_lines
    from ..run import resolve_config

    config = resolve_config(args.preset, assignments, devices=args.devices)
    devices = args.devices or jax.device_count()
    print("\n".join(summary_lines(config, devices)))
    if args.plot:
        curve = schedule_curve(config, horizon(config))
        storage.write_bytes(args.plot, render_schedule(config, curve, _suffix(args.plot)))
        print(f"wrote {args.plot}")
    return 0
