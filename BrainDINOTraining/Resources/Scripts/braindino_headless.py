"""Run a BrainDINO command inside 3D Slicer without its window, e.g.

    Slicer --no-main-window --python-script braindino_headless.py pretrain --data INDEX -o RUN

Slicer loads the BrainDINO modules first, so their libraries import as in the GUI. The exit code is the
command's (0 done, 2 a user error, 130 interrupted, 1 an unexpected error, whose traceback is printed):
Slicer keeps running after a script unless told to exit, so every outcome ends in an exit.
"""

import sys
import traceback

code = 1
try:
    from BrainDINOTrainingLib.cli import main

    code = main(sys.argv[1:])
except SystemExit as exit_request:  # argparse's --help (0) and usage errors (2)
    code = exit_request.code if isinstance(exit_request.code, int) else int(exit_request.code is not None)
except Exception:
    traceback.print_exc()
finally:
    try:
        from slicer import app  # noqa: F401 (exists only inside the Slicer application)
    except ImportError:
        sys.exit(code)
    import slicer.util

    slicer.util.exit(code)
