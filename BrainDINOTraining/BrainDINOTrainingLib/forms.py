"""The Training module's forms as command lines: what a filled form runs is exactly what a user could type.

A form becomes argument lists for ``python -m BrainDINOTrainingLib`` (`background.BackgroundJob`
runs them); checking happens here so that a bad form fails before a process starts. Standard library
only: the module imports this before PyTorch and friends are installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from BrainDINOLib.errors import BrainDINOError

OBJECTIVES = ("dino", "moco", "mae", "jepa", "anatcl")
MODEL_SIZES = ("tiny-cpu", "vit-s16", "vit-b16-braindino")
TASKS = ("seg", "brain", "cls", "reg", "surv", "seq")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # `BrainDINOLib.engine.PRECISIONS`, without importing torch (tested)


def _given(path: str | Path | None) -> bool:
    """False for an empty path field."""
    return path is not None and str(path).strip() != ""


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise BrainDINOError(f"'{value}' is not a {what} ({', '.join(choices)})")


def parse_fractions(text: str) -> tuple[float, ...]:
    """Label fractions typed as ``0.01 0.1 1`` (empty: all labels).

    Raises:
        BrainDINOError: not a list of numbers.
    """
    try:
        return tuple(float(f) for f in text.replace(",", " ").split()) or (1.0,)
    except ValueError as error:
        raise BrainDINOError(f"label fractions: '{text}' is not a list of numbers such as 0.01 0.1 1") from error


@dataclass(frozen=True)
class PretrainForm:
    """Pretraining on a data folder (or manifest, BIDS, BraTS) or on a slice index built before.

    The run lives in ``out_dir``: ``index/`` (built first when ``data`` is not an index) and ``run/``
    (checkpoints, logs, and ``run/bundle`` at the end). ``epochs``/``steps_per_epoch`` of 0 keep the config's.
    """

    data: str | Path | None
    out_dir: str | Path | None
    objective: str = "dino"
    model_size: str = "tiny-cpu"
    epochs: int = 0
    steps_per_epoch: int = 0
    device: str = "auto"
    precision: str = "auto"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / "run"

    def commands(self, resume: bool = False) -> list[list[str]]:
        """``index`` (unless ``data`` is an index) then ``pretrain``; ``resume`` continues both where they stopped.

        Raises:
            BrainDINOError: missing data or output folder, an unknown choice, or a resume with nothing to resume.
        """
        if not _given(self.data):
            raise BrainDINOError("choose the data: a folder of volumes, a manifest, BIDS or BraTS, or an index")
        if not _given(self.out_dir):
            raise BrainDINOError("choose an output folder")
        data, out_dir = Path(self.data), Path(self.out_dir)
        if not data.exists():
            raise BrainDINOError(f"{data}: no such data folder or manifest")
        _check_choice(self.objective, OBJECTIVES, "pretraining objective")
        _check_choice(self.model_size, MODEL_SIZES, "model size")
        _check_choice(self.device, DEVICES, "device")
        _check_choice(self.precision, PRECISIONS, "precision")
        if resume and not (self.run_dir / "checkpoint.pt").is_file():
            raise BrainDINOError(f"{self.run_dir}: no checkpoint to resume from; start the run instead")
        is_index = (data / "index.json").is_file()
        index = data if is_index else out_dir / "index"
        commands = [] if is_index else [["index", str(data), "-o", str(index)]]
        pretrain = ["pretrain", "--config", self.model_size, "--objective", self.objective, "--data", str(index)]
        pretrain += ["-o", str(self.run_dir), "--device", self.device, "--precision", self.precision]
        for key, value in (("epochs", self.epochs), ("steps_per_epoch", self.steps_per_epoch)):
            if value:
                pretrain += ["--set", f"{key}={value}"]
        return [*commands, pretrain + (["--resume"] if resume else [])]


@dataclass(frozen=True)
class FitHeadForm:
    """Fitting one head on a manifest with a bundle's frozen encoder; the head goes into a copy of the
    bundle at ``out_bundle`` and the metrics table into ``out_bundle``'s sibling ``<name>-report``.

    ``target`` names the label column (cls, reg, surv); ``sequences`` the sequences read, space-separated
    ("any" for a segmentation head that reads any contrast; empty: the command's default); ``iterations`` of 0
    keep the default (volume heads: epochs; seg: decoder steps); ``image_channels`` > 0 makes a segmentation or
    brain decoder read the pixels too, ``thumbnails`` a volume head each slice's thumbnail.
    """

    manifest: str | Path | None
    task: str
    out_bundle: str | Path | None
    target: str = ""
    bundle: str = ""
    label_fractions: tuple[float, ...] = (1.0,)
    sequences: str = ""
    iterations: int = 0
    image_channels: int = 0
    thumbnails: bool = False
    device: str = "auto"

    def commands(self) -> list[list[str]]:
        """Raises:
        BrainDINOError: missing manifest, an existing output bundle, a missing target, or an unknown choice.
        """
        if not _given(self.manifest):
            raise BrainDINOError("choose the manifest: subjects with their scans and labels")
        if not _given(self.out_bundle):
            raise BrainDINOError("choose a folder for the new bundle")
        manifest, out_bundle = Path(self.manifest), Path(self.out_bundle)
        if not manifest.exists():
            raise BrainDINOError(f"{manifest}: no such manifest or data folder")
        if out_bundle.exists():
            raise BrainDINOError(f"{out_bundle}: already exists (choose another folder)")
        _check_choice(self.task, TASKS, "task")
        _check_choice(self.device, DEVICES, "device")
        if self.task == "cls" and not self.target:
            raise BrainDINOError("a classification head needs a target: the manifest column holding its labels")
        decoder = self.task in ("seg", "brain")
        if self.image_channels and not decoder:
            raise BrainDINOError("pixel channels are for segmentation and brain heads; set them to 0 for this task")
        if self.thumbnails and decoder:
            raise BrainDINOError("thumbnails are for volume heads; segmentation and brain heads read pixel channels")
        if not all(0 < f <= 1 for f in self.label_fractions):
            raise BrainDINOError("label fractions lie in (0, 1], e.g. 0.01 0.1 1")
        command = ["fit-head", "--task", self.task, "--manifest", str(manifest), "-o", str(out_bundle)]
        command += ["--target", self.target] if self.target else []
        command += ["--bundle", self.bundle] if self.bundle else []
        command += ["--sequence", *self.sequences.replace(",", " ").split()] if self.sequences.strip() else []
        command += ["--label-fraction", *(f"{f:g}" for f in self.label_fractions)]
        if self.iterations:
            command += ["--steps" if decoder else "--epochs", str(self.iterations)]
        command += ["--image-channels", str(self.image_channels)] if self.image_channels else []
        command += ["--thumbnails"] if self.thumbnails else []
        report = out_bundle.parent / f"{out_bundle.name}-report"
        return [command + ["--report", str(report), "--device", self.device]]
