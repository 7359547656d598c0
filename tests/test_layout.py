"""The package layout: one import name, and layers that point one way.

configs <- model <- sharding <- train (<- train/cli). `model/` never imports train or
sharding; `sharding/` never imports train; `train/data/` reads only configs and model, and
train/storage.py, the run-path gate (a source, data dir or tokenizer may be a gs:// URL),
which is a leaf: it imports configs alone.
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
            if target.split(".")[0] in PACKAGES:
                raise AssertionError(f"{path}:{node.lineno} imports {target!r}: use matrixmagic.{target}")
            if target.startswith("matrixmagic."):
                yield node.lineno, target, id(node) in in_function


def sources():
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def upward_edges() -> list[str]:
    bad = []
    for path in sources():
        here = module_name(path).split(".")
        for line, target, in_function in project_imports(path):
            there = target.split(".")
            where = f"{path.relative_to(REPO)}:{line} imports {target}"
            if RANK[there[1]] > RANK[here[1]]:
                bad.append(f"{where} (upward: {here[1]} may not import {there[1]})")
            elif here[1:3] == ["train", "data"] and there[1] == "train" and there[2:3] not in (["data"], ["storage"]):
                bad.append(f"{where} (train/data reads only configs and model)")
            if in_function and here[1:3] != ["train", "cli"]:
                bad.append(f"{where} (inside a function: only the CLI imports late, for start-up time)")
    return bad


def test_layers_point_one_way():
    assert sources(), "no sources found"
    assert upward_edges() == []


def test_the_storage_gate_train_data_reads_is_a_leaf():
    """train/data may import train/storage.py only because storage imports nothing above configs."""
    imported = {target for _, target, _ in project_imports(REPO / "train" / "storage.py")}
    assert imported and all(t.startswith("matrixmagic.configs") for t in imported), imported


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
