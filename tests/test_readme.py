"""The READMEs as executable truth: every `magic` command in README.md and sharding/README.md runs,
in order, in a fresh directory, after the quick-start, and exits as the README says (0, or the
`# exit N` its comment names).

To stay within a few CI minutes every `magic train`, `generate`, `explain` and `eval` gets the same
step-count override (`--set steps=3 --set eval_batches=2 --set sample_tokens=16`), so the default
workdir each one names is still the one its neighbours find. Stand-ins and limits, each said where
it applies:
* `~/models/gpt2`, `~/models/bert-base-uncased` and `~/my_texts` are the Hugging Face fixtures of
  tests/fixtures/hf and a few stdlib files under a temporary HOME; the stand-in GPT-2 has 64
  positions, so its fine-tune also gets `--set data.seq_len=64`, and every `magic generate` without
  its own `--max-new-tokens` gets 16 (100 new tokens would not fit the stand-in's context).
* A command whose --mesh needs more devices than this CPU has runs on that many fake CPU devices.
* gpt3-175b compiles for a TPU slice take minutes each: they are checked for argument validity only
  (parsed, and the config resolved for the slice's chip count); TPU topologies need libtpu, and
  without it those commands are skipped with that reason.
* Pod, Multislice, SLURM and hand-started multi-host commands cannot run here: skipped, with why.
* `gs://my-bucket/...` is a bucket on the test GCS server (tests/gcs_server.py), reached through
  STORAGE_EMULATOR_HOST, with `gs://my-bucket/texts` holding the same files as `~/my_texts`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "sharding" / "README.md"]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
FAST = ["--set", "steps=3", "--set", "eval_batches=2", "--set", "sample_tokens=16"]
MAGIC = str(Path(sys.executable).parent / "magic")


def readme_commands() -> list[tuple[str, str]]:
    """(README name, command line) of every shell line in a ```bash block; lines continued with a
    backslash or inside an open double quote are joined; comments kept (they carry `# exit N`)."""
    out = []
    for path in READMES:
        block, pending = False, ""
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                block = line.strip() == "```bash"
                continue
            if not block or not line.strip() or (line.lstrip().startswith("#") and not pending):
                continue
            pending += (" " if pending else "") + line.strip().removesuffix("\\").strip()
            if line.rstrip().endswith("\\") or pending.count('"') % 2:
                continue
            out.append((path.relative_to(ROOT).as_posix(), pending))
            pending = ""
    return out


def split_command(line: str) -> tuple[list[list[str]], int, str]:
    """(the `&&`-joined commands as argv lists, the expected exit code, why it cannot run or '')."""
    code, _, comment = line.partition("#")
    expected = int(m.group(1)) if (m := re.search(r"exit (\d+)", comment)) else 0
    if code.lstrip().startswith(("gcloud", "srun")) or " ... " in code:
        return [], expected, "needs a TPU pod, a SLURM cluster or other hosts (see tests/test_multihost.py)"
    if "magic" not in code:
        return [], expected, "the test suite itself" if "pytest" in code else "not a magic command"
    commands = []
    for argv in (shlex.split(part) for part in code.split("&&")):
        if argv[0].endswith("pytest"):
            return [], expected, "the test suite itself"
        if argv[0] == "python3" or argv[0].endswith("pip"):
            continue  # the virtualenv and the install: this test runs in an installed one
        commands.append(argv)
    return commands, expected, ""


def expand_home(word: str, home: Path) -> str:
    """`~/x` and `field=~/x` as bash expands them."""
    word = f"{home}{word[1:]}" if word.startswith("~/") else word
    return word.replace("=~/", f"={home}/")


def env_prefix(argv: list[str]) -> list[str]:
    """Leading VAR=value words of a command."""
    prefix = []
    for word in argv:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", word):
            break
        prefix.append(word)
    return prefix


def mesh_devices(argv: list[str]) -> int:
    if "--mesh" not in argv:
        return 1
    sizes = [int(v.split("=")[1]) for v in argv[argv.index("--mesh") + 1].split(",")]
    return math.prod(s for s in sizes if s > 0)


def argument_check(argv: list[str]) -> None:
    """A TPU-slice compile of gpt3-175b, checked without compiling: the flags parse and the
    config resolves for the slice's chips on TPU."""
    from matrixmagic.train.cli import build_parser
    from matrixmagic.train.cli.flags import config_assignments
    from matrixmagic.train.planning.chips import parse_target
    from matrixmagic.train.run import resolve_config

    args = build_parser().parse_args(argv[1:])
    config = resolve_config(args.preset, config_assignments(args), devices=parse_target(args.topology).chips,
                            platform="tpu")
    assert config.preset == "gpt3-175b"


@pytest.fixture
def bucket(tmp_path):
    from gcs_helpers import GcsServer

    with GcsServer(bucket="my-bucket", log=str(tmp_path / "gcs.log")) as server:
        yield server


