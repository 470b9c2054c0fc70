"""3D Slicer module "BrainDINOTraining": self-supervised pretraining and head fitting in a background process.

A form becomes command lines (``BrainDINOTrainingLib.forms``) that ``BrainDINOLib.background``
runs in a ``PythonSlicer`` process with live log, progress, Cancel (the whole process tree) and
Resume. The same commands run headless:

    PythonSlicer -m BrainDINOTrainingLib pretrain --data INDEX -o RUN
    Slicer --no-main-window --python-script <this module's folder>/Resources/Scripts/braindino_headless.py pretrain ...
"""

import logging
import os
from pathlib import Path
from typing import Annotated

import ctk
import qt
import slicer
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.parameterNodeWrapper.guiConnectors import GuiConnector, parameterNodeGuiConnector
from slicer.parameterNodeWrapper.util import unannotatedType
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Standard library only: importable before the first-use install of PyTorch and friends.
from BrainDINOTrainingLib.forms import (
    DEVICES,
    MODEL_SIZES,
    OBJECTIVES,
    PRECISIONS,
    TASKS,
    FitHeadForm,
    PretrainForm,
    parse_fractions,
)


class BrainDINOTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "BrainDINO Training"
        self.parent.categories = ["Neuroimaging"]
        self.parent.dependencies = ["BrainDINO"]
        self.parent.contributors = ["BrainDINO developers"]
        self.parent.helpText = (
            "Pretrains BrainDINO encoders on folders of brain MRI and fits task heads, in a background "
            "process (the GUI stays free; Cancel ends it, Resume continues a pretraining run). Headless: "
            "<code>PythonSlicer -m BrainDINOTrainingLib --help</code>."
        )
        self.parent.acknowledgementText = "Method: BrainDINO (arXiv 2604.27277)."


@parameterNodeGuiConnector
class PathLineEditToStrConnector(GuiConnector):
    """A ``ctkPathLineEdit`` bound to a ``str`` field, written only when the value differs from the text.

    Slicer's own connector binds ``pathlib.Path`` and writes back on every keystroke
    (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py): a trailing "/" vanishes, the cursor jumps,
    Windows separators change and an empty field shows ".". As text, the field keeps what the user typed.
    """

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return type(widget) == ctk.ctkPathLineEdit and unannotatedType(datatype) == str  # noqa: E721

    @staticmethod
    def create(widget, datatype):
        return PathLineEditToStrConnector(widget) if PathLineEditToStrConnector.canRepresent(widget, datatype) else None

    def __init__(self, widget):
        super().__init__()
        self._widget = widget

    def _connect(self):
        self._widget.currentPathChanged.connect(self.changed)
        self._widget.validInputChanged.connect(self.changed)  # emptied: no currentPathChanged (ctkPathLineEdit.cpp)

    def _disconnect(self):
        self._widget.currentPathChanged.disconnect(self.changed)
        self._widget.validInputChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self) -> str:
        return self._widget.currentPath

    def write(self, value: str) -> None:
        if value != self._widget.currentPath:
            self._widget.currentPath = value


@parameterNodeWrapper
class BrainDINOTrainingParameterNode:
    """The two forms; every field is bound to a widget of ``Resources/UI/BrainDINOTraining.ui``.

    dataPath .. headOutput: paths as typed ("" when not chosen).
    epochs, stepsPerEpoch, headIterations: 0 keeps the default.
    headSequences: space-separated sequences the head reads ("" for the default; "any" for a tumour head that
    reads any contrast).
    headLabelFractions: space-separated shares of the training subjects, e.g. "0.01 0.1 1".
    headImageChannels: 0 for a decoder on patch tokens alone.
    headThumbnails: a volume head also reads each slice's thumbnail.
    """

    dataPath: str = ""
    outputFolder: str = ""
    objective: Annotated[str, Choice(list(OBJECTIVES))] = "dino"
    modelSize: Annotated[str, Choice(list(MODEL_SIZES))] = "tiny-cpu"
    epochs: Annotated[int, WithinRange(0, 100000)] = 0
    stepsPerEpoch: Annotated[int, WithinRange(0, 10000000)] = 0
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    precision: Annotated[str, Choice(list(PRECISIONS))] = "auto"
    headManifest: str = ""
    headTask: Annotated[str, Choice(list(TASKS))] = "seg"
    headTarget: str = ""
    headBundle: str = ""
    headOutput: str = ""
    headLabelFractions: str = "1"
    headIterations: Annotated[int, WithinRange(0, 10000000)] = 0
    headSequences: str = ""
    headImageChannels: Annotated[int, WithinRange(0, 256)] = 0
    headThumbnails: bool = False


class BrainDINOTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.timeout.connect(self.onPoll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BrainDINOTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = BrainDINOTrainingLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.pretrainButton.connect("clicked(bool)", lambda: self.launch("pretrain"))
        self.ui.resumeButton.connect("clicked(bool)", lambda: self.launch("resume"))
        self.ui.fitHeadButton.connect("clicked(bool)", lambda: self.launch("fit-head"))
        self.ui.makeCohortButton.connect("clicked(bool)", lambda: self.launch("cohort"))
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.dataFolderButton.connect("clicked(bool)", lambda: self.chooseFolder("dataPath", "Choose the data"))
        self.ui.headManifestFolderButton.connect(
            "clicked(bool)", lambda: self.chooseFolder("headManifest", "Choose a BIDS, BraTS or manifest folder")
        )
        self.initializeParameterNode()
        self.updateButtons()

    def cleanup(self):
        """A running job ends with the module (its process tree included)."""
        self._pollTimer.stop()
        self.logic.cancel()
        self.removeObservers()
        self.setParameterNode(None)

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        """The forms live in the scene's parameter node; a running job does not depend on the scene and goes on."""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def chooseFolder(self, field, title):
        """The path fields' own Browse picks files (a manifest); data often is a folder."""
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), title)
        if folder:
            setattr(self._parameterNode, field, folder)

    def launch(self, what):
        from BrainDINO import dependenciesReady

        if not dependenciesReady(training=True):
            return
        with slicer.util.tryWithErrorDisplay("BrainDINO Training could not start.", waitCursor=True):
            commands = self.logic.commands(self._parameterNode, what)
            self.ui.logPlainTextEdit.clear()
            self.logic.start(commands)
            self.ui.statusLabel.text = f"Running {what} in a background process..."
            self.ui.progressBar.setRange(0, 0)
            self._pollTimer.start()
        self.updateButtons()

    def onPoll(self):
        from BrainDINOLib.background import JobEnded, LogLine
        from BrainDINOLib.progress import Progress

        for event in self.logic.poll():
            if isinstance(event, LogLine):
                self.ui.logPlainTextEdit.appendPlainText(event.text)
            elif isinstance(event, Progress):
                self.ui.progressBar.setRange(0, event.total)
                self.ui.progressBar.setValue(event.done)
                self.ui.statusLabel.text = f"{event.stage}: {event.done}/{event.total}"
            elif isinstance(event, JobEnded):
                self.onEnded(event)
        self.updateButtons()

    def onEnded(self, event):
        self._pollTimer.stop()
        self.ui.progressBar.setRange(0, 1)
        self.ui.progressBar.setValue(1 if event.code == 0 else 0)
        if event.cancelled:
            self.ui.statusLabel.text = "Cancelled. A pretraining run continues from its last checkpoint with Resume."
        elif event.code == 0:
            self.ui.statusLabel.text = f"Done. {self.logic.outcome}"
        else:
            self.ui.statusLabel.text = f"Failed (exit code {event.code}); the log says why."
        if event.code == 0 and self.logic.lastAction == "cohort":  # the module may be hidden by now
            parameters = self._parameterNode or self.logic.getParameterNode()
            parameters.dataPath = parameters.headManifest = str(self.logic.cohortFolder(parameters))

    def onCancel(self):
        self.logic.cancel()
        self.ui.statusLabel.text = "Cancelling..."

    def updateButtons(self):
        running = self.logic.running
        for button in (self.ui.pretrainButton, self.ui.resumeButton, self.ui.fitHeadButton, self.ui.makeCohortButton):
            button.enabled = not running
        self.ui.cancelButton.enabled = running


