"""Which Python packages BrainDINO still needs in this interpreter (3D Slicer's, on first use), and how to
install them without replacing what the user has.

Only the standard library and ``packaging`` (which Slicer's Python has): this runs before torch
or any other requirement may be installed. The Slicer modules do the installing; this decides what.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
#: What inference needs (the BrainDINO module); training adds `TRAINING_REQUIREMENTS` (the Training module).
REQUIREMENTS = RESOURCES / "requirements.txt"
TRAINING_REQUIREMENTS = RESOURCES / "requirements-training.txt"

#: torch and torchvision are installed by the PyTorch extension (its build matches the GPU).
TORCH_VERSION = ">=2.4"
TORCHVISION_VERSION = ">=0.19"
TORCH_REQUIREMENTS = (f"torch{TORCH_VERSION}", f"torchvision{TORCHVISION_VERSION}")

#: The oldest 3D Slicer the modules run in: 5.10 ships Python 3.12, and ``vtkSegment.SetTerminology``
#: (used by ``mrml.py``) first appears in it (Libs/vtkSegmentationCore/vtkSegment.h).
MINIMUM_SLICER = (5, 10)


def slicer_version_problem(major: int, minor: int) -> str:
    """Why this 3D Slicer cannot run BrainDINO ('' when it can)."""
    if (major, minor) >= MINIMUM_SLICER:
        return ""
    return f"BrainDINO needs 3D Slicer {'.'.join(map(str, MINIMUM_SLICER))} or later; this is Slicer {major}.{minor}"


def read_requirements(path: Path = REQUIREMENTS) -> list[str]:
    """Requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def unmet(requirements: list[str]) -> list[str]:
    """The requirements this interpreter does not satisfy, each said as ``name>=x (installed: y)`` or
    ``name>=x (not installed)``."""
    problems = []
    for line in requirements:
        requirement = Requirement(line)
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{line} (not installed)")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{line} (installed: {installed})")
    return problems


def requirement_files(training: bool = False) -> list[Path]:
    """The requirements files of inference, and of training too."""
    return [REQUIREMENTS, TRAINING_REQUIREMENTS] if training else [REQUIREMENTS]


def missing(training: bool = False) -> tuple[list[str], list[str]]:
    """What this interpreter lacks for inference (or training): (torch and torchvision problems, the rest)."""
    rest = [line for path in requirement_files(training) for line in read_requirements(path)]
    return unmet(list(TORCH_REQUIREMENTS)), unmet(rest)


def torch_constraints() -> str:
    """A pip constraints file pinning the installed torch and torchvision, so that installing the other
    requirements can never replace the user's (GPU) build: pip then fails rather than downgrade."""
    pins = []
    for name in ("torch", "torchvision"):
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return "".join(f"{pin}\n" for pin in pins)


def imported_versions() -> dict[str, str]:
    """Distribution -> version of every installed distribution one of whose top-level modules is imported:
    upgrading one of these takes effect only after a restart."""
    imported = {name.split(".", 1)[0] for name in list(sys.modules)}
    owners = metadata.packages_distributions()
    versions = {}
    for module in imported & set(owners):
        for distribution in owners[module]:
            try:
                versions[distribution] = metadata.version(distribution)
            except metadata.PackageNotFoundError:
                pass
    return versions


def changed_since(before: dict[str, str]) -> list[str]:
    """``name old -> new`` for each distribution of ``before`` (`imported_versions`) whose version changed."""
    changed = []
    for distribution, version in sorted(before.items()):
        try:
            now = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            now = "removed"
        if now != version:
            changed.append(f"{distribution} {version} -> {now}")
    return changed
