"""3D Slicer module "BrainDINOTraining": self-supervised pretraining and head fitting.

The training code lives in ``BrainDINOTrainingLib`` and also runs headless
(``PythonSlicer -m BrainDINOTrainingLib ...``); this file only declares the module to Slicer.
"""

from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget


class BrainDINOTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "BrainDINO Training"
        self.parent.categories = ["Machine Learning"]
        self.parent.dependencies = ["BrainDINO"]
        self.parent.contributors = ["BrainDINO developers"]
        self.parent.helpText = (
            "Pretrains BrainDINO encoders on folders of brain MRI and fits task heads. "
            "Headless: <code>PythonSlicer -m BrainDINOTrainingLib --help</code>."
        )
        self.parent.acknowledgementText = "Method: BrainDINO (arXiv 2604.27277)."


class BrainDINOTrainingWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.layout.addStretch(1)
