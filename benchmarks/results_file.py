"""benchmarks/RESULTS.md is shared by several scripts: each rewrites only its own section."""

from pathlib import Path

HEADER = "# Benchmark results\n\nEach section is rewritten by the script it names.\n"


def write_section(path: str | Path, name: str, text: str) -> None:
    """Replaces (or appends) the section `name` of the results file with `text`."""
    path = Path(path)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    current = path.read_text() if path.exists() else HEADER
    if begin in current and end in current:
        before, rest = current.split(begin, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        current = before + block + ("\n" + after if after else "")
    else:
        current = current.rstrip("\n") + "\n\n" + block
    path.write_text(current)
