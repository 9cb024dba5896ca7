"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel (nbclient + ipykernel) against an
echo-engine server: the blocking client inside the kernel's running event loop, the async client with top-level
`await`, and the progress bar as a widget (ipywidgets installed) and as tqdm's text bar (a kernel without
ipywidgets)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.server import RunningServer, make_server

nbclient = pytest.importorskip("nbclient", reason="nbclient (a dev dependency) runs the notebook")
nbformat = pytest.importorskip("nbformat", reason="nbformat comes with nbclient")
pytest.importorskip("ipykernel", reason="ipykernel (a dev dependency) is the notebook's kernel")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"
MODELS = ["echo-model", "echo-b"]
WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def notebook_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = make_server(tmp_path_factory.mktemp("notebook") / "data", models=[*MODELS, "echo-embed"]).start()
    yield running
    running.kill()


def run_notebook(server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 first_cell: str | None = None) -> Any:
    for name in ("BATCH_API_KEY", "BATCH_PROVIDER", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    # The kernel is a child process: it inherits these.
    monkeypatch.setenv("BATCH_BASE_URL", server.base_url)
    monkeypatch.setenv("MODEL", MODELS[0])
    monkeypatch.setenv("COMPARE_MODELS", ",".join(MODELS))
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    # The kernel is this Python, whatever "python3" kernel the machine has installed elsewhere.
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(str(tmp_path / "jupyter" / "kernels" / "python3"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    if first_cell:
        notebook.cells.insert(0, nbformat.v4.new_code_cell(first_cell))
    client = nbclient.NotebookClient(notebook, timeout=60, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return notebook


def text_of(cell: Any) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output["text"])
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


def test_the_notebook_is_committed_without_outputs() -> None:
    notebook = json.loads(NOTEBOOK.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(not cell["outputs"] and cell["execution_count"] is None for cell in code)


@pytest.mark.parametrize("bar", ["widget", "text"])
def test_the_quickstart_notebook_runs(bar: str, notebook_server: RunningServer, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # "text": the kernel of someone without ipywidgets, where tqdm falls back to its text bar.
    hide = "import sys\nsys.modules['ipywidgets'] = None  # as if it were not installed" if bar == "text" else None
    notebook = run_notebook(notebook_server, tmp_path, monkeypatch, first_cell=hide)
    cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    printed = "\n".join(text_of(cell) for cell in cells)

    assert "submitted batch_" in printed
    assert "completed 4/4 done" in printed
    assert "capital: 'What is the capital of France?' -> 'What is the capital" in printed
    assert "exported 4 examples, 1 of them gold" in printed
    assert (tmp_path / "out" / "train.jsonl").read_text().count("\n") == 4
    assert "== math" in printed and "echo-b: 'What is 17 times 3?" in printed
    assert "completed ['Count to 1.', 'Count to 2.', 'Count to 3.']" in printed

    (watch,) = [cell for cell in cells if "batch.wait(" in cell.source]
    widgets = [output for output in watch.outputs if WIDGET in output.get("data", {})]
    stderr = "".join(output["text"] for output in watch.outputs if output.get("name") == "stderr")
    if bar == "widget":
        assert widgets, watch.outputs
    else:
        assert not widgets and "100%|" in stderr and "4/4" in stderr, watch.outputs
