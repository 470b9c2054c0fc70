"""Self-supervised objectives under one trainer (see `common.Objective` for the contract).

``TITLES`` names them without importing torch (for ``--help``); each objective's settings are the
config section of the same name (`trainer.TrainConfig`).
"""

TITLES = {
    "dino": "DINO + iBOT + KoLeo self-distillation (DINOv2/v3 recipe; the default)",
    "moco": "MoCo v3 contrastive learning with a momentum encoder",
    "mae": "masked autoencoder with a spectral-domain reconstruction term",
    "jepa": "I-JEPA with variance-covariance regularisation",
    "anatcl": "AnatCL: contrastive learning weighted by subject descriptors (age, tissue volumes)",
}
