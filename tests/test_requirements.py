"""The pinned requirement sets: each package pinned once, torch pinned where the build pins it."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"


def pins(path: Path) -> dict[str, str]:
    """Package name (normalized) -> pinned version, of one file without its includes."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-r"):
            continue
        name, version = line.split("==")
        found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


def test_every_package_is_pinned_in_exactly_one_set():
    seen: dict[str, str] = {}
    for path in sorted(REQUIREMENTS.glob("*.txt")):
        for name in pins(path):
            assert name not in seen, f"{name} pinned in both {seen[name]} and {path.name}"
            seen[name] = path.name


def test_the_sets_include_each_other_as_documented():
    def includes(name: str) -> list[str]:
        text = (REQUIREMENTS / name).read_text()
        return re.findall(r"^-r (\S+)$", text, flags=re.MULTILINE)

    assert includes("runtime.txt") == []
    assert includes("viz.txt") == ["runtime.txt"]
    assert includes("test.txt") == ["viz.txt"]
    assert includes("notebook.txt") == ["viz.txt"]
    assert includes("dev.txt") == ["test.txt", "notebook.txt"]


def test_runtime_pins_the_torch_the_extension_is_built_against():
    runtime = pins(REQUIREMENTS / "runtime.txt")
    assert set(runtime) >= {"torch", "numpy"}
    release = torch.__version__.split("+")[0]
    assert runtime["torch"] == release
    build_requires = re.search(
        r"^requires = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M
    )
    assert f'"torch=={release}"' in build_requires.group(1)
