"""Static checks: the Slicer CMake lists match the files on disk, and the core never imports Slicer/Qt."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("BrainDINO", "BrainDINOTraining")


def _listed(module: str) -> set[str]:
    text = (ROOT / module / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", module)
    listed = set()
    for block in re.findall(r"set\(MODULE_PYTHON_(?:SCRIPTS|RESOURCES)(.*?)\)", text, flags=re.S):
        listed |= set(block.split())
    return listed


def _on_disk(module: str) -> set[str]:
    folder = ROOT / module
    return {
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.name != "CMakeLists.txt"
    }


@pytest.mark.parametrize("module", MODULES)
def test_cmake_lists_match_files_both_ways(module):
    assert _listed(module) == _on_disk(module)


def test_core_never_imports_slicer_or_qt():
    forbidden = {"slicer", "qt", "ctk", "vtk", "BrainDINOTrainingLib"}
    for path in (ROOT / "BrainDINO" / "BrainDINOLib").rglob("*.py"):
        if path.name == "mrml.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            assert not {n.split(".")[0] for n in names} & forbidden, f"{path.name} imports {names}"
