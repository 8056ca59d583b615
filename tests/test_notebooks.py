"""The notebooks: committed without outputs, and each runs to the end at small sizes."""

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
# Set after each notebook's "parameters" cell: short runs that still reach every cell.
SMALL = {
    "01_quickstart.ipynb": "EPOCHS = 2",
    "02_growth_and_pruning.ipynb": "EPOCHS = 4",
    "03_inside_the_memory.ipynb": "EPOCHS = 2",
    "04_convert_a_hugging_face_model.ipynb": "STEPS = 30",
}
# Pictures each notebook shows (display outputs with a PNG).
PICTURES = {
    "01_quickstart.ipynb": 2,
    "02_growth_and_pruning.ipynb": 2,
    "03_inside_the_memory.ipynb": 6,
    "04_convert_a_hugging_face_model.ipynb": 1,
}
LIMIT_S = 120


def test_all_notebooks_are_covered():
    assert [p.name for p in NOTEBOOKS] == sorted(SMALL) == sorted(PICTURES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    code = [cell for cell in book.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    book = nbformat.read(path, as_version=4)
    (index,) = [
        i for i, cell in enumerate(book.cells) if "parameters" in cell.metadata.get("tags", [])
    ]
    book.cells.insert(index + 1, nbformat.v4.new_code_cell(SMALL[path.name]))
    client = NotebookClient(
        book,
        timeout=LIMIT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell that failed
    assert time.perf_counter() - start < LIMIT_S
    outputs = [out for cell in book.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    pictures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(pictures) >= PICTURES[path.name]
