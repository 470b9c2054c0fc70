"""3D Slicer module "BrainDINO": frozen brain-MRI foundation encoder, feature maps and predictions.

The inference core lives in ``BrainDINOLib`` (pure Python, testable without Slicer); this file
only declares the module to Slicer.
"""

from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget


class BrainDINO(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "BrainDINO"
        self.parent.categories = ["Machine Learning"]
        self.parent.dependencies = []
        self.parent.contributors = ["BrainDINO developers"]
        self.parent.helpText = (
            "Runs a frozen self-supervised ViT encoder slice by slice on a brain MRI and shows attention, "
            "PCA and patch-similarity feature maps. The same pipeline runs headless: "
            "<code>PythonSlicer -m BrainDINOLib infer scan.nii.gz -o out/</code>."
        )
        self.parent.acknowledgementText = (
            "Method: BrainDINO (arXiv 2604.27277). Encoders are built with timm; "
            "the sample is the MNI ICBM152 2009a template."
        )


class BrainDINOWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.layout.addStretch(1)
