"""Static checks: the Slicer CMake lists match the files on disk, and the core never imports Slicer/Qt."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from xml.etree import ElementTree

import pytest
import tomllib

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


def _ui_widgets(module: str) -> dict[str, tuple[str, str | None]]:
    """Widget name -> (class, SlicerParameterName or None) of the module's Qt Designer file."""
    tree = ElementTree.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    widgets = {}
    for widget in tree.iter("widget"):
        bound = [p.findtext("string") for p in widget.findall("property") if p.get("name") == "SlicerParameterName"]
        widgets[widget.get("name")] = (widget.get("class"), bound[0] if bound else None)
    return widgets


def _parameter_fields(module: str) -> dict[str, str]:
    """Field name -> annotation source of the module's ``@parameterNodeWrapper`` class."""
    source = (ROOT / module / f"{module}.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and any(
            getattr(d, "id", "") == "parameterNodeWrapper" for d in node.decorator_list
        ):
            return {
                item.target.id: ast.get_source_segment(source, item.annotation)
                for item in node.body
                if isinstance(item, ast.AnnAssign)
            }
    raise AssertionError(f"{module}.py has no @parameterNodeWrapper class")


# Which annotations each widget class can be bound to (Slicer's parameterNodeWrapper GUI connectors).
BINDABLE = {
    "QCheckBox": re.compile(r"bool"),
    "QComboBox": re.compile(r"Annotated\[str, Choice\(.+\)\]"),
    "QLineEdit": re.compile(r"str"),
    "QSpinBox": re.compile(r"(Annotated\[)?int\b.*"),
    "ctkSliderWidget": re.compile(r"Annotated\[float, WithinRange\(.+\)\]"),
    "ctkPathLineEdit": re.compile(r"Path"),
    "qMRMLNodeComboBox": re.compile(r"vtkMRML\w+Node"),
}


@pytest.mark.parametrize("module", MODULES)
def test_module_code_uses_only_widgets_of_its_ui(module):
    used = set(re.findall(r"\bself\.ui\.(\w+)", (ROOT / module / f"{module}.py").read_text()))
    assert used and used <= set(_ui_widgets(module)), sorted(used - set(_ui_widgets(module)))


@pytest.mark.parametrize("module", MODULES)
def test_every_bound_widget_matches_a_parameter_node_field(module):
    fields = _parameter_fields(module)
    bound = {name: (cls, parameter) for name, (cls, parameter) in _ui_widgets(module).items() if parameter}
    assert bound
    for name, (cls, parameter) in bound.items():
        assert parameter in fields, f"{module}.ui: {name} is bound to '{parameter}', which is not a parameter"
        assert BINDABLE[cls].fullmatch(fields[parameter]), (
            f"{name} ({cls}) cannot show {parameter}: {fields[parameter]}"
        )
    assert len({parameter for _, parameter in bound.values()}) == len(bound)  # one widget per parameter


@pytest.mark.parametrize("module", MODULES)
def test_self_test_is_registered_with_ctest(module):
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in (ROOT / module / "CMakeLists.txt").read_text()
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    tests = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == f"{module}Test"]
    assert tests and any(f.name == "runTest" for f in tests[0].body if isinstance(f, ast.FunctionDef))


def test_slicer_requirements_are_the_package_dependencies_but_torch():
    from BrainDINOLib.dependencies import REQUIREMENTS, TORCH_REQUIREMENTS, read_requirements

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(read_requirements(REQUIREMENTS)) == sorted(d for d in declared if d not in TORCH_REQUIREMENTS)
    assert set(TORCH_REQUIREMENTS) <= set(declared)


def test_extension_metadata_and_catalog_entry_agree():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    values = dict(re.findall(r'set\((\w+) "([^"]*)"\)', cmake))
    repository = values["BRAINDINO_REPOSITORY"]
    expand = lambda text: text.replace("${BRAINDINO_REPOSITORY}", repository)  # noqa: E731
    entry = json.loads((ROOT / "BrainDINO.json").read_text())
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision", "scm_type",
               "scm_url", "tier"}  # fmt: skip
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["category"] == values["EXTENSION_CATEGORY"] and entry["scm_url"] == repository
    assert entry["build_dependencies"] == values["EXTENSION_DEPENDS"].split() == ["PyTorch"]
    for url in [expand(values["EXTENSION_ICONURL"]), *expand(values["EXTENSION_SCREENSHOTURLS"]).split()]:
        path = ROOT / url.removeprefix(f"{repository}/raw/{entry['scm_revision']}/")
        assert path.is_file(), url
    from PIL import Image

    assert Image.open(ROOT / "BrainDINO.png").size == (128, 128)


def test_unmet_requirements_are_named_with_what_is_installed():
    from importlib import metadata

    from BrainDINOLib.dependencies import REQUIREMENTS, read_requirements, unmet

    numpy = metadata.version("numpy")
    assert unmet(["numpy>=1.0", "numpy>=999", "no-such-package-braindino>=1"]) == [
        f"numpy>=999 (installed: {numpy})",
        "no-such-package-braindino>=1 (not installed)",
    ]
    assert unmet(read_requirements(REQUIREMENTS)) == []  # this environment has what Slicer will install
