"""Run a BrainDINO command inside 3D Slicer without its window, e.g.

    Slicer --no-main-window --python-script braindino_headless.py pretrain --data INDEX -o RUN

Slicer loads the BrainDINO modules first, so their libraries import as in the GUI; the exit code is the
command's (0 done, 2 a user error, 130 interrupted).
"""

import sys

from BrainDINOTrainingLib.cli import main

code = main(sys.argv[1:])
try:
    from slicer import app  # noqa: F401 (exists only inside the Slicer application)
except ImportError:
    sys.exit(code)
import slicer.util  # noqa: E402

slicer.util.exit(code)
