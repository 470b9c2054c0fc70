"""3D Slicer module "BrainDINO": a frozen brain-MRI foundation encoder, its feature maps and task heads.

Thin by design: the parameter node, the widget (Qt only) and Slicer's logic role. The work is done
by ``BrainDINOLib.session`` and ``BrainDINOLib.mrml``, which CI tests on a real MRML scene.
``BrainDINOLib`` is imported inside functions: Slicer loads this file before the dependencies
(PyTorch and friends) are installed on first use.
"""

import html
import logging
import sys
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


class BrainDINO(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "BrainDINO"
        self.parent.categories = ["Machine Learning"]
        self.parent.dependencies = []
        self.parent.contributors = ["BrainDINO developers"]
        self.parent.helpText = (
            "Runs a frozen self-supervised ViT encoder slice by slice on a brain MRI: tumour segmentation, "
            "attention, PCA and similarity maps, and the predictions of the model bundle's heads. "
            "Press 'Load sample' and then Apply for a first look. The same pipeline runs headless: "
            "<code>PythonSlicer -m BrainDINOLib infer scan.nii.gz -o out/</code>. "
            "The default model is a demonstration trained on synthetic phantoms, not a medical device."
        )
        self.parent.acknowledgementText = (
            "Method: BrainDINO (arXiv 2604.27277). Encoders are built with timm. "
            "Sample data: a synthetic phantom derived from the MNI ICBM152 2009a template."
        )


@parameterNodeWrapper
class BrainDINOParameterNode:
    """What one Apply uses; every field is bound to a widget of ``Resources/UI/BrainDINO.ui``.

    model: a catalogue name or a bundle folder ("" = the catalogue default).
    t1Volume .. flairVolume: the subject's other scans, read by heads of several sequences.
    queryPoints: the point list whose points query the similarity map.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    sequence: Annotated[str, Choice(SEQUENCES)] = "auto"
    t1Volume: vtkMRMLScalarVolumeNode
    t1ceVolume: vtkMRMLScalarVolumeNode
    t2Volume: vtkMRMLScalarVolumeNode
    flairVolume: vtkMRMLScalarVolumeNode
    model: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    makeSegmentation: bool = True
    makeAttention: bool = True
    makePca: bool = True
    makeSimilarity: bool = True
    makePredictions: bool = True
    overlay: Annotated[str, Choice(OVERLAYS)] = "attention"
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    queryPoints: vtkMRMLMarkupsFiducialNode
    queryWithCrosshair: bool = False


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
        self.ui.modelComboBox.connect("activated(int)", self.onCatalogueChosen)
        self.initializeParameterNode()
        note = dependencyNote()
        if note:
            self.ui.modelInfoLabel.text = note
        else:
            self.refreshCatalogue()

    def cleanup(self):
        self._pollTimer.stop()
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
        if not self._parameterNode.queryPoints:
            self._parameterNode.queryPoints = self.logic.newQueryPoints()
        self.ui.queryPlaceWidget.setCurrentNode(self._parameterNode.queryPoints)

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
        running = self.logic.running
        self.ui.applyButton.enabled = running or bool(self._parameterNode.inputVolume)
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        overlay = (self._parameterNode.overlay, self._parameterNode.overlayOpacity)
        if overlay != self._shownOverlay:
            self._shownOverlay = overlay
            self.logic.showOverlay(self._parameterNode)
        self.logic.observeQueries(self._parameterNode, self.showStatus)

    def onApplyButton(self):
        if self.logic.running:
            self.logic.cancel()
            self.showStatus("Cancelling after the current batch...")
            return
        with slicer.util.tryWithErrorDisplay("BrainDINO could not start.", waitCursor=True):
            if not ensureDependencies():
                self.showStatus("Dependencies are not installed; nothing was run.")
                return
            self.refreshCatalogue()
            self.logic.start(self._parameterNode)
            self.ui.progressBar.setRange(0, 0)
            self.ui.progressBar.visible = True
            self.ui.predictionsTextEdit.setPlainText("")
            self.showStatus("Starting...")
            self._pollTimer.start()
        self.onParameterChanged()

    def onPoll(self):
        """Drain the run's events: progress, then the finished run (its nodes are made here, on the GUI thread)."""
        from BrainDINOLib.cli import Progress
        from BrainDINOLib.session import Failed, Finished, Stopped

        for event in self.logic.poll():
            if isinstance(event, Progress):
                self.ui.progressBar.setRange(0, event.total)
                self.ui.progressBar.setValue(event.done)
                self.showStatus(f"{event.stage} {event.done}/{event.total}" if event.total else event.stage)
            elif isinstance(event, Finished):
                self.onFinished(event.run)
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
        analysis = run.analysis
        seconds = sum(analysis.timings.values())
        folder = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene).GetItemName(run.folder)
        self.showStatus(f"Done in {seconds:.1f} s on {analysis.device}; the outputs are in the folder '{folder}'.")
        lines = [html.escape(line) for line in run.prediction_lines]
        if run.alert:  # out of distribution: the first line, in red
            lines.insert(0, f'<b style="color:#d62728">{html.escape(run.alert)}</b>')
        self.ui.predictionsTextEdit.setHtml("<br>".join(lines))
        for warning in analysis.warnings:
            self.log(f"warning: {warning}")
        if self._parameterNode:
            self.logic.showOverlay(self._parameterNode)

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
        with slicer.util.tryWithErrorDisplay("Could not import the checkpoint.", waitCursor=True):
            if not ensureDependencies():
                return
            bundle = self.logic.importCheckpoint(path)
            self._parameterNode.model = bundle.card.name
            self.refreshCatalogue()
            self.showStatus(f"Imported {path} as bundle '{bundle.card.name}' ({bundle.card.encoder.name}).")

    def refreshCatalogue(self):
        self.ui.modelComboBox.clear()
        for name, source, card in self.logic.bundles():
            self.ui.modelComboBox.addItem(f"{name} ({source})", name)
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, card.intended_use, qt.Qt.ToolTipRole)
        self.ui.modelInfoLabel.text = self.logic.modelSummary(self._parameterNode)

    def onCatalogueChosen(self, index):
        self._parameterNode.model = self.ui.modelComboBox.itemData(index)
        self.ui.modelInfoLabel.text = self.logic.modelSummary(self._parameterNode)

    def showStatus(self, message):
        self.ui.statusLabel.text = message
        self.log(message)

    def log(self, message):
        self.ui.logPlainTextEdit.appendPlainText(message)
        logging.info(message)


