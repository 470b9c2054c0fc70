"""Which Python packages BrainDINO still needs in this interpreter (3D Slicer's, on first use).

Only the standard library and ``packaging`` (which Slicer's Python has): this runs before torch
or any other requirement may be installed.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REQUIREMENTS = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"

#: torch and torchvision are installed by the PyTorch extension (its build matches the GPU).
TORCH_VERSION = ">=2.4"
TORCH_REQUIREMENTS = (f"torch{TORCH_VERSION}", "torchvision>=0.19")


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


def missing() -> tuple[list[str], list[str]]:
    """What this interpreter lacks for BrainDINO: (torch and torchvision problems, problems of the rest)."""
    return unmet(list(TORCH_REQUIREMENTS)), unmet(read_requirements(REQUIREMENTS))
