"""The ``braindino`` console script: the inference commands plus this library's training commands."""

from __future__ import annotations

from collections.abc import Sequence

from BrainDINOLib import cli

#: Registrars of the training commands (each adds subparsers); the inference commands come from BrainDINOLib.
TRAINING_COMMANDS: tuple[cli.CommandAdder, ...] = ()


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, extra_commands=TRAINING_COMMANDS)
