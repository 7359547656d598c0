"""The READMEs and docs as executable truth: every `magic` command in README.md, in docs/*.md and
in sharding/README.md runs, in order (walked_pages), in a fresh directory, after the quick-start, and
exits as its page says (0, or the `# exit N` its comment names). The README's tour repeats a few
commands of docs/ (one per capability): a docs/ line that repeats a README line's command is the
same step of the walk and does not run twice.

To stay within a few CI minutes every `magic train`, `generate`, `explain` and `eval` gets the same
step-count override (`--set steps=3 --set eval_batches=2 --set sample_tokens=16`), so the default
workdir each one names is still the one its neighbours find. Stand-ins and limits, each said where
it applies:
* `~/models/gpt2`, `~/models/bert-base-uncased` and `~/my_texts` are the Hugging Face fixtures of
  tests/fixtures/hf and a few stdlib files under a temporary HOME; the stand-in GPT-2 has 64
  positions, so its fine-tune also gets `--set data.seq_len=64`, and every `magic generate` without
  its own `--max-new-tokens` gets 16 (100 new tokens would not fit the stand-in's context).
* A command whose --mesh needs more devices than this CPU has runs on that many fake CPU devices.
* gpt3-175b and llama3-70b/405b compiles for a TPU slice take minutes each: they are checked for argument validity only
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
# The walk's order: what a later page runs finds what an earlier one made (runs/gpt2 is imported in
# hugging-face.md and evaluated in evaluation.md; prose is prepared in data.md). Any other docs/*.md
# follows in name order, before sharding/README.md.
DOCS_ORDER = ["presets.md", "training.md", "data.md", "generation-and-explain.md", "hugging-face.md",
              "evaluation.md", "sharding-and-pods.md", "planning.md"]


def walked_pages() -> list[Path]:
    docs = [ROOT / "docs" / name for name in DOCS_ORDER]
    rest = sorted(p for p in (ROOT / "docs").glob("*.md") if p not in docs)
    return [ROOT / "README.md", *docs, *rest, ROOT / "sharding" / "README.md"]


READMES = walked_pages()
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
FAST = ["--set", "steps=3", "--set", "eval_batches=2", "--set", "sample_tokens=16"]
MAGIC = str(Path(sys.executable).parent / "magic")


def readme_commands() -> list[tuple[str, str]]:
    """(page name, command line) of every shell line in a ```bash block of the walked pages; lines
    continued with a backslash or inside an open double quote are joined; comments kept (they carry
    `# exit N`)."""
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


def command_key(line: str) -> str:
    """A command line without its comment and with its spacing normalized."""
    return " ".join(line.partition("#")[0].split())


def tour_repeats(commands: list[tuple[str, str]]) -> set[int]:
    """Indices of the docs/ lines whose command a README.md line already gave (the tour)."""
    readme = {command_key(line) for page, line in commands if page == "README.md"}
    return {i for i, (page, line) in enumerate(commands) if page.startswith("docs/") and command_key(line) in readme}


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


# Presets whose TPU-slice compiles take minutes each (a plan compiles up to four).
SLOW_TO_COMPILE = ("gpt3-175b", "llama3-70b", "llama3-405b", "gpt3-xl")  # gpt3-xl: planning.md's 32k context


def argument_check(argv: list[str]) -> None:
    """A TPU-slice compile of a SLOW_TO_COMPILE preset, checked without compiling: the flags parse
    and the config resolves for the slice's chips on TPU."""
    from matrixmagic.train.cli import build_parser
    from matrixmagic.train.cli.compile import slice_assignments
    from matrixmagic.train.cli.flags import config_assignments
    from matrixmagic.train.planning.chips import parse_target, with_slices
    from matrixmagic.train.run import resolve_config

    args = build_parser().parse_args(argv[1:])
    target = with_slices(parse_target(args.topology), args.slices, args.dcn_gbps)
    assignments = config_assignments(args)
    assignments.update(slice_assignments(args.mesh, assignments, target.slices))
    config = resolve_config(args.preset, assignments, devices=target.chips, platform="tpu")
    assert config.preset == args.preset in SLOW_TO_COMPILE


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


TRAIN = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/magic train"
TEST = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest -n auto"


def test_readme_commands_parse():
    commands = readme_commands()
    assert commands[0] == ("README.md", TRAIN)
    joined = [line for _, line in commands if line.startswith("magic train --init-from")]
    assert joined and "--set optimizer.learning_rate=1e-4" in joined[0]  # continuation lines joined
    assert split_command("magic compile --preset x   # exit 3: does not fit")[1] == 3
    assert {page for page, _ in commands} >= {"README.md", "sharding/README.md",
                                              *(f"docs/{name}" for name in DOCS_ORDER)}
    # The tour's commands come from the docs, except its export of the imported GPT-2 and the
    # two commands at the top.
    tour = [line for page, line in commands if page == "README.md"][2:]
    repeated = {command_key(commands[i][1]) for i in tour_repeats(commands)}
    assert [line for line in tour if command_key(line) not in repeated] == \
        [next(line for line in tour if line.startswith("magic hf export"))]


