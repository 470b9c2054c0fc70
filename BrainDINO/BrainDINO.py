"""3D Slicer module "BrainDINO": a frozen brain-MRI foundation encoder, its feature maps and task heads.

Thin by design: the parameter node, the widget (Qt only) and Slicer's logic role. The work is done
by ``BrainDINOLib.session`` and ``BrainDINOLib.mrml``, which CI tests on a real MRML scene.
``BrainDINOLib`` is imported inside functions: Slicer loads this file before the dependencies
(PyTorch and friends) are installed on first use.
"""

import html
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import unittest
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

SEQUENCES = ["auto", "t1", "t1ce", "t2", "flair"]
OVERLAYS = ["attention", "PCA", "similarity", "none"]
IMAGE_SIZES = ["bundle default", "224", "336", "448", "560", "672", "896"]  # multiples of 14- and 16-px patches


class BrainDINO(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "BrainDINO"
        self.parent.categories = ["Neuroimaging"]
        self.parent.dependencies = []
        self.parent.contributors = ["BrainDINO developers"]
        self.parent.helpText = (
            "Runs a frozen self-supervised ViT encoder slice by slice on a brain MRI: tumour segmentation, "
            "attention, PCA and similarity maps, and the predictions of the model bundle's heads. "
            "Press 'Load sample' and then Apply for a first look. 'Many scans' runs a whole folder. The same "
            "pipeline runs headless: <code>PythonSlicer -m BrainDINOLib infer scan.nii.gz -o out/</code>. "
            "The default model is a demonstration trained on synthetic phantoms, not a medical device."
        )
        self.parent.acknowledgementText = (
            "Method: BrainDINO (arXiv 2604.27277). Encoders are built with timm. "
            "Sample data: a synthetic phantom derived from the MNI ICBM152 2009a template."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The demo phantom in the Sample Data module (category BrainDINO), from the files shipped with the module."""
    import SampleData

    from BrainDINOLib.sample_data import slicer_sample_source

    SampleData.SampleDataLogic.registerCustomSampleDataSource(**slicer_sample_source())


@parameterNodeWrapper
class BrainDINOParameterNode:
    """What one Apply uses; every field is bound to a widget of ``Resources/UI/BrainDINO.ui``.

    model: a catalogue name or a bundle folder ("" = the catalogue default).
    t1Volume .. flairVolume: the subject's other scans, read by heads of several sequences.
    queryPoints: the point list whose points query the similarity map.
    attentionHead: the attention head shown, counted from 1 (0: the mean of all heads).
    featureBlock: the block whose tokens make PCA and similarity, counted from 1 (0: the last block).
    imageSize: canvas side in pixels for the maps and heads ("bundle default": the bundle's own).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    sequence: Annotated[str, Choice(SEQUENCES)] = "auto"
    t1Volume: vtkMRMLScalarVolumeNode
    t1ceVolume: vtkMRMLScalarVolumeNode
    t2Volume: vtkMRMLScalarVolumeNode
    flairVolume: vtkMRMLScalarVolumeNode
    model: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    imageSize: Annotated[str, Choice(IMAGE_SIZES)] = IMAGE_SIZES[0]
    makeSegmentation: bool = True
    makeAttention: bool = True
    makePca: bool = True
    makeSimilarity: bool = True
    makePredictions: bool = True
    overlay: Annotated[str, Choice(OVERLAYS)] = "attention"
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    queryPoints: vtkMRMLMarkupsFiducialNode
    queryWithCrosshair: bool = False
    attentionHead: Annotated[int, WithinRange(0, 64)] = 0
    featureBlock: Annotated[int, WithinRange(0, 64)] = 0


class BrainDINOWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shownOverlay = None
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.timeout.connect(self.onPoll)
        self._cohortOutDir = None
        self._downloadable = {}
        self._downloadTimer = qt.QTimer()
        self._downloadTimer.setInterval(200)
        self._downloadTimer.timeout.connect(self.onDownloadPoll)
        self._downloadLastLine = ""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BrainDINO.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = BrainDINOLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)
        self.ui.browseModelButton.connect("clicked(bool)", self.onBrowseModel)
        self.ui.importCheckpointButton.connect("clicked(bool)", self.onImportCheckpoint)
        self.ui.downloadButton.connect("clicked(bool)", self.onDownload)
        self.ui.modelComboBox.connect("activated(int)", self.onCatalogueChosen)
        self.ui.queryPointsSelector.connect("nodeAddedByUser(vtkMRMLNode*)", self.onQueryPointsCreated)
        self.ui.processFolderButton.connect("clicked(bool)", self.onProcessFolder)
        self.ui.loadCohortScanButton.connect("clicked(bool)", self.onLoadCohortScan)
        self.initializeParameterNode()
        note = slicerVersionProblem() or dependencyNote()
        if note:
            self.ui.modelInfoLabel.text = note
        else:
            self.refreshCatalogue()

    def cleanup(self):
        self._pollTimer.stop()
        self._downloadTimer.stop()
        self.logic.cancelDownload()
        self.logic.cancelAndForget()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self._unbindParameterNode()

    def onSceneStartClose(self, caller, event):
        self.logic.cancelAndForget()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def _unbindParameterNode(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
            self._parameterNode = None

    def setParameterNode(self, parameterNode):
        self._unbindParameterNode()
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
            self.onParameterChanged()

    def onParameterChanged(self, caller=None, event=None):
        """Keep Apply's state, the overlay and the query observers in step with the parameter node."""
        if self._parameterNode is None:
            return
        running, cohort = self.logic.running, self.logic.runningCohort
        single = running and not cohort
        self.ui.applyButton.enabled = single or (not running and bool(self._parameterNode.inputVolume))
        self.ui.applyButton.text = "Cancel" if single else "Apply"
        self.ui.processFolderButton.enabled = cohort or not running
        self.ui.processFolderButton.text = "Cancel" if cohort else "Process a folder\u2026"
        self.ui.loadCohortScanButton.enabled = not running and self.ui.cohortScanComboBox.count > 0
        downloading = self.logic.downloading
        chosen = self._parameterNode.model in self._downloadable
        self.ui.downloadButton.enabled = downloading or (chosen and not running)
        self.ui.downloadButton.text = "Cancel" if downloading else "Download"
        if downloading:  # one background job at a time: they share the progress bar
            self.ui.applyButton.enabled = self.ui.processFolderButton.enabled = False
        overlay = (self._parameterNode.overlay, self._parameterNode.overlayOpacity)
        if overlay != self._shownOverlay:
            self._shownOverlay = overlay
            self.logic.showOverlay(self._parameterNode)
        self.logic.observeQueries(self._parameterNode, self.showStatus)
        message = self.logic.explore(self._parameterNode)
        if message:
            self.showStatus(message)

    def onApplyButton(self):
        if self.logic.running:
            self.logic.cancel()
            self.showStatus("Cancelling...")
            return
        if not dependenciesReady():
            self.showStatus("Dependencies are not installed; nothing was run.")
            return
        with slicer.util.tryWithErrorDisplay("BrainDINO could not start.", waitCursor=True):
            self.refreshCatalogue()
            self.logic.start(self._parameterNode)
            self.ui.predictionsTextEdit.setPlainText("")
            self.showStarted()
        self.onParameterChanged()

    def onProcessFolder(self):
        """Ask for the folder of scans and the results folder, then run the cohort in the background."""
        if self.logic.running:
            self.logic.cancel()
            self.showStatus("Cancelling: the scans done so far stay in the results folder...")
            return
        window = slicer.util.mainWindow()
        folder = qt.QFileDialog.getExistingDirectory(window, "Choose the folder of scans")
        if not folder:
            return
        outDir = qt.QFileDialog.getExistingDirectory(window, "Choose the folder for results", os.path.dirname(folder))
        if not outDir or not dependenciesReady():
            return
        with slicer.util.tryWithErrorDisplay("BrainDINO could not start.", waitCursor=True):
            self.logic.startCohort(self._parameterNode, folder, outDir)
            self.showStarted()
        self.onParameterChanged()

    def showStarted(self):
        self.ui.progressBar.setRange(0, 0)
        self.ui.progressBar.visible = True
        self.showStatus("Starting...")
        self._pollTimer.start()

    def onPoll(self):
        """Drain the run's events: progress, then the finished run (its nodes are made here, on the GUI thread)."""
        from BrainDINOLib.progress import Progress
        from BrainDINOLib.session import CohortDone, Failed, Finished, Stopped

        for event in self.logic.poll():
            if isinstance(event, Progress):
                self.ui.progressBar.setRange(0, event.total)
                self.ui.progressBar.setValue(event.done)
                self.ui.statusLabel.text = f"{event.stage} ({100 * event.done // max(event.total, 1)} %)"
            elif isinstance(event, Finished):
                self.onFinished(event.run)
            elif isinstance(event, CohortDone):
                self.onCohortDone(event)
            elif isinstance(event, Failed):
                self.showStatus(f"Failed: {event.message}")
                slicer.util.errorDisplay(event.message, windowTitle="BrainDINO")
            elif isinstance(event, Stopped):
                self.showStatus("Cancelled: the scene is as it was.")
        if not self.logic.running:
            self._pollTimer.stop()
            self.ui.progressBar.visible = False
            self.onParameterChanged()

    def onFinished(self, run):
        result = run.result
        folder = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene).GetItemName(run.folder)
        seconds, device = result["timings_s"]["total"], result["device"]
        self.showStatus(f"Done in {seconds:.1f} s on {device}; the outputs are in the folder '{folder}'.")
        self.showPredictions(run)

    def showPredictions(self, run):
        result = run.result
        lines = [html.escape(line) for line in run.prediction_lines]
        if run.alert:  # out of distribution: the first line, in red
            lines.insert(0, f'<b style="color:#d62728">{html.escape(run.alert)}</b>')
        self.ui.predictionsTextEdit.setHtml("<br>".join(lines))
        for warning in result["warnings"]:
            self.log(f"warning: {warning}")
        if self._parameterNode:
            self.logic.showOverlay(self._parameterNode)

    def onCohortDone(self, done):
        """Show the summary table, list the scans to load, and say how the cohort went."""
        self._cohortOutDir = done.out_dir
        self.ui.cohortScanComboBox.clear()
        for row in done.rows:
            self.ui.cohortScanComboBox.addItem(f"{row['scan']} ({row['status']})", row["scan"])
        counts = {status: sum(row["status"] == status for row in done.rows) for status in ("ok", "skipped", "failed")}
        self.showStatus(
            f"{'Cancelled after' if done.cancelled else 'Done:'} {len(done.rows)} scans ({counts['ok']} done, "
            f"{counts['skipped']} already done, {counts['failed']} failed); results in {done.out_dir}. "
            "Choose a scan under 'Many scans' and press 'Load scan' to see it."
        )
        for row in done.rows:
            if row["status"] == "failed":
                self.log(f"{row['scan']}: {row['error']}")
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.modules.tables.logic().GetLayoutWithTable(layoutManager.layout))
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(done.table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    def onLoadCohortScan(self):
        name = self.ui.cohortScanComboBox.itemData(self.ui.cohortScanComboBox.currentIndex)
        if not name or self._cohortOutDir is None or not dependenciesReady():
            return
        with slicer.util.tryWithErrorDisplay(f"Could not load scan {name}.", waitCursor=True):
            run = self.logic.loadCohortScan(self._parameterNode, self._cohortOutDir, name)
            self.showStatus(f"Loaded {name} from {self._cohortOutDir}; its outputs are in the folder of the same name.")
            self.showPredictions(run)
        self.onParameterChanged()

    def onQueryPointsCreated(self, points):
        """The user asked for a point list (no query node exists before): one point, placed right away."""
        points.SetMaximumNumberOfControlPoints(1)
        self.ui.queryPlaceWidget.setCurrentNode(points)
        self.ui.queryPlaceWidget.setPlaceModeEnabled(True)

    def onLoadSample(self):
        with slicer.util.tryWithErrorDisplay("Could not load the sample.", waitCursor=True):
            self.logic.loadSample(self._parameterNode)
            self.showStatus("Loaded the demo phantom (FLAIR as input, T1 and T1ce as other scans). Press Apply.")

    def onBrowseModel(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Choose a BrainDINO bundle folder")
        if folder:
            self._parameterNode.model = folder

    def onImportCheckpoint(self):
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(),
            "Import an encoder checkpoint",
            "",
            "Checkpoints (*.safetensors *.pth *.pt *.ckpt)",
        )
        if not path:
            return
        if not dependenciesReady():
            return
        with slicer.util.tryWithErrorDisplay("Could not import the checkpoint.", waitCursor=True):
            bundle = self.logic.importCheckpoint(path)
            self._parameterNode.model = bundle.card.name
            self.refreshCatalogue()
            self.showStatus(f"Imported {path} as bundle '{bundle.card.name}' ({bundle.card.encoder.name}).")

    def refreshCatalogue(self):
        self.ui.modelComboBox.clear()
        for name, source, card in self.logic.bundles():
            self.ui.modelComboBox.addItem(f"{name} ({source})", name)
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, card.intended_use, qt.Qt.ToolTipRole)
        self._downloadable = dict(self.logic.downloadable())
        for name, entry in self._downloadable.items():
            self.ui.modelComboBox.addItem(f"{name} (download)", name)
            tip = f"{entry['license']}: {entry['description']}"
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, tip, qt.Qt.ToolTipRole)
        self.ui.modelInfoLabel.text = self.logic.modelSummary(self._parameterNode)
        self.onParameterChanged()

    def onCatalogueChosen(self, index):
        self._parameterNode.model = self.ui.modelComboBox.itemData(index)
        self.ui.modelInfoLabel.text = self.logic.modelSummary(self._parameterNode)

    def onDownload(self):
        """Download the chosen public encoder in a background process (or cancel the download)."""
        if self.logic.downloading:
            self.logic.cancelDownload()
            self.showStatus("Cancelling the download...")
            return
        if not dependenciesReady():
            return
        with slicer.util.tryWithErrorDisplay("BrainDINO could not start the download.", waitCursor=True):
            self.logic.startDownload(self._parameterNode.model)
            self._downloadLastLine = ""
            self.ui.progressBar.setRange(0, 0)
            self.ui.progressBar.visible = True
            self.showStatus(f"Downloading {self._parameterNode.model}...")
            self._downloadTimer.start()
        self.onParameterChanged()

    def onDownloadPoll(self):
        """Show the download's progress; when it ends, list the new bundle or say what went wrong."""
        from BrainDINOLib.background import JobEnded, LogLine
        from BrainDINOLib.progress import Progress

        for event in self.logic.pollDownload():
            if isinstance(event, Progress):
                self.ui.progressBar.setRange(0, event.total)
                self.ui.progressBar.setValue(event.done)
                self.ui.statusLabel.text = f"{event.stage}: {event.done}/{event.total}"
            elif isinstance(event, LogLine):
                self.log(event.text)
                self._downloadLastLine = event.text
            elif isinstance(event, JobEnded):
                self._downloadTimer.stop()
                self.ui.progressBar.visible = False
                message = self._downloadLastLine.split("error:", 1)[-1].strip()
                if event.cancelled:
                    self.showStatus("Download cancelled.")
                elif event.code != 0:
                    self.showStatus(f"Download failed: {message}")
                    slicer.util.errorDisplay(message, windowTitle="BrainDINO")
                else:
                    self.showStatus(f"Done: {message}")
                    self.refreshCatalogue()
        self.onParameterChanged()

    def showStatus(self, message):
        self.ui.statusLabel.text = message
        self.log(message)

    def log(self, message):
        self.ui.logPlainTextEdit.appendPlainText(message)
        logging.info(message)


