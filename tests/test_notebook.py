"""The Colab quickstart runs top to bottom: install skipped (the checkout is installed),
a ~20-step training run, generation, explain and the pictures."""

from __future__ import annotations

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
