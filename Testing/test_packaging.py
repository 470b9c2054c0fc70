"""Static checks: the Slicer CMake lists match the files on disk, and the core never imports Slicer/Qt."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from xml.etree import ElementTree

import pytest
import tomllib
from packaging.requirements import Requirement

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
    "ctkPathLineEdit": re.compile(r"str"),
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
    """Inference and training requirements together are pyproject's dependencies without torch; the inference
    module's list holds only what BrainDINOLib imports."""
    from BrainDINOLib.dependencies import REQUIREMENTS, TORCH_REQUIREMENTS, TRAINING_REQUIREMENTS, read_requirements

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    inference, training = read_requirements(REQUIREMENTS), read_requirements(TRAINING_REQUIREMENTS)
    assert sorted(inference + training) == sorted(d for d in declared if d not in TORCH_REQUIREMENTS)
    assert set(TORCH_REQUIREMENTS) <= set(declared)
    imported = set()
    for path in (ROOT / "BrainDINO" / "BrainDINOLib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    names = {Requirement(line).name: line for line in inference + training}
    assert {"timm", "numpy", "nibabel", "SimpleITK", "safetensors", "matplotlib", "tqdm", "scipy"} <= imported
    assert set(names) & imported == {Requirement(line).name for line in inference}, "inference installs what it imports"


# The categories Slicer's extension index accepts (ACCEPTED_EXTENSION_CATEGORIES of its
# scripts/check_description_files.py); these two suit a brain-MRI extension.
INDEX_CATEGORIES = {"Neuroimaging", "Segmentation"}


def _index_cmake_urls(cmake: str) -> list[str]:
    """Icon and screenshot URLs as the index's CMakeLists check reads them: the literal text between the quotes."""
    icon = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', cmake, re.IGNORECASE)
    screenshots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', cmake, re.IGNORECASE)
    assert len(icon) == 1 and len(screenshots) == 1, "the index needs EXTENSION_ICONURL and EXTENSION_SCREENSHOTURLS"
    return [icon[0].strip(), *screenshots[0].split()]


def test_extension_index_description_checks():
    """What Slicer's ExtensionsIndex CI checks, offline: the catalogue entry's schema (v1.0.1), the extension and
    repository names, the category, the CMake project and literal image URLs naming PNGs of this repository at the
    entry's revision, and a licence file."""
    from PIL import Image

    entry_text = (ROOT / "BrainDINO.json").read_text()
    entry = json.loads(entry_text)
    assert "\r" not in entry_text
    types = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
             "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}  # fmt: skip
    assert {"$schema", "category", "scm_url"} <= set(entry) <= set(types)
    assert all(isinstance(value, types[key]) for key, value in entry.items())
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/")
    assert entry["scm_type"] in ("git", "local") and 1 <= entry["tier"] <= 5
    assert entry["category"] in INDEX_CATEGORIES

    owner_repository = entry["scm_url"].removeprefix("https://github.com/")
    assert entry["scm_url"].startswith("https://") and not entry["scm_url"].endswith("/")
    assert owner_repository.split("/")[1].startswith("Slicer") and not "BrainDINO".lower().startswith("slicer")

    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert re.findall(r"project\s*\(\s*([^\s\)]+)", cmake, re.IGNORECASE)[0] == "BrainDINO"  # = the entry's name
    values = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', cmake))
    assert values["EXTENSION_CATEGORY"] == entry["category"]
    assert values["EXTENSION_DEPENDS"].split() == entry["build_dependencies"] == ["PyTorch"]
    assert values["EXTENSION_HOMEPAGE"].startswith(entry["scm_url"])
    raw = f"https://raw.githubusercontent.com/{owner_repository}/{entry['scm_revision']}/"
    for url in _index_cmake_urls(cmake):
        assert url.startswith(raw) and url.endswith(".png"), url
        with Image.open(ROOT / url.removeprefix(raw)) as image:
            assert image.format == "PNG", url
    with Image.open(ROOT / "BrainDINO.png") as icon:
        assert icon.size == (128, 128)
    assert (ROOT / "LICENSE").is_file()


def test_modules_are_listed_under_the_extension_category():
    category = json.loads((ROOT / "BrainDINO.json").read_text())["category"]
    for module in MODULES:
        assert f'self.parent.categories = ["{category}"]' in (ROOT / module / f"{module}.py").read_text()


def test_unmet_requirements_are_named_with_what_is_installed():
    from importlib import metadata

    from BrainDINOLib.dependencies import REQUIREMENTS, read_requirements, unmet

    numpy = metadata.version("numpy")
    assert unmet(["numpy>=1.0", "numpy>=999", "no-such-package-braindino>=1"]) == [
        f"numpy>=999 (installed: {numpy})",
        "no-such-package-braindino>=1 (not installed)",
    ]
    assert unmet(read_requirements(REQUIREMENTS)) == []  # this environment has what Slicer will install


def test_demo_phantom_is_a_slicer_sample_data_source(tmp_path):
    """What Sample Data does with the source: fetch each URI with urllib into its cache and check the SHA-256."""
    import hashlib
    import urllib.request

    from PIL import Image

    from BrainDINOLib.sample_data import slicer_sample_source

    source = slicer_sample_source()
    count = len(source["uris"])
    assert count == 3 and all(len(source[key]) == count for key in ("fileNames", "nodeNames", "checksums"))
    assert source["nodeNames"][0] == "phantom FLAIR"
    for uri, name, checksum in zip(source["uris"], source["fileNames"], source["checksums"], strict=True):
        cached, _ = urllib.request.urlretrieve(uri, tmp_path / name)
        assert checksum == "SHA256:" + hashlib.sha256(Path(cached).read_bytes()).hexdigest()
    with Image.open(source["thumbnailFileName"]) as thumbnail:
        assert thumbnail.format == "PNG" and thumbnail.size == (128, 128)


def test_slicer_side_modules_import_without_torch():
    """What the Slicer process imports: the dependency check, the MRML conversions, the session (inference runs in
    a child), the maps from saved tokens, the sample data and the Training forms; torch is made unimportable in a
    real child process."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from BrainDINOLib import background, dependencies, featuremaps, layout, mrml, predictions, sample_data\n"
        "from BrainDINOLib import segments, session\n"
        "from BrainDINOTrainingLib import forms\n"
        "assert sys.modules['torch'] is None\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


def test_installing_requirements_keeps_torch_and_notices_upgrades():
    from importlib import metadata

    import numpy as np

    from BrainDINOLib.dependencies import changed_since, imported_versions, slicer_version_problem, torch_constraints

    assert (
        torch_constraints() == f"torch=={metadata.version('torch')}\ntorchvision=={metadata.version('torchvision')}\n"
    )
    assert imported_versions()["numpy"] == np.__version__  # imported here, so an upgrade would need a restart
    before = {"numpy": "0.0", "no-such-distribution-braindino": "1.0"}
    assert changed_since(before) == ["no-such-distribution-braindino 1.0 -> removed", f"numpy 0.0 -> {np.__version__}"]
    assert changed_since(imported_versions()) == []
    assert slicer_version_problem(5, 10) == slicer_version_problem(6, 0) == ""
    assert slicer_version_problem(5, 8) == "BrainDINO needs 3D Slicer 5.10 or later; this is Slicer 5.8"
