"""What the BrainDINO Slicer module does, without its widgets: ``infer`` on a volume node in a background
process, the run's files turned into scene nodes, and similarity queries and exploration from the saved tokens;
and ``infer`` on a folder of scans (a cohort) in the same background process, its summary as a table node and
any scan's outputs loaded from it.

Nothing here imports torch. The input (and the subject's other scans) are written as NIfTI into a run
folder; a child ``python -m BrainDINOLib --progress-lines infer ... --keep-blocks all`` (Slicer's
``PythonSlicer``) writes its outputs beside them; `InferenceSession.poll`, called from a GUI timer, makes at
most one node per call from those files, so no step holds the GUI long. A cancelled or failed run leaves the
scene as it was and its folder is deleted. Queries, the attention head and the block whose tokens feed the
PCA and similarity maps are answered from the saved tokens (`featuremaps.TokenMaps`), without the encoder.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from . import mrml
from .background import BackgroundJob, JobEnded, LogLine
from .errors import BrainDINOError
from .featuremaps import TOKENS_FILE, TokenMaps, query_patch
from .predictions import ood_warning, prediction_row, prediction_text, summary_table
from .progress import Progress
from .volume import Volume

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
        outputs: which of `OUTPUTS` to create; ``similarity`` answers point queries.
        models_dir: where user bundles live (None: the command line's default, ``~/.braindino/models``).
        image_size: canvas side in pixels for the maps and heads (None: the bundle's; ``infer --image-size``).
    """

    bundle: str | None = None
    device: str = "auto"
    sequence: str | None = None
    outputs: frozenset[str] = frozenset(OUTPUTS)
    models_dir: Path | None = None
    image_size: int | None = None

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


@dataclass(frozen=True)
class CohortDone:
    """A cohort run ended (done, with failed scans, or cancelled after some scans).

    Attributes:
        out_dir: its output folder (``summary.csv``, a folder per scan).
        table: the summary as a table node.
        rows: the summary's rows (``summary.json``).
    """

    out_dir: Path
    table: object
    rows: list[dict]
    cancelled: bool = False


Event = Progress | Finished | Failed | Stopped | CohortDone


@dataclass
class RunNodes:
    """The nodes of one run, all under one subject-hierarchy folder, and what they were made from.

    Attributes:
        result: the run's ``result.json``.
        volume: the input as the run saw it (canonical; maps query points onto its voxels).
        out_dir: the folder of the run's files (``result.json``, the maps, the saved tokens).
        temporary: the folder made for the run, deleted once it is no longer the latest (None: the files are
            the user's, e.g. a cohort's outputs, and stay).
        maps: the saved tokens of the block in use (`block`).
        head: the attention head shown (None: the mean of all heads).
        block: the block whose tokens feed PCA and similarity (None: the last).
    """

    folder: int
    input: object
    result: dict
    volume: Volume
    out_dir: Path
    temporary: Path | None
    maps: TokenMaps
    outputs: frozenset[str]
    segmentations: dict[str, object] = field(default_factory=dict)
    attention: object | None = None
    pca: object | None = None
    similarity: object | None = None
    table: object | None = None
    head: int | None = None
    block: int | None = None

    @property
    def model(self) -> str:
        return self.result["model"]["name"]

    @property
    def prediction_lines(self) -> list[str]:
        """The prediction panel: one line per head, then the model's intended use."""
        lines = [prediction_text(name, p) for name, p in self.result["predictions"].items()]
        return [*lines, f"Model '{self.model}': {self.result['model']['intended_use']}"]

    @property
    def alert(self) -> str | None:
        """The out-of-distribution warning, shown in red above the predictions, if the scan is flagged."""
        return ood_warning(self.model, self.result) if self.result.get("out_of_distribution") else None

    def alive(self, node) -> bool:
        return node is not None and node.GetScene() is not None  # the user may delete a node


def attention_window(attention: np.ndarray, levels: np.ndarray) -> tuple[float, float]:
    """Display range of an attention map: from the typical level bounding the patches that hold 60 % of a
    slice's attention (the report's outlines; below it the overlay is transparent) to the 99.5th percentile."""
    low = float(np.median(levels))
    inside = attention[attention > 0]
    return low, max(float(np.percentile(inside, 99.5)) if inside.size else low, low * 1.01)


