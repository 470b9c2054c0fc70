"""``python -m BrainDINOTrainingLib`` (e.g. ``PythonSlicer -m BrainDINOTrainingLib ...``)."""

import sys

from .cli import main

sys.exit(main())
