"""`magic`: one command, one subcommand per job.

  magic params [PRESET ...]   parameter counts, FLOPs and memory of presets
  magic train [--preset P] [--set field=value ...]   train (default: a tiny GPT on the stdlib corpus)
  magic data [--source S] [--tokenizer sentencepiece]  build a dataset (and train a tokenizer)
  magic data prepare SOURCE --name NAME       tokenize a corpus of any size into shards, in parallel
  magic explain --preset P [--text T] [--layer N] [--plot DIR]   one forward pass, matrix by matrix
  magic generate --workdir RUN --prompt T   sample / translate (--source) / fill [MASK]s
  magic compile --preset P --topology v5p-1024 [--mesh ...] [--sweep]   plan a pod run: memory, FLOPs, step time
  magic plan --preset P --topology v5p-1024 [--tokens 300B] [--price-per-chip-hour X]   fit, time, cost; searches layouts
  magic schedule --preset P [--plot out.png]   learning rate and batch size against tokens
  magic hf import DIR --workdir RUN | magic hf export --workdir RUN --out DIR   Hugging Face GPT-2 / BERT
  magic eval --workdir RUN --tasks hellaswag [--limit N] | --text FILE_OR_DIR   lm-eval tasks, perplexity
  magic lm-eval --model matrixmagic --model_args workdir=RUN --tasks T   the harness's own command line
Each subcommand imports its module lazily so `magic params` starts fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import select
import sys
import traceback
import warnings

from matrixmagic.configs import PRESETS, ConfigError, get_preset
from matrixmagic.configs.fields import field_help
from matrixmagic.configs.train_config import train_config_for

from ..interrupts import Terminated, leave, raised_as_exceptions, signal_in_chain, stopped  # light: no jax
from ..preemption import EXIT_PREEMPTED  # light: no jax
from ..storage import StorageUnavailable, is_url  # light: no jax; sets the emulator's variables for tensorstore
from .compile import add_compile_arguments  # light: argparse only, no jax
from .data import add_parsers as add_data_parsers  # light: argparse only, no jax
from .evaluate import add_eval_arguments  # light: argparse only, no jax
from .flags import add_bos_argument, add_config_arguments, add_memory_check_argument, config_assignments
from .hf import add_hf_arguments  # light: argparse only, no jax
from .plan import add_plan_arguments  # light: argparse only, no jax
from .schedule import add_schedule_arguments  # light: argparse only, no jax


def _cmd_params(args) -> int:
    from matrixmagic.model.accounting import format_report, report

    names = args.presets or list(PRESETS)
    presets = [get_preset(n) for n in names]  # fail on a bad name before any work
    reports = [report(p) for p in presets]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in reports], indent=2))
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return 0


def _cmd_train(args) -> int:
    if args.help_fields:  # the preset's defaults; no jax
        preset = args.preset or "gpt-tiny"
        config = dataclasses.replace(train_config_for(preset), workdir=f"runs/{preset}-<6 hex of the config's hash>")
        print(f"Fields for --set (dotted name, type = default for --preset {preset}, then what it means):\n"
              + field_help(config))
        return 0
    assignments = config_assignments(args)  # a bad --mesh axis fails here, before jax starts
    from matrixmagic.sharding.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)  # before any JAX computation
    from ..loop import train
    from ..run import resolve_config

    # Every config error surfaces here, before data or compile; `magic compile` resolves the same way.
    config = resolve_config(args.preset, assignments)  # this runtime's devices and platform
    if args.print_config:  # no data read, nothing compiled
        from ..describe import print_config

        print(json.dumps(print_config(config), indent=2))
        return 0
    summary = train(config, compiled=args.compiled, allow_change=args.allow_change or (),
                    check_memory=not args.no_memory_check)
    return summary.get("exit_code", 0)  # 75 (EXIT_PREEMPTED): stopped by SIGTERM/Ctrl-C, rerun to resume


def _cmd_compile(args) -> int:
    from .compile import main as compile_main

    return compile_main(args)


def _cmd_plan(args) -> int:
    from .plan import main as plan_main

    return plan_main(args)


def _cmd_schedule(args) -> int:
    from .schedule import main as schedule_main

    return schedule_main(args)


def _cmd_explain(args) -> int:
    from .runs import cli_explain

    return cli_explain(args)


def _cmd_generate(args) -> int:
    from .runs import cli_generate

    return cli_generate(args)


def _cmd_eval(args) -> int:
    from .evaluate import main as eval_main

    return eval_main(args)


def _cmd_hf(args) -> int:
    from .hf import main as hf_main

    return hf_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magic", description="matrixmagic: Transformers as matrices, at scale.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="parameter counts, FLOPs and memory of presets")
    p.add_argument("presets", nargs="*", help="preset names (default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_params)

    add_data_parsers(sub)

    t = sub.add_parser("train", help="train a model (default: gpt-tiny on the Python stdlib corpus)")
    add_config_arguments(t)
    t.add_argument("--workdir", help="run directory (logs, checkpoints); rerun with the same one to resume")
    t.add_argument("--help-fields", action="store_true", help="list every field --set accepts")
    t.add_argument("--print-config", action="store_true", help="print the resolved config as JSON (warmup and "
                                                                "decay steps, batch ramp, mesh, dtype) and exit")
    t.add_argument("--coordinator", help="multi-process: HOST:PORT of process 0 (auto on TPU pods and SLURM)")
    t.add_argument("--num-processes", type=int, help="multi-process: how many processes run this command")
    t.add_argument("--process-id", type=int, help="multi-process: this process's index, 0..N-1")
    t.add_argument("--init-from", metavar="RUN", help="start from another run's params (fresh optimizer, step 0)")
    t.add_argument("--allow-change", action="append", metavar="FIELD,...",
                   help="resume although these config fields differ from the checkpoint's (e.g. steps,"
                        "optimizer.learning_rate); recorded in metrics.jsonl. Without it such a resume is refused")
    t.add_argument("--compiled", metavar="PATH", help="a `magic compile --serialize` executable: skip compiling "
                                                      "the step (used only if it matches this run exactly)")
    add_memory_check_argument(t)
    t.epilog = ("exit codes: 0 done; 2 config/workdir/checkpoint error (before training); 3 loss or gradient norm "
                "became NaN/Inf (last good checkpoint kept); 75 stopped by SIGTERM, Ctrl-C or a TPU preemption "
                "notice after saving a checkpoint: rerun the same command to resume; 130 a second Ctrl-C, or one "
                "before the first step.")
    t.set_defaults(func=_cmd_train)

    c = sub.add_parser("compile", help="AOT-compile the train step for a TPU slice (or CPU mesh): memory, "
                                       "FLOPs, step time; --sweep searches layouts")
    add_config_arguments(c)
    add_compile_arguments(c)
    c.set_defaults(func=_cmd_compile)

    pl = sub.add_parser("plan", help="fit, step time, and a token target's FLOPs, days, chip-hours and cost; "
                                     "searches mesh x remat x microbatches when no layout is given")
    add_config_arguments(pl)
    add_plan_arguments(pl)
    pl.set_defaults(func=_cmd_plan)

    s = sub.add_parser("schedule", help="learning rate and batch size against tokens (text, and --plot FILE)")
    add_schedule_arguments(s)
    s.set_defaults(func=_cmd_schedule)

    e = sub.add_parser("explain", help="walk one forward pass matrix by matrix (shapes, FLOPs, values, pictures)")
    e.add_argument("--preset", help="preset name: the run `magic train --preset P` made, else random weights "
                                    "(presets over 200M params run on shapes only)")
    e.add_argument("--set", action="append", metavar="FIELD=VALUE", help="the --set flags of the `magic "
                   "train` run to load when no --workdir is given (its default workdir follows from them)")
    e.add_argument("--workdir", help="a trained run directory (default: the one `magic train` with the same "
                                     "--preset/--set made)")
    e.add_argument("--text", help="input text (default: a sample sentence; shape-only runs: max_len tokens)")
    add_bos_argument(e)
    e.add_argument("--layer", type=int, default=0, help="which layer to show (default 0)")
    e.add_argument("--batch", type=int, default=1, help="batch size B of the walk")
    e.add_argument("--shapes-only", action="store_true", help="jax.eval_shape only, even for small models")
    e.add_argument("--plot", metavar="DIR", help="write attention / positional-encoding / mask PNGs here")
    add_memory_check_argument(e)
    e.set_defaults(func=_cmd_explain)

    g = sub.add_parser("generate", help="sample text (GPT), translate (enc-dec) or fill [MASK]s (BERT)")
    g.add_argument("--set", action="append", metavar="FIELD=VALUE", help="the --set flags of the `magic "
                   "train` run to load when no --workdir is given (its default workdir follows from them)")
    g.add_argument("--workdir", help="a trained run directory (default: the one `magic train` with the same "
                                     "--preset/--set made)")
    g.add_argument("--preset", help="the run `magic train --preset P` made; without one, random weights")
    g.add_argument("--prompt", help="text to continue; for BERT, text with [MASK] markers")
    g.add_argument("--source", help="encoder-decoder: the source text")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--beam-size", type=int, default=1, help="encoder-decoder: beam search width (1 = greedy)")
    g.add_argument("--length-penalty", type=float, default=0.0, help="beam search: GNMT alpha (0 = none)")
    g.add_argument("--seed", type=int, default=0)
    add_bos_argument(g)
    add_memory_check_argument(g)
    g.set_defaults(func=_cmd_generate)

    ev = sub.add_parser("eval", help="score a run: lm-eval tasks (--tasks) or perplexity on text files (--text)")
    add_eval_arguments(ev)
    ev.set_defaults(func=_cmd_eval)
    sub.add_parser("lm-eval", help="lm-evaluation-harness's own command line, with --model matrixmagic "
                                   "(pass its flags after lm-eval)", add_help=False)

    h = sub.add_parser("hf", help="import / export Hugging Face GPT-2 and BERT checkpoints (safetensors, tokenizer)")
    add_hf_arguments(h)
    h.set_defaults(func=_cmd_hf)
    return parser


COMPILE_CACHE_ENV = "MAGIC_COMPILE_CACHE"
DEFAULT_COMPILE_CACHE = "~/.cache/matrixmagic/jax"


def use_compile_cache(env=os.environ) -> None:
    """Keep XLA's compiled programs on disk between runs (jax's persistent compilation cache),
    so a second `magic generate`, `magic explain` or a resumed `magic train` skips its compiles,
    which on a CPU are most of a short command's time. Set through jax's
    environment variables, so no jax is imported here, and an explicit JAX_COMPILATION_CACHE_DIR
    wins. MAGIC_COMPILE_CACHE=DIR moves it, =0 (or off) turns it off; an unwritable directory
    turns it off too (jax would warn on every compile). Capped at 4 GiB: jax then evicts the
    least recently used entries and locks its writes."""
    path = env.get(COMPILE_CACHE_ENV, DEFAULT_COMPILE_CACHE).strip()
    if path.lower() in ("", "0", "off", "false", "no"):
        return
    if is_url(path):  # os.makedirs would make a local folder named `gs:`; compiled programs are per machine
        raise ConfigError(f"{COMPILE_CACHE_ENV}={path!r} is a URL, and the compile cache is a local directory (each "
                          f"machine keeps the programs it compiled): give a local path, e.g. "
                          f"{COMPILE_CACHE_ENV}={DEFAULT_COMPILE_CACHE}, or {COMPILE_CACHE_ENV}=0 to turn it off.")
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return
    if not os.access(path, os.W_OK):
        return
    env.setdefault("JAX_COMPILATION_CACHE_DIR", path)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")  # jax's default 1 s misses most
    env.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))


GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as PCI devices of this vendor (as jax's own probe reads them)
ACCELERATOR_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")  # NVIDIA (Docker, WSL2), ROCm


def machine_has_accelerator(pci_root: str = "/sys/bus/pci/devices") -> bool:
    """A TPU chip on the PCI bus, or a GPU device node."""
    if any(os.path.exists(node) for node in ACCELERATOR_NODES):
        return True
    for vendor in glob.glob(os.path.join(pci_root, "*", "vendor")):
        try:
            with open(vendor, encoding="ascii") as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def cpu_only_when_no_accelerator(env=os.environ, has_accelerator=machine_has_accelerator) -> None:
    """With the `tpu` extra installed, jax starts libtpu even on a machine with no TPU, and libtpu
    then prints its failed probes ("Failed to find host bounds", "unexpected worker hostname",
    "=== Source Location Trace ===") on every command. On a machine with no accelerator the only
    backend is the CPU, so say so (JAX_PLATFORMS=cpu) and libtpu never starts. `magic compile`
    and `magic plan` are left alone (TOPOLOGY_COMMANDS). A JAX_PLATFORMS
    you set yourself wins."""
    if "JAX_PLATFORMS" not in env and not has_accelerator():
        env["JAX_PLATFORMS"] = "cpu"


EXIT_INTERNAL = 1  # an exception that is not ours: a bug to report, unlike a user's mistake (exit 2)
TOPOLOGY_COMMANDS = ("compile", "plan")  # they load libtpu on purpose, to compile for a TPU slice


def console_main(argv=None) -> int:
    """The `magic` command: main() with the compile cache on, and libtpu kept quiet where there
    is no accelerator (both but for TOPOLOGY_COMMANDS). Tests call main(), and the multi-process
    tests `python -m matrixmagic.train.cli`, without them."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TOPOLOGY_COMMANDS:
        # `magic compile` and `magic plan` report compile times, which a cache hit would falsify,
        # and a TPU topology's cached executable cannot be loaded without a TPU (jax warns on each).
        try:
            use_compile_cache()
        except ConfigError as err:  # before main()'s handler: the same one line and exit 2
            print(f"{' '.join(['magic', *argv[:1]])}: error: {err}", file=sys.stderr)
            return 2
        cpu_only_when_no_accelerator()
    return leave(main(argv))


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the console as one line of words ("warning: 4 files ... are not valid UTF-8"),
    without Python's file:line prefix and source line: they say what happened, not where."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning as one line a user reads, without the source line that raised it."""
    return f"warning: {message}\n"


