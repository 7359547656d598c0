"""Write docs/bad-input.md: every case of tests/user_error_cases.py run through the real CLI,
with the command and the message a user sees, so the table is what the code prints today;
then the run situations of issue 16 (a second writer, a changed resume, a damaged latest
checkpoint), staged on a tiny 4-step run (tests/run_helpers.py) as tests/test_run_lock.py and
tests/test_resume_checks.py stage them.

  .venv/bin/python docs/bad_input_table.py        (about three minutes: one `magic` start per case)
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from run_helpers import magic_env, train_command, write_corpus
from test_user_errors import run_cli  # tests/ is not a package: imported from its folder
from user_error_cases import CASES, command, make_inputs

HEADER = """# Bad input: what a user sees

Every row is a mistake a new user makes, run through the real `magic` command by
`docs/bad_input_table.py` (generated from the cases `tests/test_user_errors.py` checks: each
exits 2 with one message and no traceback). Paths under the test's temporary folder are
shown as `<tmp>`. Cases marked 16 are issue 16's list. Not a row, since it is no mistake but a
risk: a `magic train --compiled` file is code (jax's executable format is a pickle), so a file this
user's key did not seal is refused before it is opened; treat serialized executables as code
(docs/planning.md, tests/test_compiled_file.py).

| case | issue | command | exit | message |
|---|---|---|---|---|
"""


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def shown(arg: str) -> str:
    return arg if len(arg) < 60 else arg[:20] + f"...({len(arg)} characters)"


SITUATIONS = """

## Run situations

A run directory that is in use, a resume that would change the run, a damaged newest checkpoint:
staged on a tiny 4-step run (checkpoints at 2 and 4) in `<run>`.

| situation | command | exit | what the user sees |
|---|---|---|---|
"""


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=magic_env(), capture_output=True, text=True, check=False, timeout=300)


def situations(root: str) -> list[list[str]]:
    """[situation, command, exit, output] rows, each staged for real."""
    src, data, run = write_corpus(Path(root) / "src"), str(Path(root) / "data"), str(Path(root) / "run")
    base = ("steps=4", "checkpoint_every=2")
    done = _run(train_command(run, src, data, *base))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = []

    def row(name: str, argv: list[str], shown: str) -> None:
        out = _run(argv)
        lines = out.stderr.splitlines()
        first = next((i for i, ln in enumerate(lines) if ln.startswith(("magic ", "warning"))), None)
        said = " ".join(ln.strip() for ln in lines[first:first + 8]) if first is not None else out.stderr[-400:]
        rows.append([name, f"`{shown}`", str(out.returncode), said])

    row("resume with another learning rate", train_command(run, src, data, *base, "optimizer.learning_rate=1e-2"),
        "magic train --workdir <run> ... --set optimizer.learning_rate=1e-2")
    hold = ("import sys, time; from matrixmagic.train.runlock import RunLock; "
            "RunLock(sys.argv[1], command='magic train --workdir <run>').acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, run],
                              stdout=subprocess.PIPE, text=True, env=magic_env())
    try:
        holder.stdout.readline()
        row("a second writer while a run holds the directory", train_command(run, src, data, *base, "steps=6"),
            "magic train --workdir <run> ... (while another magic train runs there)")
    finally:
        holder.kill()
        holder.wait()
    for path in glob.glob(os.path.join(run, "checkpoints", "4", "state", "**", "d", "*"), recursive=True):
        with open(path, "r+b") as f:  # damage step 4's arrays, as a bad disk or copy would
            f.seek(os.path.getsize(path) // 3)
            f.write(b"\xde\xad\xbe\xef" * 4)
    row("generate from a run whose newest checkpoint is damaged",
        [sys.executable, "-m", "matrixmagic.train.cli", "generate", "--workdir", run, "--prompt", "def ",
         "--max-new-tokens", "8"], "magic generate --workdir <run> --prompt 'def ' --max-new-tokens 8")
    return [[c.replace(run, "<run>").replace(root, "<tmp>") for c in r] for r in rows]


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as root:
        inputs = make_inputs(Path(root))
        for case in CASES:
            done = run_cli(command(case, inputs), inputs["tmp"], case.env)
            message = next((line for line in done.stderr.splitlines() if line.startswith("magic ")), done.stderr)
            argv = " ".join(shown(a) if " " not in a else repr(shown(a)) for a in command(case, inputs))
            env = "".join(f"{name}={value} " for name, value in case.env)
            row = [case.name, case.issue, f"`{env}magic {argv}`", str(done.returncode), message]
            rows.append("| " + " | ".join(cell(c.replace(root, "<tmp>")) for c in row) + " |")
            print(f"{done.returncode}  {case.name}", file=sys.stderr)
        staged = situations(root)
    text = HEADER + "\n".join(rows) + SITUATIONS + "\n".join("| " + " | ".join(map(cell, r)) + " |" for r in staged)
    (HERE / "bad-input.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