@pytest.fixture
def user_home(tmp_path, bucket):
    """A temporary HOME holding the stand-in model directories and texts (also in the test
    bucket), and a data dir of its own: `magic data prepare ~/my_texts --name prose` names a
    folder under it, and ~/my_texts, in a new temporary HOME each run, is another source to the
    prepare of the last run (which it refuses to mix with). The compile cache stays where it was."""
    from gcs_helpers import put_object

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copytree(FIXTURES / "gpt2", home / "models" / "gpt2")
    shutil.copytree(FIXTURES / "bert", home / "models" / "bert-base-uncased")
    texts = home / "my_texts"
    texts.mkdir()
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py"):
        shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], name), texts / f"{name}.txt")
        put_object(bucket, f"texts/{name}.txt", (texts / f"{name}.txt").read_bytes())
    real = Path.home()
    env = {**os.environ, "HOME": str(home), **bucket.env,
           "MATRIXMAGIC_DATA_DIR": str(tmp_path / "tfds"),
           "MAGIC_COMPILE_CACHE": os.environ.get("MAGIC_COMPILE_CACHE", str(real / ".cache/matrixmagic/jax"))}
    env.pop("JAX_PLATFORMS", None)  # as a user's shell has it
    work = tmp_path / "work"
    work.mkdir()
    return home, work, env


def test_readme_commands_parse():
    commands = readme_commands()
    assert commands[0] == ("README.md", "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/magic train")
    joined = [line for _, line in commands if line.startswith("magic train --init-from")]
    assert joined and "--set optimizer.warmup_steps=50" in joined[0]  # continuation lines joined
    assert split_command("magic compile --preset x   # exit 3: does not fit")[1] == 3


def test_readme_default_workdir_is_the_one_train_makes():
    from matrixmagic.train.run import resolve_config

    named = re.findall(r"runs/gpt-tiny-[0-9a-f]{6}", (ROOT / "README.md").read_text())
    assert named and set(named) == {resolve_config(None, [], platform="cpu").workdir}


@pytest.mark.slow
def test_readme_commands_run_in_order(user_home):
    home, work, env = user_home
    walked, failures, outputs = [], [], []
    for readme, line in readme_commands():
        commands, expected, why = split_command(line)
        if why:
            walked.append(f"skip  {readme}: {line}  ({why})")
            print(walked[-1], flush=True)
            continue
        codes = []
        for argv in commands:
            prefix = env_prefix(argv)
            argv = argv[len(prefix):]
            argv[0] = MAGIC if argv[0].endswith("magic") else argv[0]
            run_env = {**env, **dict(p.split("=", 1) for p in prefix)}
            sub = argv[1] if len(argv) > 1 else ""
            if sub in ("compile", "plan") and "--topology" in argv:
                topology = argv[argv.index("--topology") + 1]
                tpu = topology.startswith("v")
                if tpu and importlib.util.find_spec("libtpu") is None:
                    why = "TPU topologies need libtpu (pip install -e '.[tpu]')"
                    break
                if tpu and "gpt3-175b" in argv:
                    argument_check(argv)
                    why = "argument validity only (a 175B compile takes minutes)"
                    codes.append(expected)
                    continue
            if sub in ("train", "generate", "explain", "eval") and "--help-fields" not in argv:
                argv = argv + FAST + (["--set", "data.seq_len=64"] if "--init-from" in argv else [])
                if sub == "generate" and "--max-new-tokens" not in argv:
                    argv += ["--max-new-tokens", "16"]  # the 64-position stand-in GPT-2 has no room for 100
            devices = mesh_devices(argv)
            if devices > 1 and "XLA_FLAGS" not in run_env:
                run_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
            argv = [expand_home(a, home) for a in argv]
            result = subprocess.run(argv, cwd=work, env=run_env, capture_output=True, text=True, timeout=600)
            codes.append(result.returncode)
            outputs.append((line, result.stdout))
            if result.returncode != expected:
                failures.append(f"{line}\n  exit {result.returncode}, expected {expected}\n{result.stderr[-2000:]}")
                break
        if why and not codes:
            walked.append(f"skip  {readme}: {line}  ({why})")
        else:
            walked.append(f"exit {','.join(map(str, codes))}  {readme}: {line}" + (f"  ({why})" if why else ""))
        print(walked[-1], flush=True)  # pytest -s shows the walk as it goes
    assert not failures, "\n\n".join(failures)
    # The training section's plain `magic train` repeats the quick-start: the same run, already done.
    again = [out for line, out in outputs if line.startswith("magic train  ")]
    assert again and "already finished at step 3" in again[0] and "sample from" not in again[0], again
    assert sum(w.startswith("exit") for w in walked) >= 20


def test_presets_table_is_what_magic_params_prints(capsys):
    """Each row's exact count (and MLM head) is the one `magic params --json` prints for that preset."""
    import json

    from matrixmagic.train.cli import main

    text = (ROOT / "README.md").read_text()
    row = r"^\| ([a-z0-9.-]+) \| [0-9+]+ \| \d+\*? \| \d+\*? \| ([\d,]+)(?: \(\+([\d,]+) MLM head\))? \|"
    rows = re.findall(row, text, re.M)
    assert len(rows) == 16, rows
    assert main(["params", "--json", *[name for name, *_ in rows]]) == 0
    printed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name, params, head in rows:
        assert int(params.replace(",", "")) == printed[name]["params"], name
        assert int((head or "0").replace(",", "")) == printed[name]["mlm_head"], name