def backend_refused(err: BaseException, env=os.environ) -> str | None:
    """The one line for jax refusing a backend that JAX_PLATFORMS asks for and this machine
    lacks (JAX_PLATFORMS=tpu without libtpu, =gpu without CUDA): jax raises a bare RuntimeError
    from the first call that needs a device, so it is recognized by its words; None otherwise."""
    platforms = env.get("JAX_PLATFORMS", "").strip()
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if not platforms or not isinstance(err, RuntimeError) or "Unable to initialize backend" not in text:
        return None
    reason = text.split(" (set JAX_PLATFORMS=")[0]
    return (f"JAX_PLATFORMS={platforms} asks for a backend this machine cannot start ({reason}): unset "
            f"JAX_PLATFORMS (or set JAX_PLATFORMS=cpu) to use the devices that are here, or install that backend "
            f"(pip install -e '.[cuda]' for NVIDIA GPUs, '.[tpu]' on a TPU VM).")


EXIT_READER_GONE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader closed the pipe


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (`magic ... | head -1` after head
    exits): poll reports an error on such a pipe. False for anything else, so another broken
    pipe (a worker's) still surfaces as the bug it is."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no real file descriptor (a test's capture), or no poll
        return False


def main(argv=None) -> int:
    """Run one command. A reader that stops early (`magic train --print-config | head -1`) ends it
    quietly with EXIT_READER_GONE, as it would end `cat`, instead of a BrokenPipeError traceback."""
    try:
        try:
            return _main(argv)
        finally:  # flushed here, not at exit, where a closed pipe's error is printed and cannot be caught
            sys.stdout.flush()
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise
        # The exit's own flush of what is still buffered would fail again: let it go nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_READER_GONE


