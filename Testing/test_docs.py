"""The documentation: README.md stays a short front door, every documented command parses, every link resolves."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^\s*(```|~~~)")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
MODULES = ("BrainDINOLib", "BrainDINOTrainingLib")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
HTML_LINK = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _split_code(text: str) -> tuple[list[tuple[int, str]], str]:
    """The lines inside fenced code blocks (with their line numbers), and the text with those blocks blanked."""
    code, prose, inside = [], [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            prose.append("")
        elif inside:
            code.append((number, line))
            prose.append("")
        else:
            prose.append(line)
    return code, "\n".join(prose)


def _logical_lines(code: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Backslash-continued lines joined into one, numbered by their first line."""
    joined, start, parts = [], None, []
    for number, line in code:
        if start is None:
            start = number
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        joined.append((start, " ".join(part.strip() for part in parts)))
        start, parts = None, []
    if parts:
        joined.append((start, " ".join(part.strip() for part in parts)))
    return joined


def _braindino_arguments(words: list[str]) -> tuple[str, list[str]] | None:
    """``(module, arguments)`` when ``words`` run a braindino command, else None.

    Recognised: ``braindino ARGS``; ``PythonSlicer|python|torchrun ... -m BrainDINOLib|BrainDINOTrainingLib ARGS``;
    ``Slicer ... --python-script .../braindino_headless.py ARGS``; after an optional prompt, environment
    assignments and a ``.venv/bin/`` prefix.
    """
    if words and words[0] == "$":
        words = words[1:]
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words:
        return None
    program = words[0].removeprefix(".venv/bin/")
    if program == "braindino":
        return "BrainDINOTrainingLib", words[1:]
    if program in ("PythonSlicer", "python", "python3", "torchrun") and "-m" in words:
        at = words.index("-m")
        if at + 1 < len(words) and words[at + 1] in MODULES:
            return words[at + 1], words[at + 2 :]
        return None
    if program == "Slicer":
        for at, word in enumerate(words):
            if word.endswith("braindino_headless.py"):
                return "BrainDINOTrainingLib", words[at + 1 :]
    return None


def _collect_commands() -> list[tuple[str, int, str, str, list[str]]]:
    """``(file, line, command text, module, arguments)`` for every braindino command in a fenced code block."""
    commands = []
    for page in PAGES:
        code, _ = _split_code(page.read_text(encoding="utf-8"))
        for number, line in _logical_lines(code):
            # A cheap look at the first words decides; only commands go through shlex (prose in code
            # blocks, such as a directory tree, may hold unbalanced quotes).
            if _braindino_arguments([word.strip("\"'") for word in line.split()]) is None:
                continue
            try:
                words = shlex.split(line, comments=True)
            except ValueError as error:
                words = ["braindino", f"<shlex cannot split this line: {error}>"]
            found = _braindino_arguments(words)
            if found is not None:
                commands.append((_relative(page), number, line.strip(), *found))
    return commands


COMMANDS = _collect_commands()


def _parser(module: str):
    from BrainDINOLib import cli

    if module == "BrainDINOLib":  # python -m BrainDINOLib: the inference commands only
        return cli.build_parser()
    from BrainDINOTrainingLib import cli as training_cli

    if hasattr(training_cli, "build_parser"):
        return training_cli.build_parser()
    return cli.build_parser(extra_commands=training_cli.TRAINING_COMMANDS)


def _links(page: Path) -> list[str]:
    """Every link and image target of a Markdown page, outside code blocks and code spans."""
    _, prose = _split_code(page.read_text(encoding="utf-8"))
    prose = re.sub(r"(`+)(?:(?!\1).)+?\1", "", prose, flags=re.DOTALL)
    return [
        *INLINE_LINK.findall(prose),
        *REFERENCE_LINK.findall(prose),
        *HTML_LINK.findall(prose),
    ]


def _is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("//")


def _anchors(page: Path) -> set[str]:
    """The heading anchors a repository host gives a Markdown page (lower case, punctuation dropped)."""
    _, prose = _split_code(page.read_text(encoding="utf-8"))
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.MULTILINE):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        text = re.sub(r"<[^>]+>", "", text).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        anchor, count = slug, 1
        while anchor in anchors:
            anchor, count = f"{slug}-{count}", count + 1
        anchors.add(anchor)
    return anchors


def test_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250, "README.md is a front door: move the depth into docs/"
    assert "make test" in text and "make demo" in text
    assert re.search(r"^## Architecture\s*$", text, re.MULTILINE), "README.md needs a '## Architecture' heading"
    linked = {(README.parent / target.split("#")[0]).resolve() for target in _links(README) if _is_relative(target)}
    assert DOCS, "docs/ holds no Markdown page"
    missing = [_relative(page) for page in DOCS if page.resolve() not in linked]
    assert not missing, f"README.md does not link to {missing}"


def test_the_docs_show_braindino_commands():
    """The collector finds the documented commands (a broken collector would let every command pass)."""
    assert len(COMMANDS) >= 10, [f"{file}:{line}" for file, line, *_ in COMMANDS]
    assert any(module == "BrainDINOLib" for *_, module, _ in COMMANDS)


@pytest.mark.parametrize(
    ("file", "line", "command", "module", "arguments"),
    COMMANDS,
    ids=[f"{file}:{line}" for file, line, *_ in COMMANDS],
)
def test_every_braindino_command_in_the_docs_parses(file, line, command, module, arguments, capsys):
    parser = _parser(module)
    try:
        parser.parse_args(arguments)
    except SystemExit as exit_request:
        asked_for_help = exit_request.code == 0 and ("-h" in arguments or "--help" in arguments)
        if not asked_for_help:
            error = capsys.readouterr().err.strip().splitlines()
            pytest.fail(f"{file}:{line}: `{command}` does not parse: {error[-1] if error else exit_request}")


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in _links(page):
            if not _is_relative(target) or target.startswith("#"):
                continue
            path = target.split("#")[0]
            if not (page.parent / path).exists():
                broken.append(f"{_relative(page)}: {target}")
    assert not broken, f"relative links to files that do not exist: {broken}"


def test_links_to_headings_resolve():
    """``page.md#heading`` and ``#heading`` name a heading of the page they point to."""
    broken = []
    for page in PAGES:
        for target in _links(page):
            if not _is_relative(target) or "#" not in target:
                continue
            path, anchor = target.split("#", 1)
            linked = (page.parent / path) if path else page
            if linked.suffix == ".md" and linked.exists() and anchor not in _anchors(linked):
                broken.append(f"{_relative(page)}: {target}")
    assert not broken, f"links to headings that do not exist: {broken}"
