"""The Colab quickstart runs top to bottom: install skipped (the checkout is installed),
a ~20-step training run, generation, explain and the pictures; its install cell never uses a
guessed URL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]' (nbclient, nbformat, ipykernel)")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGIC_NOTEBOOK_STEPS", "20")
    monkeypatch.setenv("MAGIC_NOTEBOOK_BATCH", "4")
    monkeypatch.setenv("MAGIC_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "skipping pip" in outputs
    assert "softmax over vocabulary" in outputs and "[1, 96, 2048, 2048]" in outputs
    assert (tmp_path / "run" / "plots" / "attention_layer0.png").is_file()


def _install_cell() -> str:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code")


def test_install_cell_has_no_default_remote_url():
    """Only the placeholder form git+https://github.com/<you>/... may appear: no URL the cell would use."""
    source = _install_cell()
    urls = re.findall(r"[a-z+]+://\S+", source)
    assert urls and all("<you>" in url for url in urls), urls
    assert 'os.environ.get("MATRIXMAGIC_SOURCE", "")' in source  # no default but the empty string
    assert "%pip" not in source  # a failed %pip does not stop a notebook; subprocess.run(check=True) does


def test_install_cell_stops_with_an_instruction_when_it_has_no_source(tmp_path):
    """Outside a checkout, with matrixmagic not importable (-S: no site-packages) and no SOURCE, the cell
    raises naming what to set, before running pip."""
    env = {k: v for k, v in os.environ.items() if k != "MATRIXMAGIC_SOURCE"}
    result = subprocess.run([sys.executable, "-S", "-c", _install_cell()], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "RuntimeError: matrixmagic is not installed" in result.stderr
    assert "Set SOURCE" in result.stderr and "running:" not in result.stdout