def dependencyNote():
    """What the first Apply will install, or '' when everything is there."""
    from BrainDINOLib.dependencies import missing

    problems = sum(missing(), [])
    return f"The first Apply installs: {', '.join(problems)}." if problems else ""


def ensureDependencies():
    """Install what BrainDINO needs after one confirmation: torch through the PyTorch extension, the rest
    from ``Resources/requirements.txt``. Returns False when the user declines.

    Raises:
        RuntimeError: the PyTorch extension is missing, torch is too old, or packages are still missing.
    """
    if sys.version_info < (3, 10):  # noqa: UP036 (Slicer before 5.8 ships Python 3.9)
        raise RuntimeError("BrainDINO needs 3D Slicer 5.8 or later (Python 3.10 or later)")
    from BrainDINOLib.dependencies import REQUIREMENTS, TORCH_REQUIREMENTS, TORCH_VERSION, missing

    torchProblems, otherProblems = missing()
    if not torchProblems and not otherProblems:
        return True
    if any("installed:" in problem for problem in torchProblems):
        raise RuntimeError(
            f"BrainDINO needs {', '.join(TORCH_REQUIREMENTS)}; found {'; '.join(torchProblems)}. Update PyTorch in "
            "the 'PyTorch Utils' module (uninstall, restart Slicer, install), then press Apply again."
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
                "Manager, restart Slicer, and press Apply again."
            ) from error
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_VERSION) is None:
            return False
    if otherProblems:
        slicer.util.pip_install(["-r", str(REQUIREMENTS)])
    remaining = sum(missing(), [])
    if remaining:
        raise RuntimeError(f"still missing after installing: {', '.join(remaining)}; restart Slicer and try again")
    return True