def slicerVersionProblem():
    """Why this Slicer cannot run BrainDINO ('' when it can)."""
    from BrainDINOLib.dependencies import slicer_version_problem

    return slicer_version_problem(slicer.app.majorVersion, slicer.app.minorVersion)


def dependencyNote(training=False):
    """What the first Apply (or Training job) will install, or '' when everything is there."""
    from BrainDINOLib.dependencies import missing

    problems = sum(missing(training), [])
    return f"The first use installs: {', '.join(problems)}." if problems else ""


def ensureDependencies(training=False):
    """Install what inference (or, with ``training``, training too) needs after one confirmation: torch and
    torchvision through the PyTorch extension, the rest with pip, constrained to the installed torch and
    torchvision so that nothing replaces them. Offers a restart when an already-imported package changed.
    Returns False when the user declines.

    Raises:
        RuntimeError: Slicer is too old, the PyTorch extension is missing, torch is too old, or packages are
            still missing after installing.
    """
    problem = slicerVersionProblem()
    if problem:
        raise RuntimeError(problem)
    from BrainDINOLib.dependencies import (
        TORCH_REQUIREMENTS,
        TORCH_VERSION,
        TORCHVISION_VERSION,
        changed_since,
        imported_versions,
        missing,
        read_requirements,
        requirement_files,
        torch_constraints,
    )

    torchProblems, otherProblems = missing(training)
    if not torchProblems and not otherProblems:
        return True
    if any("installed:" in problem for problem in torchProblems):
        raise RuntimeError(
            f"BrainDINO needs {', '.join(TORCH_REQUIREMENTS)}; found {'; '.join(torchProblems)}. Update PyTorch in "
            "the 'PyTorch Utils' module (uninstall, restart Slicer, install), then try again."
        )
    question = (
        "BrainDINO needs these Python packages, which are not installed yet:\n\n  "
        + "\n  ".join(torchProblems + otherProblems)
        + "\n\nInstall them now? This downloads up to a few GB (PyTorch) and takes a few minutes."
    )
    if not slicer.util.confirmOkCancelDisplay(question, windowTitle="BrainDINO: install dependencies"):
        return False
    if torchProblems:
        try:
            import PyTorchUtils
        except ModuleNotFoundError as error:
            raise RuntimeError(
                "BrainDINO installs PyTorch through the 'PyTorch' extension: install it from the Extensions "
                "Manager, restart Slicer, and try again."
            ) from error
        installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False,
            torchVersionRequirement=TORCH_VERSION,
            torchvisionVersionRequirement=TORCHVISION_VERSION,
        )
        if installed is None:
            return False
    if otherProblems:
        before = imported_versions()
        requirements = [line for path in requirement_files(training) for line in read_requirements(path)]
        with tempfile.TemporaryDirectory() as folder:
            constraints = os.path.join(folder, "constraints.txt")
            with open(constraints, "w") as handle:
                handle.write(torch_constraints())
            if importlib.util.find_spec("slicer.packaging"):  # Slicer 5.12 and later (Base/Python/slicer/packaging.py)
                importlib.import_module("slicer.packaging").pip_install(requirements, constraints=constraints)
            else:  # Slicer 5.10: pip_install(list) passes the items to pip as they are (a path stays one argument)
                slicer.util.pip_install([*requirements, "-c", constraints])
        changed = changed_since(before)
        if changed and not slicer.app.testingEnabled():
            message = "These packages were already in use and changed; restart Slicer now to use the new ones?"
            if slicer.util.confirmYesNoDisplay(message, detailedText="\n".join(changed)):
                slicer.util.restart()
    remaining = sum(missing(training), [])
    if remaining:
        raise RuntimeError(f"still missing after installing: {', '.join(remaining)}; restart Slicer and try again")
    return True