def test_readme_starts_with_the_two_commands_ci_runs():
    """The README's first two commands are the main job and the test suite, in the form a new user
    pastes; .ci/run installs the same extra and runs the same pytest command (in its own venv)."""
    pages = [line for page, line in readme_commands() if page == "README.md"]
    assert pages[:2] == [TRAIN, TEST]
    ci = (ROOT / ".ci" / "run").read_text()
    extras = re.findall(r"pip install .*-e '\.\[([\w,]+)\]'", ci)
    assert extras and "test" in extras[0].split(","), extras  # CI may add extras (tpu), never drop test
    assert re.search(r"^\.venv-ci/bin/pytest -n auto$", ci, re.M)
    text = (ROOT / "README.md").read_text()
    assert "Python 3.11 or newer" in text and 'requires-python = ">=3.11"' in (ROOT / "pyproject.toml").read_text()


def test_readme_is_short_and_undated():
    """README.md: at most 250 lines, no dated measurements (those live in docs/benchmarks*.md)."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert not re.findall(r"\b20\d\d-\d\d-\d\d\b", text)
    for page in re.findall(r"\]\(((?:docs|sharding|notebooks)/[^)#]+)", text):
        assert (ROOT / page).is_file(), page


def test_links_between_pages_resolve():
    """Every relative link in README.md and docs/*.md names a file that exists, and a #section of a
    Markdown page one of its headings (as GitHub writes their anchors)."""
    def anchors(page: Path) -> set[str]:
        heads = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target, anchor in re.findall(r"\]\((?!https?:)([^)#\s]*)(?:#([^)\s]+))?\)", page.read_text()):
            path = (page.parent / target).resolve() if target else page
            assert path.exists(), (page.name, target)
            if anchor:
                assert anchor in anchors(path), (page.name, target, anchor)


def test_paths_the_pages_name_exist():
    """A file or folder of this repository named in backticks in README.md, docs/*.md or
    sharding/README.md exists (code moves; its pages follow)."""
    top = "configs|model|sharding|train|tests|benchmarks|docs|notebooks"
    for page in [ROOT / "README.md", ROOT / "sharding" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in re.findall(rf"`(?:python |\.venv/bin/python )?((?:{top})/[\w/.-]*\w/?)[`: ]", page.read_text()):
            assert (ROOT / path).exists(), (page.name, path)


def test_concept_table_names_modules_that_exist():
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (.+?) \| (`[^|]+`) \|$", text, re.M)
    assert len(rows) >= 17, rows
    for concept, where in rows:
        for path in re.findall(r"`([\w/]+\.py)`", where):
            assert (ROOT / path).is_file(), (concept, path)


def test_readme_default_workdir_is_the_one_train_makes():
    from matrixmagic.train.run import resolve_config

    readme = re.findall(r"runs/gpt-tiny-[0-9a-f]{6}", (ROOT / "README.md").read_text())
    named = [m for page in READMES for m in re.findall(r"runs/gpt-tiny-[0-9a-f]{6}", page.read_text())]
    assert readme and set(named) == {resolve_config(None, [], platform="cpu").workdir}


@pytest.mark.slow
def test_readme_commands_run_in_order(user_home):
    home, work, env = user_home
    walked, failures, outputs = [], [], []
    commands_of_pages = readme_commands()
    repeats = tour_repeats(commands_of_pages)
    for index, (readme, line) in enumerate(commands_of_pages):
        if index in repeats:
            walked.append(f"skip  {readme}: {line}  (README.md's tour walked this command above)")
            print(walked[-1], flush=True)
            continue
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
                if tpu and any(name in argv for name in SLOW_TO_COMPILE):
                    argument_check(argv)
                    why = "argument validity only (a compile at this size takes minutes)"
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
    # docs/training.md's plain `magic train` repeats the quick-start: the same run, already done.
    again = [out for line, out in outputs if line.startswith("magic train  ")]
    assert again and "already finished at step 3" in again[0] and "sample from" not in again[0], again
    assert sum(w.startswith("exit") for w in walked) >= 36  # without libtpu; more with it


def test_presets_table_is_what_magic_params_prints(capsys):
    """Each row's exact count (and MLM head) is the one `magic params --json` prints for that preset."""
    import json

    from matrixmagic.train.cli import main

    text = (ROOT / "docs" / "presets.md").read_text()
    row = r"^\| ([a-z0-9.-]+) \| [0-9+]+ \| \d+\*? \| \d+\*? \| ([\d,]+)(?: \(\+([\d,]+) MLM head\))? \|"
    rows = re.findall(row, text, re.M)
    assert len(rows) == 22, rows
    assert main(["params", "--json", *[name for name, *_ in rows]]) == 0
    printed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name, params, head in rows:
        assert int(params.replace(",", "")) == printed[name]["params"], name
        assert int((head or "0").replace(",", "")) == printed[name]["mlm_head"], name


def test_gpt3_schedule_figures_in_training_md_are_what_the_commands_resolve():
    """docs/training.md quotes gpt3-175b's tokens per step, warmup and decay steps for 256 devices
    (its `magic schedule --devices 256` line) and for one (its `--print-config` line)."""
    from matrixmagic.train.run import resolve_config

    text = " ".join((ROOT / "docs" / "training.md").read_text().split())
    for devices in (256, 1):
        config = resolve_config("gpt3-175b", {}, devices=devices, platform="cpu")
        rows, tokens = config.batch_size, config.tokens_per_step
        assert f"{rows} × {config.data.seq_len} = {tokens:,}" in text, (devices, rows, tokens)
        steps = (f"warms up for {config.warmup_steps} steps and decays over {config.decay_steps:,}" if devices > 1
                 else f"prints {config.warmup_steps} and {config.decay_steps:,}")
        assert steps in text, (devices, steps)
