"""`magic`: one command, one subcommand per job.

  magic params [PRESET ...]   parameter counts, FLOPs and memory of presets
Each subcommand imports its module lazily so `magic params` starts fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _cmd_params(args) -> int:
    from configs import PRESETS, get_preset
    from model.accounting import format_report, report

    names = args.presets or list(PRESETS)
    presets = [get_preset(n) for n in names]  # fail on a bad name before any work
    reports = [report(p) for p in presets]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in reports], indent=2))
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magic", description="matrixmagic: Transformers as matrices, at scale.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="parameter counts, FLOPs and memory of presets")
    p.add_argument("presets", nargs="*", help="preset names (default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_params)
    return parser


def main(argv=None) -> int:
    from configs import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"magic {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
