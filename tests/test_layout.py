"""The package layout: one import name, and layers that point one way.

configs <- model <- sharding <- train (<- train/planning <- train/cli). `model/` never imports
train or sharding; `sharding/` never imports train; `train/data/` reads only configs and model,
and two leaves of train/: storage.py, the run-path gate (a source, data dir or tokenizer may be
a gs:// URL), which imports configs alone, and pids.py (is a process alive), which imports
nothing of ours. The train core (train/*.py and its subpackages other
than planning/ and cli/) does not import train/planning/, but for the exceptions listed in
CORE_USES_PLANNING. No module imports another's `_private` name, and no import cycles.
Function-level imports of project modules are for start-up time only: train/cli/.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "model", "sharding", "train")
RANK = {name: rank for rank, name in enumerate(PACKAGES)}


def module_name(path: Path) -> str:
    """matrixmagic.<dotted path> of a source file (a package's __init__ is the package)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["matrixmagic", *parts])


def project_imports(path: Path):
    """(line, imported matrixmagic module, inside a function?) for every project import of a file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(sub) for sub in ast.walk(node) if sub is not node}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            # `from .. import storage` imports the module matrixmagic.train.storage, not the package
            targets = ([".".join(base + [node.module])] if node.module
                       else [".".join(base + [alias.name]) for alias in node.names])
        elif isinstance(node, ast.ImportFrom):
            targets = [node.module]
        else:
            continue
        for target in targets:
            if isinstance(node, ast.ImportFrom) and not node.level:
                # `from matrixmagic.train.planning import chips` imports the module ...planning.chips
                modules = [f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}")]
                if modules:
                    for module in modules:
                        yield node.lineno, module, id(node) in in_function
                    continue
            if target.split(".")[0] in PACKAGES:
                raise AssertionError(f"{path}:{node.lineno} imports {target!r}: use matrixmagic.{target}")
            if target.startswith("matrixmagic."):
                yield node.lineno, target, id(node) in in_function


def sources():
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def is_module(name: str) -> bool:
    """Is matrixmagic.<name> a module or package of this repository?"""
    parts = name.split(".")[1:]
    if not parts or parts[0] not in PACKAGES:
        return False
    path = REPO.joinpath(*parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def upward_edges() -> list[str]:
    bad = []
    for path in sources():
        here = module_name(path).split(".")
        for line, target, in_function in project_imports(path):
            there = target.split(".")
            where = f"{path.relative_to(REPO)}:{line} imports {target}"
            if RANK[there[1]] > RANK[here[1]]:
                bad.append(f"{where} (upward: {here[1]} may not import {there[1]})")
            elif here[1:3] == ["train", "data"] and there[1] == "train" and there[2:3] not in (["data"], ["storage"], ["pids"]):
                bad.append(f"{where} (train/data reads only configs and model)")
            if in_function and here[1:3] != ["train", "cli"]:
                bad.append(f"{where} (inside a function: only the CLI imports late, for start-up time)")
    return bad


def test_layers_point_one_way():
    assert sources(), "no sources found"
    assert upward_edges() == []


# Train-core modules that import planning, each with why. The closed-form memory check runs
# before the first compile, after the tokenizer has sized the config (train/loop.py `_train`);
# the chip table is cited once and read by MFU as by planning; aot's compile hands the compiled
# program to the one reader of what the compiler says. None of these planning modules imports
# the train core back (test_no_import_cycles).
CORE_USES_PLANNING = {
    ("matrixmagic.train.loop", "matrixmagic.train.planning.fit"): "the memory check before the first compile",
    ("matrixmagic.train.metrics", "matrixmagic.train.planning.chips"): "a chip's peak FLOP/s, the MFU denominator",
    ("matrixmagic.train.aot", "matrixmagic.train.planning.compiled"): "the compiled step's memory, cost, OOM",
}
# `_private` names imported across modules, each to be made public by the work that owns it.
PRIVATE_IMPORTS: set[tuple[str, str]] = set()


def in_train_core(module: str) -> bool:
    parts = module.split(".")
    return parts[1:2] == ["train"] and parts[2:3] not in (["planning"], ["cli"])


def core_planning_edges() -> list[str]:
    bad = []
    for path in sources():
        here = module_name(path)
        for line, target, _ in project_imports(path):
            if (in_train_core(here) and target.startswith("matrixmagic.train.planning")
                    and (here, target) not in CORE_USES_PLANNING):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {target} (the train core does not import "
                           f"planning: move what it needs below, or list it in CORE_USES_PLANNING with why)")
    return bad


def test_the_train_core_does_not_import_planning():
    assert core_planning_edges() == []
    used = {(module_name(p), t) for p in sources() for _, t, _ in project_imports(p)}
    assert set(CORE_USES_PLANNING) <= used, "an exception no longer used: remove it from CORE_USES_PLANNING"


def private_imports() -> list[str]:
    """`from matrixmagic.x import _name` (or `from .x import _name`) in another module."""
    bad = []
    for path in sources():
        here = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith("matrixmagic")):
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and (here, alias.name) not in PRIVATE_IMPORTS:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} imports {alias.name} from "
                               f"{'.' * node.level}{node.module or ''}: make it public where it lives")
    return bad


def test_no_module_imports_another_modules_private_names():
    assert private_imports() == []


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a package's own __init__ counts as the package)."""
    return {module_name(p): {t for _, t, _ in project_imports(p)} - {module_name(p)} for p in sources()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first search meets (one path per back edge)."""
    cycles, state, path = [], {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycles():
    assert import_cycles(import_graph()) == []


def test_the_core_and_private_checks_can_fail(tmp_path, monkeypatch):
    """A train-core module importing planning and a private name from another module is reported."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    (tmp_path / "train" / "planning").mkdir()
    (tmp_path / "train" / "planning" / "__init__.py").write_text("")
    (tmp_path / "train" / "planning" / "plan.py").write_text("def _secret():\n    pass\n")
    (tmp_path / "train" / "oops.py").write_text("from matrixmagic.train.planning import plan\n"
                                                "from .planning.plan import _secret\n")
    assert any("train/oops.py:1 imports matrixmagic.train.planning.plan" in b for b in core_planning_edges())
    assert any("imports _secret" in b for b in private_imports())


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_storage_gate_train_data_reads_is_a_leaf():
    """train/data may import train/storage.py only because storage imports nothing above configs."""
    imported = {target for _, target, _ in project_imports(REPO / "train" / "storage.py")}
    assert imported and all(t.startswith("matrixmagic.configs") for t in imported), imported
    assert not list(project_imports(REPO / "train" / "pids.py"))  # nor pids.py: it imports nothing of ours


def test_the_layer_check_catches_an_upward_edge(tmp_path, monkeypatch):
    """The check can fail: a model module importing train is reported."""
    fake = tmp_path / "model" / "oops.py"
    fake.parent.mkdir()
    fake.write_text("from matrixmagic.train.loop import train\n\n\ndef f():\n    from . import build\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(exist_ok=True)
    bad = upward_edges()
    assert any("upward: model may not import train" in b for b in bad), bad
    assert any("inside a function" in b for b in bad), bad


def test_own_model_configs_train_sharding_files_do_not_shadow_the_package(tmp_path):
    """nanoGPT's layout (model.py, train.py, configs.py) in the working directory, each
    raising on import, must not break importing matrixmagic."""
    for name in ("model", "configs", "train", "sharding"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py was imported')\n")
    code = "import matrixmagic.train.loop, matrixmagic.train.planning.chips, matrixmagic.model.generate; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_says_what_lives_there_and_what_it_may_import(package):
    doc = ast.get_docstring(ast.parse((REPO / package / "__init__.py").read_text(encoding="utf-8")))
    assert doc and "import" in doc, f"{package}/__init__.py needs a docstring naming what it may import"


def test_every_package_folder_is_installed():
    """pyproject.toml lists the packages by hand (package-dir maps each folder): a new
    subfolder with an __init__.py must be listed, or `pip install .` silently leaves it out."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the test extra installs tomli
        import tomli as tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(init) for pkg in PACKAGES for init in (REPO / pkg).rglob("__init__.py")}
    assert found == listed


def test_the_magic_command_keeps_compiled_programs_on_disk(tmp_path):
    from matrixmagic.train.cli.main import use_compile_cache

    env = {"MAGIC_COMPILE_CACHE": str(tmp_path / "c")}
    use_compile_cache(env)
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "c") and (tmp_path / "c").is_dir()
    assert int(env["JAX_COMPILATION_CACHE_MAX_SIZE"]) > 0  # bounded: jax evicts and locks
    for off in ("0", "off", "False"):
        env = {"MAGIC_COMPILE_CACHE": off}
        use_compile_cache(env)
        assert "JAX_COMPILATION_CACHE_DIR" not in env
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    env = {"MAGIC_COMPILE_CACHE": str(blocked / "jax")}
    use_compile_cache(env)
    assert "JAX_COMPILATION_CACHE_DIR" not in env  # cannot be created: no cache, no warnings
    mine = {"MAGIC_COMPILE_CACHE": str(tmp_path / "d"), "JAX_COMPILATION_CACHE_DIR": "/already/set"}
    use_compile_cache(mine)
    assert mine["JAX_COMPILATION_CACHE_DIR"] == "/already/set"  # an explicit jax setting wins
