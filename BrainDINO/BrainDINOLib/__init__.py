"""BrainDINO inference core: volumes, preprocessing, encoders, bundles, engine and feature maps.

Pure Python over the scientific stack; never imports slicer, qt or ctk (only ``mrml.py`` may).
"""

__version__ = "0.1.0"