def node_steps(
    input_node, volume: Volume, out: Path, outputs=OUTPUTS, names=None, temporary: Path | None = None
) -> Iterator[None]:
    """Add a finished run's outputs (the files in ``out``) to the input's scene under one folder, one node per step
    (the generator's value, once exhausted, is the `RunNodes`). Closing the generator early, or an error, removes
    what it made.

    Args:
        names: file -> node name of the scans written for the run: what each head read is said by node name.
        temporary: the run's own folder, deleted when the run is dropped (`RunNodes.temporary`).
    """
    result = json.loads((out / "result.json").read_text())
    for prediction in result["predictions"].values():
        prediction["reads"] = {k: (names or {}).get(v, v) for k, v in prediction.get("reads", {}).items()}
    files, maps = result["outputs"], TokenMaps.load(out / TOKENS_FILE)
    scene, name = input_node.GetScene(), input_node.GetName()
    folder = mrml.add_folder(input_node, f"BrainDINO {name} ({result['model']['name']})")
    run = RunNodes(folder, input_node, result, volume, out, temporary, maps, frozenset(outputs))
    made = []

    def placed(node):
        mrml.place_in_folder(node, folder)
        made.append(node)
        return node

    try:
        yield
        if "segmentation" in outputs:
            brain = _voxels(out / files["brain_mask"]) > 0 if "brain_mask" in files else None
            heads = [key.split(":", 1)[1] for key in files if key.startswith("segmentation:")]
            if brain is not None and not heads:  # the brain alone gets a segmentation of its own
                heads = [result["brain_mask"]["head"]]
            for head in heads:
                key = f"segmentation:{head}"
                labels = _voxels(out / files[key]).astype(np.int16) if key in files else np.zeros(brain.shape, np.int16)
                classes = result["predictions"].get(head, {}).get("label_values", {})
                run.segmentations[head] = placed(mrml.add_segmentation(
                    input_node, labels, list(classes), list(classes.values()), f"{name} BrainDINO {head}", brain
                ))  # fmt: skip
                brain = None  # one "Brain" segment, in the run's first segmentation
                yield
        if "attention" in outputs:
            attention = run.maps.attention_map()
            run.attention = placed(mrml.add_volume_like(
                input_node, volume.to_source(attention), f"{name} BrainDINO attention", colors=mrml.ATTENTION_COLORS
            ))  # fmt: skip
            mrml.show_range(run.attention, *attention_window(attention, run.maps.attention_levels()))
            yield
        if "pca" in outputs:
            run.pca = placed(mrml.add_volume_like(input_node, _voxels(out / files["pca"]), f"{name} BrainDINO PCA"))
            yield
        if "predictions" in outputs and result["predictions"]:
            rows = [prediction_row(head, p) for head, p in result["predictions"].items()]
            columns = {k: [r[k] for r in rows] for k in rows[0]}
            run.table = placed(mrml.add_table(scene, f"{name} BrainDINO predictions", columns))
    except BaseException:  # an error, or the generator closed (a cancelled run): nothing stays behind
        mrml.remove_folder(scene, folder)
        for node in made:
            if node.GetScene() is not None:
                scene.RemoveNode(node)
        raise
    return run


def _voxels(path: Path) -> np.ndarray:
    """An output's voxels in the input's own (I, J, K) order; RGB24 as (I, J, K, 3) uint8."""
    data = np.asanyarray(nib.load(path).dataobj)
    if data.dtype.names:  # NIfTI RGB24
        return np.stack([data[channel] for channel in data.dtype.names], axis=-1)
    return data.astype(np.float32) if data.dtype.kind == "f" else data


