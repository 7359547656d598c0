"""`magic train --help-fields`: every field --set accepts, its type, its default and its meaning.

The meaning is the field's comment in its dataclass (a trailing `# ...`, or the `# ...` lines
just above it), read from the source, so the comments stay the single place it is written.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize

from .overrides import field_types
from .train_config import TrainConfig


def field_comments(cls) -> dict[str, str]:
    """{field name: its comment} for one dataclass: the comment on the field's own line, else
    the comment lines directly above it (joined into one line)."""
    lines = inspect.getsource(cls).splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[int, str] = {}  # line number (0-based) -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
        row = tok.start[0] - 1
        if tok.type == tokenize.COMMENT:
            comments[row] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(row)
    out = {}
    for row, line in enumerate(lines):
        name = line.strip().partition(":")[0]
        if name not in names or not line.startswith("    ") or line.startswith("     "):
            continue
        if row in comments:
            out[name] = comments[row]
            continue
        above: list[str] = []
        r = row - 1
        while r >= 0 and r in comments and r not in code_lines:
            above.insert(0, comments[r])
            r -= 1
        out[name] = " ".join(above)
    return out


def field_meanings(cls=TrainConfig, prefix: str = "") -> dict[str, str]:
    """{'model.d_model': 'width of the residual stream ...', ...} for every leaf field."""
    out = {}
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.update(field_meanings(type(default), prefix + f.name + "."))
        else:
            out[prefix + f.name] = comments.get(f.name, "")
    return out


def _value(config, dotted: str):
    for name in dotted.split("."):
        config = getattr(config, name)
    return config


def field_help(config: TrainConfig) -> str:
    """One block per field: `name  type  = default` and its meaning below, defaults from `config`
    (the preset's, as `magic train --preset P` would start)."""
    types, meanings = field_types(TrainConfig), field_meanings()
    rows = []
    for name, kind in types.items():
        rows.append(f"  {name:32s} {kind:10s} = {_value(config, name)!r}\n      {meanings[name]}")
    return "\n".join(rows)