def dependenciesReady(training=False):
    """`ensureDependencies` with its errors shown; no wait cursor, as it may ask the user first."""
    with slicer.util.tryWithErrorDisplay("BrainDINO could not install what it needs."):
        return ensureDependencies(training)
    return False


def jobPython():
    """(interpreter, folders holding BrainDINOLib) of background jobs: Slicer's ``PythonSlicer``, found on the PATH
    Slicer sets (as ``_executePythonModule`` in Base/Python/slicer/util.py finds it), with Slicer's own environment,
    and this module's folder (in an installed extension, the folder of both modules' libraries)."""
    return shutil.which("PythonSlicer") or sys.executable, [os.path.dirname(slicer.modules.braindino.path)]


class BrainDINOLogic(ScriptedLoadableModuleLogic):
    """Slicer's logic role: the parameter node, and a ``BrainDINOLib.session.InferenceSession`` (made on
    first use, once the dependencies are installed) that does the work."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._session = None
        self._download = None
        self._observed = None
        self._explored = (0, 0)

    def getParameterNode(self):
        return BrainDINOParameterNode(super().getParameterNode())

    @property
    def session(self):
        """Runs ``infer`` in a ``PythonSlicer`` process: inference, queries and exploration import no torch here
        (the catalogue listing, `bundles`, still does)."""
        if self._session is None:
            from BrainDINOLib.session import InferenceSession

            python, pythonPath = jobPython()
            self._session = InferenceSession(python=python, python_path=pythonPath)
        return self._session

    @property
    def running(self):
        return self._session is not None and self._session.running

    @property
    def runningCohort(self):
        return self._session is not None and self._session.running_cohort

    def runOptions(self, parameters):
        from BrainDINOLib.session import RunOptions

        chosen = {
            "segmentation": parameters.makeSegmentation,
            "attention": parameters.makeAttention,
            "pca": parameters.makePca,
            "similarity": parameters.makeSimilarity,
            "predictions": parameters.makePredictions,
        }
        return RunOptions(
            bundle=parameters.model or None,
            device=parameters.device,
            sequence=None if parameters.sequence == "auto" else parameters.sequence,
            outputs=frozenset(name for name, wanted in chosen.items() if wanted),
            image_size=None if parameters.imageSize == IMAGE_SIZES[0] else int(parameters.imageSize),
        )

    def otherScans(self, parameters):
        scans = {
            "t1": parameters.t1Volume,
            "t1ce": parameters.t1ceVolume,
            "t2": parameters.t2Volume,
            "flair": parameters.flairVolume,
        }
        return {name: node for name, node in scans.items() if node and node is not parameters.inputVolume}

    def start(self, parameters):
        self._explored = (0, 0)  # a new run shows the mean attention and the last block first
        parameters.attentionHead = parameters.featureBlock = 0
        self.session.start(parameters.inputVolume, self.runOptions(parameters), self.otherScans(parameters))

    def startCohort(self, parameters, folder, outDir):
        """Run every scan in ``folder`` into ``outDir`` with the model, device and sequence of ``parameters``."""
        self.session.start_cohort(slicer.mrmlScene, folder, outDir, self.runOptions(parameters))

    def loadCohortScan(self, parameters, outDir, name):
        """Load a cohort scan and its outputs; it becomes the input and the run that queries and exploration use."""
        self._explored = (0, 0)
        parameters.attentionHead = parameters.featureBlock = 0
        run = self.session.load_cohort_scan(slicer.mrmlScene, outDir, name, self.runOptions(parameters).outputs)
        parameters.inputVolume = run.input
        self.showOverlay(parameters)
        return run

    def poll(self):
        return self.session.poll() if self._session else []

    def cancel(self):
        if self._session:
            self._session.cancel()

    def cancelAndForget(self):
        """On scene close: stop a run, drop its saved tokens and every observer."""
        if self._session:
            self._session.forget()
        self._observed = None
        self._explored = (0, 0)

    def explore(self, parameters):
        """Show the chosen attention head and block in the latest run's maps; returns what went wrong, or ''."""
        wanted = (parameters.attentionHead, parameters.featureBlock)
        if self._session is None or self._session.latest is None or wanted == self._explored:
            return ""
        from BrainDINOLib.errors import BrainDINOError

        self._explored = wanted
        try:
            self._session.show_head(parameters.attentionHead - 1 if parameters.attentionHead else None)
            self._session.use_block(parameters.featureBlock - 1 if parameters.featureBlock else None)
        except BrainDINOError as error:
            return str(error)
        return ""

    def overlayNode(self, overlay):
        """The latest run's node for an overlay choice (None when not made, or deleted since)."""
        run = self._session.latest if self._session else None
        if run is None:
            return None
        node = {"attention": run.attention, "PCA": run.pca, "similarity": run.similarity}.get(overlay)
        return node if node is not None and node.GetScene() is not None else None

    def showOverlay(self, parameters):
        """Show the latest run's chosen map over its input in every slice view."""
        run = self._session.latest if self._session else None
        if run is None or run.input.GetScene() is None:
            return
        from BrainDINOLib import mrml

        mrml.show_layers(slicer.mrmlScene, run.input, self.overlayNode(parameters.overlay), parameters.overlayOpacity)

    def observeQueries(self, parameters, report):
        """Let the query point list (and, if chosen, the crosshair) update the similarity map."""
        wanted = (parameters.queryPoints, parameters.queryWithCrosshair)
        if self._session is None or wanted == self._observed:
            return
        self._session.stop_observing()
        self._session.on_query_message = report
        if parameters.queryPoints:
            self._session.observe(parameters.queryPoints)
        if parameters.queryWithCrosshair:
            self._session.observe(slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode"))
        self._observed = wanted

    def loadSample(self, parameters):
        """Load the demo phantom's FLAIR (input), T1 and T1ce and select them."""
        from BrainDINOLib.sample_data import demo_phantom

        scans, _ = demo_phantom()
        nodes = {
            sequence: slicer.util.loadVolume(str(scans[sequence]), {"name": f"phantom {sequence.upper()}"})
            for sequence in ("t1", "t1ce", "flair")
        }
        parameters.inputVolume, parameters.sequence = nodes["flair"], "flair"
        parameters.t1Volume, parameters.t1ceVolume = nodes["t1"], nodes["t1ce"]
        parameters.t2Volume = parameters.flairVolume = None
        return nodes

    def bundles(self):
        """(name, source, model card) of every installed bundle that can be read (the others are logged)."""
        from BrainDINOLib.bundle import DEFAULT_MODELS_DIR, list_bundles, read_card
        from BrainDINOLib.errors import BrainDINOError

        found = []
        for name, source, path in list_bundles(DEFAULT_MODELS_DIR):
            try:
                found.append((name, source, read_card(path)))
            except BrainDINOError as error:
                logging.warning(f"BrainDINO: bundle {name} is not usable: {error}")
        return found

    def modelSummary(self, parameters):
        """One paragraph on the chosen bundle, or what is wrong with the choice."""
        from BrainDINOLib.bundle import find_bundle, read_card
        from BrainDINOLib.errors import BrainDINOError

        entry = dict(self.downloadable()).get(parameters.model)
        if entry:
            return (
                f"{entry['name']} ({entry['license']}), not downloaded yet: {entry['description']} Press Download to "
                f"fetch it from the Hugging Face Hub ({entry['source']['repo']}) into your models folder."
            )
        try:
            card = read_card(find_bundle(parameters.model or None))
        except BrainDINOError as error:
            return f"Model: {error}"
        heads = ", ".join(f"{h.name} ({'+'.join(h.modalities) or 'any'})" for h in card.heads) or "none"
        return f"{card.name}: {card.encoder.name}. Heads: {heads}. Intended use: {card.intended_use}"

    def downloadable(self):
        """(name, catalogue entry) of every public encoder that can be downloaded and is not in the models folder."""
        from BrainDINOLib.download import is_present, public_encoders

        return [(entry["name"], entry) for entry in public_encoders() if "source" in entry and not is_present(entry)]

    @property
    def downloading(self):
        return self._download is not None

    def startDownload(self, name):
        """Run ``models download NAME`` in a ``PythonSlicer`` process; `pollDownload` reports it."""
        from BrainDINOLib.background import BackgroundJob

        python, pythonPath = jobPython()
        command = ["models", "download", name]
        self._download = BackgroundJob([command], module="BrainDINOLib", python=python, python_path=pythonPath).start()

    def pollDownload(self):
        """The download's events since the last call (progress, log lines, and `JobEnded` last)."""
        from BrainDINOLib.background import JobEnded

        events = self._download.poll() if self._download else []
        if any(isinstance(event, JobEnded) for event in events):
            self._download = None
        return events

    def cancelDownload(self):
        if self._download:
            self._download.cancel()

    def importCheckpoint(self, path):
        from BrainDINOLib.bundle import DEFAULT_MODELS_DIR
        from BrainDINOLib.importers import bundle_name, import_checkpoint

        return import_checkpoint(path, DEFAULT_MODELS_DIR / bundle_name(path))


class BrainDINOTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: CTest runs each ``test_`` method (a skip is reported as skipped), Reload and Test runs
    `runTest`. Nothing is ever installed: the checks that need PyTorch and the other requirements skip, naming
    what is missing; the module, its ``.ui`` binding and the MRML conversions are checked without them."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        runEachTest(
            self,
            self.test_module_and_parameter_node,
            self.test_mrml_round_trip,
            self.test_phantom_outputs,
            self.test_folder_of_scans,
            self.test_bad_input_is_refused,
            self.test_public_encoders_are_offered,
        )

    def test_module_and_parameter_node(self):
        """A supported Slicer; the .ui binds to the parameter node both ways; entering the module creates no node."""
        self.assertEqual(slicerVersionProblem(), "")
        slicer.util.selectModule("BrainDINO")
        self.assertEqual(slicer.mrmlScene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems(), 0)
        uiFile = os.path.join(os.path.dirname(slicer.modules.braindino.path), "Resources", "UI", "BrainDINO.ui")
        uiWidget = slicer.util.loadUI(uiFile)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        ui = slicer.util.childWidgetVariables(uiWidget)
        parameters = BrainDINOLogic().getParameterNode()
        guiTag = parameters.connectGui(ui)
        try:
            parameters.overlay = "PCA"
            self.assertEqual(ui.overlayComboBox.currentText, "PCA")
            ui.pcaCheckBox.checked = False
            self.assertFalse(parameters.makePca)
            volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "input")
            ui.inputVolumeSelector.setCurrentNode(volume)
            self.assertEqual(parameters.inputVolume, volume)
            self.assertIsNone(parameters.queryPoints)  # a point list exists only once the user asks for one
        finally:
            parameters.disconnectGui(guiTag)

    def test_mrml_round_trip(self):
        """A volume node becomes BrainDINO's canonical volume and goes back onto the node's own voxel grid."""
        if importlib.util.find_spec("nibabel") is None:
            self.skipTest("needs nibabel (the module installs it on first use)")
        import numpy as np

        from BrainDINOLib import mrml

        voxels = np.arange(4 * 5 * 6, dtype=np.float32).reshape(6, 5, 4)  # (K, J, I)
        ijkToRas = np.array([[-1.0, 0, 0, 10], [0, 0, 2.0, -5], [0, -1.5, 0, 3], [0, 0, 0, 1]])  # permuted axes
        node = slicer.util.addVolumeFromArray(voxels, ijkToRas, "round trip")
        volume = mrml.volume_from_node(node)
        back = mrml.add_volume_like(node, volume.to_source(volume.data), "back")
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(back), voxels))
        self.assertTrue(np.allclose(mrml.ijk_to_ras(back), ijkToRas))

    def test_phantom_outputs(self):
        skipWithoutDependencies(self)
        import numpy as np

        from BrainDINOLib import mrml

        logic = BrainDINOLogic()
        parameters = logic.getParameterNode()
        nodes = logic.loadSample(parameters)
        run = logic.session.run(parameters.inputVolume, logic.runOptions(parameters), logic.otherScans(parameters))

        self.assertTrue(run.attention.IsA("vtkMRMLScalarVolumeNode"))
        self.assertTrue(run.pca.IsA("vtkMRMLVectorVolumeNode"))
        self.assertTrue(run.table.IsA("vtkMRMLTableNode"))
        flair = nodes["flair"]
        for output in (run.attention, run.pca):
            self.assertTrue(np.allclose(mrml.ijk_to_ras(output), mrml.ijk_to_ras(flair)))
            self.assertEqual(output.GetImageData().GetDimensions(), flair.GetImageData().GetDimensions())
        segmentation = run.segmentations["tumor"]
        segments = segmentation.GetSegmentation()
        voxels = sum(
            int(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segments.GetNthSegmentID(i), flair).sum())
            for i in range(segments.GetNumberOfSegments())
        )
        self.assertGreater(voxels, 1000)
        self.assertEqual(run.table.GetNumberOfRows(), 6)  # every head that reads FLAIR, T1 or T1ce: all three at hand

        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "query")
        logic.session.observe(points)
        points.AddControlPoint(0.0, -10.0, 10.0)
        self.assertIsNotNone(run.similarity)
        self.assertGreater(slicer.util.arrayFromVolume(run.similarity).max(), 0.9)
        logic.session.stop_observing()

    def test_folder_of_scans(self):
        """'Many scans': a folder with two scans and a broken file runs in the background, its summary becomes a
        table node, and a scan loads with its outputs on its file's grid."""
        skipWithoutDependencies(self)
        import time

        from BrainDINOLib.sample_data import demo_phantom
        from BrainDINOLib.session import CohortDone

        scans, _ = demo_phantom()
        logic = BrainDINOLogic()
        parameters = logic.getParameterNode()
        with tempfile.TemporaryDirectory() as work:
            folder = os.path.join(work, "scans")
            os.mkdir(folder)
            for sequence in ("t1", "flair"):
                shutil.copy(scans[sequence], os.path.join(folder, f"phantom_{sequence}.nii.gz"))
            with open(os.path.join(folder, "broken.nii.gz"), "wb") as handle:
                handle.write(b"not an image")
            logic.startCohort(parameters, folder, os.path.join(work, "out"))
            self.assertTrue(logic.runningCohort)
            events = []
            deadline = time.monotonic() + 600
            while logic.running and time.monotonic() < deadline:
                events += logic.poll()
                slicer.app.processEvents()
                time.sleep(0.05)
            events += logic.poll()
            done = events[-1]
            self.assertIsInstance(done, CohortDone)
            self.assertEqual([row["status"] for row in done.rows], ["failed", "ok", "ok"])
            self.assertEqual(done.table.GetNumberOfRows(), 3)
            run = logic.loadCohortScan(parameters, done.out_dir, "phantom_t1")
            self.assertIs(parameters.inputVolume, run.input)
            self.assertTrue(run.attention.IsA("vtkMRMLScalarVolumeNode"))
            self.assertEqual(run.attention.GetImageData().GetDimensions(), run.input.GetImageData().GetDimensions())
            logic.cancelAndForget()

    def test_bad_input_is_refused(self):
        skipWithoutDependencies(self)
        from BrainDINOLib.errors import BrainDINOError

        logic = BrainDINOLogic()
        empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
        with self.assertRaises(BrainDINOError):
            logic.session.start(empty)
        self.assertFalse(logic.running)

    def test_public_encoders_are_offered(self):
        """A public encoder not downloaded yet is in the model list; choosing it enables Download and says what it is
        (nothing is downloaded: the self-test needs no network)."""
        skipWithoutDependencies(self)
        offered = [name for name, _ in BrainDINOLogic().downloadable()]
        if not offered:
            self.skipTest("every public encoder is in the models folder already")
        slicer.util.selectModule("BrainDINO")
        widget = slicer.util.getModuleWidget("BrainDINO")
        widget.refreshCatalogue()
        index = widget.ui.modelComboBox.findData(offered[0])
        self.assertEqual(widget.ui.modelComboBox.itemText(index), f"{offered[0]} (download)")
        widget.onCatalogueChosen(index)
        self.assertTrue(widget.ui.downloadButton.enabled)
        self.assertIn("Press Download", widget.ui.modelInfoLabel.text)
        widget.logic.getParameterNode().model = ""
        self.assertFalse(widget.ui.downloadButton.enabled)


def runEachTest(testCase, *tests):
    """What Reload and Test runs (``runTest``): each test after ``setUp``; a skipped one is logged, not failed
    (CTest runs the ``test_`` methods itself and reports skips)."""
    for test in tests:
        testCase.setUp()
        try:
            test()
        except unittest.SkipTest as reason:
            logging.warning(f"{type(testCase).__name__}.{test.__name__} skipped: {reason}")


def skipWithoutDependencies(testCase, training=False):
    """Skip a test that needs PyTorch and the other requirements when they are missing (a test never installs)."""
    from BrainDINOLib.dependencies import missing

    problems = sum(missing(training), [])
    if problems:
        testCase.skipTest(f"needs {', '.join(problems)} (the modules install them on first use)")