def add_run_nodes(input_node, volume: Volume, out: Path, outputs=OUTPUTS, names=None) -> RunNodes:
    """All of `node_steps` at once (scripts, tests, a cohort's scan)."""
    steps = node_steps(input_node, volume, out, outputs, names)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class InferenceSession:
    """Runs BrainDINO on volume nodes of one scene, one run at a time, in a background process.

    Use `start` then `poll` from a GUI timer (or `run` to block); `cancel` stops a run. The latest run's
    saved tokens answer `query` (a world RAS point), the observed point list or crosshair, `show_head` and
    `use_block`.

    Args:
        python: the interpreter of the child (Slicer's ``PythonSlicer``; ``sys.executable`` elsewhere).
        python_path: folders holding ``BrainDINOLib`` for the child.
        env: the child's environment (inside Slicer: ``slicer.util.startupEnvironment()``).
        work_dir: where run folders are made (default: the system's temporary folder).
    """

    def __init__(
        self,
        *,
        python: str = sys.executable,
        python_path: Sequence[str | Path] = (),
        env: dict[str, str] | None = None,
        work_dir: str | Path | None = None,
    ):
        self.python, self.python_path, self.env, self.work_dir = python, tuple(python_path), env, work_dir
        self._job: BackgroundJob | None = None
        self._steps: Iterator[None] | None = None
        self._pending: tuple | None = None
        self._cohort: tuple | None = None
        self._errors: list[str] = []
        self._stopped = False
        self.latest: RunNodes | None = None
        self.on_query_message: Callable[[str], None] = logger.info
        self._query_patch: tuple[int, int, int] | None = None
        self._observations: list[tuple[object, int]] = []

    @property
    def running(self) -> bool:
        return self._job is not None or self._steps is not None

    @property
    def running_cohort(self) -> bool:
        return self._cohort is not None

    def start(self, input_node, options: RunOptions = RunOptions(), others: dict | None = None) -> None:
        """Write the scans into a new run folder and start ``infer`` on them in a child process.

        Args:
            others: the subject's other scans, sequence -> volume node, for heads that read several sequences.

        Raises:
            BrainDINOError: a run is in progress, or a bad input or other volume (the bundle, device and
                sequences are checked by the child, whose error arrives as `Failed`).
        """
        if self.running:
            raise BrainDINOError("a run is in progress: cancel it or wait for it to finish")
        volume = mrml.volume_from_node(input_node)
        other_volumes = {name: mrml.volume_from_node(node) for name, node in (others or {}).items()}
        run_dir = Path(tempfile.mkdtemp(prefix="braindino-run-", dir=self.work_dir))
        scan = _write(volume, run_dir / f"{_file_stem(input_node.GetName())}.nii")
        (run_dir / "others").mkdir()
        files = {name: _write(other, run_dir / "others" / f"{name}.nii") for name, other in other_volumes.items()}
        names = {str(files[n]): node.GetName() for n, node in (others or {}).items()}
        names[str(scan)] = input_node.GetName()
        command = ["infer", str(scan), "-o", str(run_dir / "out"), "--no-report", *_model_options(options)]
        if files:
            command += ["--also", *(f"{name}={path}" for name, path in files.items())]
        self._pending = (input_node, volume, options, run_dir, names)
        self._start(command)

    def start_cohort(self, scene, folder: str | Path, out_dir: str | Path, options: RunOptions = RunOptions()) -> None:
        """Start ``infer`` on every scan in a folder (image files, DICOM series, a BIDS/BraTS dataset, recursively),
        each scan's outputs in ``out_dir/<scan>/``; `poll` ends with `CohortDone`. A rerun skips finished scans.

        Raises:
            BrainDINOError: a run is in progress, or no such folder.
        """
        if self.running:
            raise BrainDINOError("a run is in progress: cancel it or wait for it to finish")
        if not Path(folder).is_dir():
            raise BrainDINOError(f"{folder}: no such folder")
        self._cohort = (scene, Path(out_dir), time.time())
        self._start(["infer", str(folder), "-o", str(out_dir), "--cohort", *_model_options(options)])

    def _start(self, command: list[str]) -> None:
        self._errors, self._stopped = [], False
        self._job = BackgroundJob(
            [command], module="BrainDINOLib", python=self.python, python_path=self.python_path, env=self.env
        ).start()

    def cancel(self) -> None:
        """Stop the run: the child process tree ends (or the nodes made so far go); `poll` then reports `Stopped`."""
        if self._job is not None:
            self._job.cancel()
        elif self._steps is not None:  # the child is done; undo the nodes made so far
            self._steps.close()
            self._steps = None
            self._end()
            self._stopped = True

    def poll(self) -> list[Event]:
        """Events since the last call; at most one node is made per call. Call from the thread that owns the scene."""
        if self._stopped:
            self._stopped = False
            return [Stopped()]
        if self._steps is not None:
            return self._step()
        events = []
        for event in self._job.poll() if self._job else []:
            if isinstance(event, Progress):
                events.append(event)
            elif isinstance(event, LogLine):
                logger.info(event.text)
                if "error:" in event.text or "Error" in event.text:
                    self._errors.append(event.text)
            elif isinstance(event, JobEnded) and self._cohort is not None:
                self._job = None
                events.append(self._cohort_ended(event))
            elif isinstance(event, JobEnded):
                self._job = None
                if event.cancelled:
                    self._end()
                    events.append(Stopped())
                elif event.code != 0:
                    self._end()
                    events.append(Failed(self._error_message(event)))
                else:
                    input_node, volume, options, run_dir, names = self._pending
                    self._steps = node_steps(input_node, volume, run_dir / "out", options.outputs, names, run_dir)
        return events

    def _error_message(self, ended: JobEnded) -> str:
        message = self._errors[-1].split("error:", 1)[-1].strip() if self._errors else ""
        return message or f"inference failed (exit code {ended.code}); see the log"

    def _cohort_ended(self, ended: JobEnded) -> Event:
        """This run's summary as a table node (exit code 1: some scans failed, they are rows too)."""
        scene, out_dir, started = self._cohort
        self._cohort = None
        summary = out_dir / "summary.json"
        written = summary.is_file() and summary.stat().st_mtime >= started  # not an earlier run's summary
        if (ended.code not in (0, 1) and not ended.cancelled) or not written:
            return Stopped() if ended.cancelled else Failed(self._error_message(ended))
        rows = json.loads(summary.read_text())["scans"]
        table = mrml.add_table(scene, f"BrainDINO {out_dir.name} summary", summary_table(rows))
        return CohortDone(out_dir, table, rows, ended.cancelled)

    def load_cohort_scan(self, scene, out_dir: str | Path, name: str, outputs=OUTPUTS) -> RunNodes:
        """Load one scan of a cohort run and its outputs into the scene; it becomes the latest run (queries,
        heads and blocks are answered from its saved tokens). Its files stay where they are.

        Raises:
            BrainDINOError: the scan has no finished outputs there, or its input file is gone.
        """
        from .volume import load_volume

        if self.running:
            raise BrainDINOError("a run is in progress: cancel it or wait for it to finish")
        folder = Path(out_dir) / name
        if not (folder / "result.json").is_file():
            raise BrainDINOError(f"{folder}: no finished outputs of scan {name} (it failed or was not run)")
        result = json.loads((folder / "result.json").read_text())
        chosen = result["options"]
        volume = load_volume(
            result["input"]["path"], volume_index=chosen["volume_index"], dicom_series=chosen["dicom_series"]
        )
        node = mrml.add_volume(scene, volume, name)
        try:
            run = add_run_nodes(node, volume, folder, outputs)
        except BaseException:
            scene.RemoveNode(node)
            raise
        self._finish(run)
        return run

    def _step(self) -> list[Event]:
        try:
            next(self._steps)
            return []
        except StopIteration as done:
            self._steps = None
            self._finish(done.value)
            return [Finished(done.value)]
        except Exception as error:
            logger.exception("BrainDINO could not add its outputs to the scene")
            self._steps = None
            self._end()
            return [Failed(f"could not add the outputs to the scene: {error!r}")]

    def _end(self) -> None:
        """Forget the pending run and delete its folder."""
        if self._pending:
            shutil.rmtree(self._pending[3], ignore_errors=True)
        self._pending = None

    def _finish(self, run: RunNodes) -> None:
        previous, self.latest, self._query_patch, self._pending = self.latest, run, None, None
        _drop(previous)

    def forget(self) -> None:
        """Cancel a run, drop the latest run's tokens and folder (its nodes stay) and every observer."""
        self.cancel()
        self._cohort = None  # its summary is not shown in a scene it was not started from
        self.stop_observing()
        _drop(self.latest)
        self.latest = None

    def run(
        self, input_node, options: RunOptions = RunOptions(), others: dict | None = None, timeout: float | None = None
    ) -> RunNodes:
        """`start`, poll until the run ends, and return its nodes (for scripts and self-tests).

        Raises:
            BrainDINOError: bad input, a failed run, a cancelled one, or one that outlasted ``timeout`` seconds
                (it is cancelled).
        """
        self.start(input_node, options, others)
        deadline = float("inf") if timeout is None else time.monotonic() + timeout
        late = False
        while True:
            for event in self.poll():
                if isinstance(event, Finished):
                    return event.run
                if isinstance(event, Failed):
                    raise BrainDINOError(event.message)
                if isinstance(event, Stopped):
                    raise BrainDINOError(f"the run did not finish within {timeout} s and was cancelled" if late
                                         else "the run was cancelled")  # fmt: skip
            if not late and time.monotonic() > deadline:
                late = True
                self.cancel()
            time.sleep(0.02)

    def _latest(self) -> RunNodes:
        run = self.latest
        if run is None or not run.alive(run.input):
            raise BrainDINOError("run BrainDINO first: the maps come from the tokens of a run")
        return run

    def query(self, ras: tuple[float, float, float]):
        """Show, in the latest run's similarity volume, how alike every patch is to the patch at a world RAS
        point (saved tokens of the block in use, no encoder); returns the node, created on the first query.
        A point in the same patch as the previous query changes nothing.

        Raises:
            BrainDINOError: no run with the similarity output, or the point is outside the analysed slices.
        """
        run = self._latest()
        if "similarity" not in run.outputs:
            raise BrainDINOError("run BrainDINO with the similarity output first: the map comes from its tokens")
        patch = query_patch(run.volume, run.maps.layout, run.maps.grid, mrml.ras_to_ijk(run.input, ras))
        if run.alive(run.similarity) and patch == self._query_patch:
            return run.similarity
        self._query_patch = patch
        return self._show_similarity(run)

    def _show_similarity(self, run: RunNodes):
        similarity = run.volume.to_source(run.maps.similarity(self._query_patch, run.block))
        if run.alive(run.similarity):
            mrml.set_voxels(run.similarity, similarity)
        else:
            run.similarity = mrml.add_volume_like(
                run.input, similarity, f"{run.input.GetName()} BrainDINO similarity", colors=mrml.SIMILARITY_COLORS
            )
            mrml.place_in_folder(run.similarity, run.folder)
        analysed = similarity[similarity != 0]  # slices outside the analysed slab are 0
        low = float(np.percentile(analysed[:: max(1, analysed.size // 100_000)], SIMILARITY_SHOWN))
        mrml.show_range(run.similarity, low, 1.0)
        return run.similarity

    def show_head(self, head: int | None) -> None:
        """Show one attention head's map (None: the mean of all heads) in the latest run's attention node.

        Raises:
            BrainDINOError: no run, or no such head.
        """
        run = self._latest()
        attention = run.maps.attention_map(head)
        run.head = head
        if run.alive(run.attention):
            mrml.set_voxels(run.attention, run.volume.to_source(attention))
            mrml.show_range(run.attention, *attention_window(attention, run.maps.attention_levels(head)))

    def use_block(self, block: int | None) -> None:
        """Make the PCA map and the similarity queries of the latest run from one block's tokens (None: the last).

        Raises:
            BrainDINOError: no run, or the block's tokens were not kept.
        """
        run = self._latest()
        run.maps = TokenMaps.load(run.out_dir / TOKENS_FILE, block)
        run.block = block
        if run.alive(run.pca):
            mrml.set_voxels(run.pca, run.volume.to_source(run.maps.pca(block)))
        if run.alive(run.similarity) and self._query_patch is not None:
            self._show_similarity(run)

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


def _model_options(options: RunOptions) -> list[str]:
    """``infer`` arguments of a run's model choices (every block's tokens kept, for exploring them later)."""
    command = ["--keep-blocks", "all", "--device", options.device]
    if options.bundle:
        command += ["--bundle", options.bundle]
    if options.models_dir:
        command += ["--models-dir", str(options.models_dir)]
    if options.sequence:
        command += ["--sequence", options.sequence]
    if options.image_size:
        command += ["--image-size", str(options.image_size)]
    return command


def _drop(run: RunNodes | None) -> None:
    """Delete a run's own folder (a cohort's outputs stay)."""
    if run is not None and run.temporary is not None:
        shutil.rmtree(run.temporary, ignore_errors=True)


def _file_stem(name: str) -> str:
    """A node name as a file name (the progress line and output names show it)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "input"


def _write(volume: Volume, path: Path) -> Path:
    """The volume as float32 NIfTI on its own voxel grid (the child's input; uncompressed, as the GUI thread
    writes it)."""
    nib.save(nib.Nifti1Image(volume.to_source(volume.data), volume.source_affine), path)
    return path
