"""What the BrainDINO Slicer module does, without its widgets: run the pipeline on a volume node in a
worker thread, turn the result into scene nodes, and answer similarity queries from cached tokens.

The worker only computes; nodes are created on the caller's (GUI) thread in `InferenceSession.poll`,
so a cancelled or failed run leaves the scene exactly as it was.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import mrml
from .bundle import DEFAULT_MODELS_DIR, find_bundle, load_bundle
from .cli import Progress
from .engine import Cancelled, resolve_device
from .errors import BrainDINOError
from .heads import prediction_row, prediction_text
from .infer import Analysis, InferenceOptions, analyse, check_sequences, ood_warning

logger = logging.getLogger(__name__)

OUTPUTS = ("segmentation", "attention", "pca", "similarity", "predictions")

#: The similarity map shows the voxels above this percentile (the rest is transparent in the slice views).
SIMILARITY_SHOWN = 95


@dataclass(frozen=True)
class RunOptions:
    """One Apply, as the parameter node holds it.

    Attributes:
        bundle: catalogue name or bundle folder (None: the catalogue default).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        sequence: the input's MRI sequence (None: the bundle's sequence head decides).
        outputs: which of `OUTPUTS` to create; ``similarity`` keeps the tokens for point queries.
    """

    bundle: str | None = None
    device: str = "auto"
    sequence: str | None = None
    outputs: frozenset[str] = frozenset(OUTPUTS)
    models_dir: Path = DEFAULT_MODELS_DIR

    def __post_init__(self):
        unknown = set(self.outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {', '.join(OUTPUTS)}")


@dataclass(frozen=True)
class Finished:
    run: RunNodes


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass(frozen=True)
class Stopped:
    """The run was cancelled; nothing was added to the scene."""


Event = Progress | Finished | Failed | Stopped


@dataclass
class RunNodes:
    """The nodes of one run, all under one subject-hierarchy folder."""

    folder: int
    input: object
    analysis: Analysis
    outputs: frozenset[str]
    segmentations: dict[str, object] = field(default_factory=dict)
    attention: object | None = None
    pca: object | None = None
    similarity: object | None = None
    table: object | None = None

    @property
    def prediction_lines(self) -> list[str]:
        """The prediction panel: one line per head, then the model's intended use."""
        lines = [prediction_text(name, p) for name, p in self.analysis.predictions.items()]
        return [*lines, f"Model '{self.analysis.card.name}': {self.analysis.card.intended_use}"]

    @property
    def alert(self) -> str | None:
        """The out-of-distribution warning, shown in red above the predictions, if the scan is flagged."""
        ood = self.analysis.ood
        return ood_warning(self.analysis.card.name, ood) if ood and ood["out_of_distribution"] else None