class BrainDINOTrainingLogic(ScriptedLoadableModuleLogic):
    """Turns the forms into commands and runs them with ``BrainDINOLib.background.BackgroundJob``."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.job = None
        self.lastAction = None
        self.outcome = ""

    def getParameterNode(self):
        return BrainDINOTrainingParameterNode(super().getParameterNode())

    @property
    def running(self):
        return self.job is not None and self.job.running

    def cohortFolder(self, parameters):
        return Path(parameters.outputFolder) / "phantom-cohort"

    def commands(self, parameters, what):
        """Command lines for 'pretrain', 'resume', 'fit-head' or 'cohort' (a phantom cohort to try things on)."""
        from BrainDINOLib.errors import BrainDINOError

        self.lastAction = what
        if what == "cohort":
            if not parameters.outputFolder.strip():
                raise BrainDINOError("choose an output folder first: the cohort is written into it")
            self.outcome = f"Phantom cohort in {self.cohortFolder(parameters)}; it is now the data and the manifest."
            return [["cohort", "make", "24", str(self.cohortFolder(parameters))]]
        if what in ("pretrain", "resume"):
            form = PretrainForm(
                parameters.dataPath,
                parameters.outputFolder,
                objective=parameters.objective,
                model_size=parameters.modelSize,
                epochs=parameters.epochs,
                steps_per_epoch=parameters.stepsPerEpoch,
                device=parameters.device,
                precision=parameters.precision,
            )
            self.outcome = f"The encoder bundle is {form.run_dir / 'bundle'}; use it in the BrainDINO module."
            return form.commands(resume=what == "resume")
        form = FitHeadForm(
            parameters.headManifest,
            parameters.headTask,
            parameters.headOutput,
            target=parameters.headTarget,
            bundle=parameters.headBundle,
            sequences=parameters.headSequences,
            label_fractions=parse_fractions(parameters.headLabelFractions),
            iterations=parameters.headIterations,
            image_channels=parameters.headImageChannels,
            thumbnails=parameters.headThumbnails,
            device=parameters.device,
        )
        self.outcome = f"The bundle with the new head is {form.out_bundle}; its metrics are beside it."
        return form.commands()

    def start(self, commands):
        from BrainDINOLib.background import BackgroundJob

        if self.running:
            raise RuntimeError("a job is running: cancel it first")
        from BrainDINO import jobPython

        python, inferencePath = jobPython()
        self.job = BackgroundJob(
            commands, module="BrainDINOTrainingLib", python=python, python_path=libraryFolders(inferencePath)
        ).start()
        return self.job

    def poll(self):
        return self.job.poll() if self.job else []

    def cancel(self):
        if self.running:
            self.job.cancel()


def libraryFolders(inferencePath):
    """Folders holding BrainDINOLib and BrainDINOTrainingLib (one folder once the extension is installed)."""
    folders = [*inferencePath, os.path.dirname(slicer.modules.braindinotraining.path)]
    return list(dict.fromkeys(folders))


class BrainDINOTrainingTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (CTest runs each ``test_`` method; Reload and Test runs `runTest`). Nothing is installed:
    without PyTorch and the training requirements the background pretraining check skips, naming what is missing."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from BrainDINO import runEachTest

        runEachTest(self, self.test_path_fields_keep_what_is_typed, self.test_background_pretraining)

    def test_path_fields_keep_what_is_typed(self):
        """Path fields show "" when empty and keep a trailing separator; the form survives a scene close."""
        uiFile = os.path.join(os.path.dirname(slicer.modules.braindinotraining.path), "Resources", "UI",
                              "BrainDINOTraining.ui")  # fmt: skip
        ui = slicer.util.childWidgetVariables(slicer.util.loadUI(uiFile))
        parameters = BrainDINOTrainingLogic().getParameterNode()
        guiTag = parameters.connectGui(ui)
        try:
            self.assertEqual(ui.dataPathLineEdit.currentPath, "")
            typed = os.path.join(slicer.app.temporaryPath, "braindino-data") + os.sep
            ui.dataPathLineEdit.currentPath = typed
            self.assertEqual(parameters.dataPath, typed)
            self.assertEqual(ui.dataPathLineEdit.currentPath, typed)
            ui.dataPathLineEdit.currentPath = ""  # emptied: the parameter follows
            self.assertEqual(parameters.dataPath, "")
        finally:
            parameters.disconnectGui(guiTag)
        slicer.util.selectModule("BrainDINOTraining")
        slicer.mrmlScene.Clear()
        widget = slicer.modules.braindinotraining.widgetRepresentation().self()
        self.assertIsNotNone(widget._parameterNode)  # bound to the new scene's parameter node
        widget._parameterNode.headTarget = "age"
        self.assertEqual(widget.ui.headTargetLineEdit.text, "age")

    def test_background_pretraining(self):
        """A tiny phantom cohort, an index and a few pretraining steps in a PythonSlicer process."""
        from BrainDINO import skipWithoutDependencies

        skipWithoutDependencies(self, training=True)
        import tempfile

        from BrainDINOLib.background import JobEnded
        from BrainDINOLib.progress import Progress

        logic = BrainDINOTrainingLogic()
        parameters = logic.getParameterNode()
        out = Path(tempfile.mkdtemp(prefix="braindino-training-test-"))
        parameters.outputFolder = str(out)
        job = logic.start([["cohort", "make", "2", str(logic.cohortFolder(parameters)), "--resolution", "2"]])
        self.assertEqual(job.wait()[-1], JobEnded(0, cancelled=False))
        parameters.dataPath = str(logic.cohortFolder(parameters))
        parameters.epochs, parameters.stepsPerEpoch, parameters.device = 1, 2, "cpu"
        commands = logic.commands(parameters, "pretrain")
        commands[-1] += ["--set", "batch_size=4", "--set", "crops.global_size=64", "--set", "crops.local_size=32"]
        events = logic.start(commands).wait()
        self.assertEqual(events[-1], JobEnded(0, cancelled=False))
        self.assertEqual([e.done for e in events if isinstance(e, Progress) and e.stage == "pretraining"][-1], 2)
        self.assertTrue((out / "run" / "bundle" / "model.json").is_file())
        logging.info("BrainDINOTraining self-test passed")
