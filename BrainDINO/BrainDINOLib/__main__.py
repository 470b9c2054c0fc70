"""``python -m BrainDINOLib`` (e.g. ``PythonSlicer -m BrainDINOLib infer ...``)."""

import sys

from .cli import main

sys.exit(main())