def _main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # every later flag is the harness's own
        from .evaluate import lm_eval_main

        args = argparse.Namespace(command="lm-eval", func=lambda _: lm_eval_main(argv[1:]))
    else:
        args = build_parser().parse_args(argv)
    warnings.formatwarning = _warning_line
    try:
        # restores the caller's showwarning afterwards; Ctrl-C and SIGTERM become exceptions (train/interrupts.py)
        with warnings.catch_warnings(), raised_as_exceptions():
            warnings.showwarning = show_warning
            return args.func(args)
    except (KeyboardInterrupt, Terminated) as err:  # a signal outside the train loop: the cleanups ran
        code, said = stopped(err)
        print(f"magic {args.command}: {said}", file=sys.stderr)
        return code
    except StorageUnavailable as err:  # the bucket stopped answering mid-run: rerunning is the fix
        if os.environ.get("MAGIC_DEBUG"):
            raise
        print(f"magic {args.command}: error: {err}", file=sys.stderr)
        # The failed save's coroutines are collected at exit, and orbax's other save threads time out
        # waiting for the step directory it could not create: each would print after our line.
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        logging.getLogger("absl").setLevel(logging.CRITICAL)
        return EXIT_PREEMPTED
    except ConfigError as err:  # ours, raised where a user's input is checked: the message names the fix
        if os.environ.get("MAGIC_DEBUG"):
            raise
        print(f"magic {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # train/guards.NonFiniteError: diverged, last good checkpoint kept
        from ..preemption import EXIT_NONFINITE  # light: no jax

        print(f"magic {args.command}: error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except BrokenPipeError:  # main() tells a closed reader of stdout from a bug
        raise
    except Exception as err:  # not ours (a jax shape error): a bug, and its traceback is what a fix needs
        if os.environ.get("MAGIC_DEBUG"):
            raise
        if signal_err := signal_in_chain(err):  # a library turned the Ctrl-C into its own error
            code, said = stopped(signal_err)
            print(f"magic {args.command}: {said}", file=sys.stderr)
            return code
        if message := backend_refused(err):  # the user's JAX_PLATFORMS, not a bug
            print(f"magic {args.command}: error: {message}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"magic {args.command}: internal error, please report it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL
