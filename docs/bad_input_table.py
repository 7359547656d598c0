"""Write docs/bad-input.md: every case of tests/user_error_cases.py run through the real CLI,
with the command and the message a user sees, so the table is what the code prints today.

  .venv/bin/python docs/bad_input_table.py        (about two minutes: one `magic` start per case)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from test_user_errors import run_cli  # tests/ is not a package: imported from its folder
from user_error_cases import CASES, command, make_inputs

HEADER = """# Bad input: what a user sees

Every row is a mistake a new user makes, run through the real `magic` command by
`docs/bad_input_table.py` (generated from the cases `tests/test_user_errors.py` checks: each
exits 2 with one message and no traceback). Paths under the test's temporary folder are
shown as `<tmp>`. Cases marked 16 are issue 16's list.

| case | issue | command | exit | message |
|---|---|---|---|---|
"""


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def shown(arg: str) -> str:
    return arg if len(arg) < 60 else arg[:20] + f"...({len(arg)} characters)"


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as root:
        inputs = make_inputs(Path(root))
        for case in CASES:
            done = run_cli(command(case, inputs), inputs["tmp"])
            message = next((line for line in done.stderr.splitlines() if line.startswith("magic ")), done.stderr)
            argv = " ".join(shown(a) if " " not in a else repr(shown(a)) for a in command(case, inputs))
            row = [case.name, case.issue, f"`magic {argv}`", str(done.returncode), message]
            rows.append("| " + " | ".join(cell(c.replace(root, "<tmp>")) for c in row) + " |")
            print(f"{done.returncode}  {case.name}", file=sys.stderr)
    (HERE / "bad-input.md").write_text(HEADER + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
