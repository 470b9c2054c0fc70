"""Self-supervised objectives under one trainer (see `common.Objective` for the contract).

``OBJECTIVES`` maps a config's ``objective`` name to (objective class, its settings dataclass, which
is the config section of the same name, a one-line description for model cards).
"""

from .anatcl import AnatCLConfig, AnatCLObjective
from .dino import DINOConfig, DINOObjective
from .jepa import JEPAConfig, JEPAObjective
from .mae import MAEConfig, MAEObjective
from .moco import MoCoConfig, MoCoObjective

OBJECTIVES = {
    "dino": (DINOObjective, DINOConfig, "DINO + iBOT + KoLeo self-distillation (DINOv2/v3 recipe)"),
    "moco": (MoCoObjective, MoCoConfig, "MoCo v3 contrastive learning with a momentum encoder"),
    "mae": (MAEObjective, MAEConfig, "masked autoencoder with a spectral-domain reconstruction term"),
    "jepa": (JEPAObjective, JEPAConfig, "I-JEPA with variance-covariance regularisation"),
    "anatcl": (AnatCLObjective, AnatCLConfig, "AnatCL: contrastive learning weighted by subject descriptors"),
}