class BrainDINOLogic(ScriptedLoadableModuleLogic):
    """Slicer's logic role: the parameter node, and a ``BrainDINOLib.session.InferenceSession`` (made on
    first use, once the dependencies are installed) that does the work."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._session = None
        self._observed = None

    def getParameterNode(self):
        return BrainDINOParameterNode(super().getParameterNode())

    @property
    def session(self):
        if self._session is None:
            from BrainDINOLib.session import InferenceSession

            self._session = InferenceSession()
        return self._session

    @property
    def running(self):
        return self._session is not None and self._session.running

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
        self.session.start(parameters.inputVolume, self.runOptions(parameters), self.otherScans(parameters))

    def poll(self):
        return self.session.poll() if self._session else []

    def cancel(self):
        if self._session:
            self._session.cancel()

    def cancelAndForget(self):
        """On scene close: stop a run, drop its result and every observer."""
        if self._session:
            self._session.cancel()
            self._session.stop_observing()
            self._session.latest = None
        self._observed = None

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

    def newQueryPoints(self):
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "BrainDINO query")
        points.SetMaximumNumberOfControlPoints(1)
        return points

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

        try:
            card = read_card(find_bundle(parameters.model or None))
        except BrainDINOError as error:
            return f"Model: {error}"
        heads = ", ".join(f"{h['name']} ({'+'.join(h['modalities']) or 'any'})" for h in card.heads) or "none"
        return f"{card.name}: {card.encoder.name}. Heads: {heads}. Intended use: {card.intended_use}"

    def importCheckpoint(self, path):
        from BrainDINOLib.bundle import DEFAULT_MODELS_DIR
        from BrainDINOLib.importers import bundle_name, import_checkpoint

        return import_checkpoint(path, DEFAULT_MODELS_DIR / bundle_name(path))


class BrainDINOTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (CTest, or the Reload and Test button) on the bundled phantom."""

    def setUp(self):
        slicer.mrmlScene.Clear()
        self.assertTrue(ensureDependencies())  # CTest runs each test method alone, in any order

    def runTest(self):
        self.setUp()
        self.test_phantom_outputs()
        self.setUp()
        self.test_bad_input_is_refused()

    def test_phantom_outputs(self):
        import numpy as np

        logic = BrainDINOLogic()
        parameters = logic.getParameterNode()
        nodes = logic.loadSample(parameters)
        run = logic.session.run(parameters.inputVolume, logic.runOptions(parameters), logic.otherScans(parameters))

        self.assertTrue(run.attention.IsA("vtkMRMLScalarVolumeNode"))
        self.assertTrue(run.pca.IsA("vtkMRMLVectorVolumeNode"))
        self.assertTrue(run.table.IsA("vtkMRMLTableNode"))
        flair = nodes["flair"]
        for output in (run.attention, run.pca):
            self.assertTrue(np.allclose(_ijkToRas(output), _ijkToRas(flair)))
            self.assertEqual(output.GetImageData().GetDimensions(), flair.GetImageData().GetDimensions())
        segmentation = run.segmentations["tumor"]
        segments = segmentation.GetSegmentation()
        voxels = sum(
            int(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segments.GetNthSegmentID(i), flair).sum())
            for i in range(segments.GetNumberOfSegments())
        )
        self.assertGreater(voxels, 1000)
        self.assertEqual(run.table.GetNumberOfRows(), 6)  # every head: FLAIR, T1 and T1ce are all at hand

        points = parameters.queryPoints or logic.newQueryPoints()
        logic.session.observe(points)
        points.AddControlPoint(0.0, -10.0, 10.0)
        self.assertIsNotNone(run.similarity)
        self.assertGreater(slicer.util.arrayFromVolume(run.similarity).max(), 0.9)
        logic.session.stop_observing()

    def test_bad_input_is_refused(self):
        from BrainDINOLib.errors import BrainDINOError

        logic = BrainDINOLogic()
        empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
        with self.assertRaises(BrainDINOError):
            logic.session.start(empty)
        self.assertFalse(logic.running)


def _ijkToRas(node):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)