class InferenceSession:
    """Runs BrainDINO on volume nodes of one scene, one run at a time.

    Use `start` then `poll` from a GUI timer (or `run` to block); `cancel` stops a run. The latest
    run's tokens answer `query` (a world RAS point) and the observed point list / crosshair.
    """

    def __init__(self):
        self._worker: threading.Thread | None = None
        self._events: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._pending: tuple | None = None
        self.latest: RunNodes | None = None
        self.on_query_message: Callable[[str], None] = logger.info
        self._query_patch: tuple[int, int, int] | None = None
        self._observations: list[tuple[object, int]] = []

    @property
    def running(self) -> bool:
        return self._worker is not None

    def start(self, input_node, options: RunOptions = RunOptions(), others: dict | None = None) -> None:
        """Check the inputs and the bundle here (errors are immediate), then encode in a worker thread.

        Args:
            others: the subject's other scans, sequence -> volume node, for heads that read several sequences.

        Raises:
            BrainDINOError: a run is in progress, or bad input volume, bundle or sequence.
        """
        if self.running:
            raise BrainDINOError("a run is in progress: cancel it or wait for it to finish")
        volume = mrml.volume_from_node(input_node)
        other_volumes = {name: mrml.volume_from_node(node) for name, node in (others or {}).items()}
        bundle = load_bundle(find_bundle(options.bundle, options.models_dir))
        resolve_device(options.device)
        check_sequences(bundle.head_specs, options.sequence, other_volumes)
        inference = InferenceOptions(device=options.device, sequence=options.sequence)
        self._cancel.clear()
        self._events = queue.Queue()
        self._pending = (input_node, options)

        def work():
            try:
                self._events.put(Progress(f"loading {bundle.card.name}", 0, 0))
                analysis = analyse(
                    volume,
                    bundle,
                    inference,
                    others=other_volumes,
                    progress=lambda done, total: self._events.put(Progress("encoding slices", done, total)),
                    cancel=self._cancel.is_set,
                )
                self._events.put(analysis)
            except Cancelled:
                self._events.put(Stopped())
            except BrainDINOError as error:
                self._events.put(Failed(str(error)))
            except Exception as error:  # a worker must always report back to the GUI
                logger.exception("BrainDINO run failed")
                self._events.put(Failed(f"unexpected error: {error!r} (details in the log)"))

        self._worker = threading.Thread(target=work, name="BrainDINO inference", daemon=True)
        self._worker.start()

    def cancel(self) -> None:
        """Ask the worker to stop at its next batch; `poll` then reports `Stopped`."""
        self._cancel.set()

    def poll(self) -> list[Event]:
        """Events since the last call. Call from the thread that owns the scene: a finished analysis is
        turned into nodes here."""
        events = []
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return events
            if isinstance(item, Analysis):
                events.append(self._finish(item))
            else:
                events.append(item)
            if not isinstance(item, Progress):
                self._worker.join()
                self._worker = None

    def _finish(self, analysis: Analysis) -> Finished | Failed | Stopped:
        input_node, options = self._pending
        if self._cancel.is_set():
            return Stopped()
        try:
            run = add_run_nodes(input_node, analysis, options.outputs)
        except Exception as error:
            logger.exception("BrainDINO could not add its outputs to the scene")
            return Failed(f"could not add the outputs to the scene: {error!r}")
        self.latest, self._query_patch = run, None
        return Finished(run)

    def run(
        self, input_node, options: RunOptions = RunOptions(), others: dict | None = None, timeout: float | None = None
    ) -> RunNodes:
        """`start`, wait, and return the nodes (for scripts and self-tests).

        Raises:
            BrainDINOError: bad input, a failed run, or a cancelled one.
        """
        self.start(input_node, options, others)
        self._worker.join(timeout)
        if self._worker.is_alive():
            self.cancel()
            self._worker.join()
            self.poll()
            raise BrainDINOError(f"the run did not finish within {timeout} s and was cancelled")
        outcome = [event for event in self.poll() if not isinstance(event, Progress)][-1]
        if isinstance(outcome, Finished):
            return outcome.run
        raise BrainDINOError(outcome.message if isinstance(outcome, Failed) else "the run was cancelled")

    def query(self, ras: tuple[float, float, float]):
        """Show, in the latest run's similarity volume, how alike every patch is to the patch at a world RAS
        point (cached tokens, no encoder pass); returns the node, created on the first query. A point in
        the same patch as the previous query changes nothing.

        Raises:
            BrainDINOError: no run kept its tokens, or the point is outside the analysed slices.
        """
        run = self.latest
        if run is None or run.input.GetScene() is None or "similarity" not in run.outputs:
            raise BrainDINOError("run BrainDINO with the similarity output first: the map comes from its tokens")
        analysis = run.analysis
        patch = analysis.query_patch(mrml.ras_to_ijk(run.input, ras))
        shown = run.similarity is not None and run.similarity.GetScene() is not None  # the user may delete it
        if shown and patch == self._query_patch:
            return run.similarity
        similarity = analysis.volume.to_source(analysis.similarity(patch))
        if shown:
            mrml.set_voxels(run.similarity, similarity)
        else:
            run.similarity = mrml.add_volume_like(
                run.input, similarity, f"{run.input.GetName()} BrainDINO similarity", colors=mrml.SIMILARITY_COLORS
            )
            mrml.place_in_folder(run.similarity, run.folder)
        analysed = similarity[similarity != 0]  # slices outside the analysed slab are 0
        low = float(np.percentile(analysed[:: max(1, analysed.size // 100_000)], SIMILARITY_SHOWN))
        mrml.show_range(run.similarity, low, 1.0)
        self._query_patch = patch
        return run.similarity

    def observe(self, node) -> None:
        """Answer queries from a point list (the point placed or moved) or a crosshair node (Shift+move
        in a slice view); messages (what was queried, or why not) go to ``on_query_message``."""
        self._observations += [(node, tag) for tag in mrml.observe_points(node, self._query_quietly)]

    def stop_observing(self) -> None:
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations.clear()

    def _query_quietly(self, ras) -> None:
        if self.latest is None:
            return
        try:
            self.query(tuple(ras))
            self.on_query_message(f"similarity to the patch at R {ras[0]:.1f}, A {ras[1]:.1f}, S {ras[2]:.1f}")
        except BrainDINOError as error:
            self.on_query_message(str(error))


def attention_window(analysis: Analysis) -> tuple[float, float]:
    """Display range of the attention map: from the typical level bounding the patches that hold 60 % of a
    slice's attention (the report's outlines; below it the overlay is transparent) to the 99.5th percentile."""
    low = float(np.median(list(analysis.attention_threshold.values())))
    inside = analysis.attention[analysis.attention > 0]
    return low, max(float(np.percentile(inside, 99.5)), low * 1.01)


def add_run_nodes(input_node, analysis: Analysis, outputs=OUTPUTS) -> RunNodes:
    """Add a run's outputs to the input's scene under one folder; on any error nothing stays behind."""
    folder = mrml.add_folder(input_node, f"BrainDINO {input_node.GetName()} ({analysis.card.name})")
    run = RunNodes(folder=folder, input=input_node, analysis=analysis, outputs=frozenset(outputs))
    volume, name, made = analysis.volume, input_node.GetName(), []
    try:
        if "segmentation" in outputs:
            brain = None if analysis.brain is None else volume.to_source(analysis.brain)
            segmentations = dict(analysis.segmentations)
            if brain is not None and not segmentations:  # the brain alone gets a segmentation of its own
                segmentations[analysis.brain_head] = np.zeros(analysis.brain.shape, np.int16)
            for head, labels in segmentations.items():
                spec = analysis.segmentation_heads.get(head)
                classes, values = (spec.classes, spec.label_values) if spec else ((), ())
                node = mrml.add_segmentation(
                    input_node, volume.to_source(labels), classes, values, f"{name} BrainDINO {head}", brain
                )
                brain = None  # one "Brain" segment, in the run's first segmentation
                run.segmentations[head] = node
                made.append(node)
        if "attention" in outputs:
            run.attention = mrml.add_volume_like(
                input_node, volume.to_source(analysis.attention), f"{name} BrainDINO attention",
                colors=mrml.ATTENTION_COLORS,
            )  # fmt: skip
            low, high = attention_window(analysis)
            mrml.show_range(run.attention, low, high)
            made.append(run.attention)
        if "pca" in outputs:
            run.pca = mrml.add_volume_like(input_node, volume.to_source(analysis.pca), f"{name} BrainDINO PCA")
            made.append(run.pca)
        if "predictions" in outputs and analysis.predictions:
            rows = [prediction_row(head, p) for head, p in analysis.predictions.items()]
            run.table = mrml.add_table(
                input_node.GetScene(), f"{name} BrainDINO predictions", {k: [r[k] for r in rows] for k in rows[0]}
            )
            made.append(run.table)
        for node in made:
            mrml.place_in_folder(node, folder)
    except Exception:
        mrml.remove_folder(input_node.GetScene(), folder)
        for node in made:
            if node.GetScene() is not None:
                node.GetScene().RemoveNode(node)
        raise
    return run
