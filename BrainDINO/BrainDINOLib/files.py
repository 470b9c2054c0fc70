"""Files written so that a reader sees the old content or the new one, never a part of either."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(*paths: str | Path) -> Iterator[Path | tuple[Path, ...]]:
    """Temporary files beside ``paths`` to write (one path, or a tuple of them for several).

    When the block ends without an error, each replaces its path, in the order given: put last the file that makes
    the others valid (a model card naming their hashes), so that every file is complete before it is named. When
    the block fails, the temporary files are removed and ``paths`` stay as they were. A crash between the final
    renames (microseconds) leaves the earlier files new and the last one old, which the hashes then reveal.
    """
    paths = tuple(Path(p) for p in paths)
    writer = f"{os.getpid()}-{threading.get_ident()}"  # concurrent writers of one file never share a temporary
    temporary = tuple(p.with_name(f"{p.name}.{writer}.tmp") for p in paths)
    try:
        yield temporary[0] if len(paths) == 1 else temporary
        for source, target in zip(temporary, paths, strict=True):
            os.replace(source, target)
    finally:
        for leftover in temporary:
            leftover.unlink(missing_ok=True)
