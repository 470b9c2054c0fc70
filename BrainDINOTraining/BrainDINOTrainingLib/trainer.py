"""The pretraining loop: optimizer, schedules, precision, checkpoints and logs around an objective.

The objective (`objectives.dino.DINOObjective`) returns loss terms and owns its EMA teacher and
centering; this loop owns everything else (the dinov2 split):

- AdamW with per-step cosine schedules (learning rate with linear warm-up, weight decay, teacher
  momentum) and a teacher-temperature warm-up, all precomputed and indexed by step;
- parameter groups: no weight decay on biases, norms, LayerScale, tokens; layer-wise learning-rate
  decay; patch embedding at a reduced rate; the prototype layer frozen during the first epoch;
- gradient clipping; bf16 autocast on GPU;
- atomic checkpoints every N steps with model, optimizer, step, RNG states and resolved config,
  so ``resume`` continues exactly where the run stopped (data order included);
- a non-finite loss stops the run with a clear message, leaving the last good checkpoint intact;
- CSV and TensorBoard logs of every loss term, lr, wd, momentum, teacher temperature and collapse
  monitors.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from BrainDINOLib.bundle import ModelCard, save_bundle
from BrainDINOLib.encoder import encoder_config
from BrainDINOLib.engine import autocast_dtype, resolve_device
from BrainDINOLib.errors import BrainDINOError

from .augment import MultiCropConfig, multi_crop
from .monitor import ProbeSet
from .objectives.centering import is_distributed
from .objectives.dino import DINOConfig, DINOObjective, encode_tokens
from .objectives.masking import batch_masks
from .slice_index import SliceDataset

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """A pretraining run (saved with every checkpoint and in the exported model card)."""

    data: str = ""
    out_dir: str = "runs/pretrain"
    encoder: str = "vit-tiny16-dinov3"
    epochs: int = 2
    steps_per_epoch: int = 0  # 0: one pass over the index per epoch
    batch_size: int = 16
    base_lr: float = 4e-3  # at batch 1024, scaled by sqrt(batch / 1024)
    min_lr: float = 1e-6
    warmup_epochs: float = 0.5
    weight_decay: tuple[float, float] = (0.04, 0.4)
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    teacher_momentum: tuple[float, float] = (0.992, 1.0)
    teacher_temperature: tuple[float, float] = (0.04, 0.07)
    teacher_temperature_warmup_epochs: float = 1.0
    freeze_last_layer_epochs: float = 1.0
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    checkpoint_every: int = 50
    workers: int = 2  # data-loading processes (0: read in the training process)
    probe: str = ""  # labelled dataset for online kNN accuracy at every checkpoint (optional)
    probe_label: str = ""
    seed: int = 0
    device: str = "auto"
    dino: DINOConfig = field(default_factory=DINOConfig)
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        values = dict(values)
        try:
            nested = {"dino": DINOConfig, "crops": MultiCropConfig}
            for key, kind in nested.items():
                if key in values:
                    values[key] = kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values[key].items()})
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        except TypeError as error:
            raise BrainDINOError(f"invalid training configuration: {error}") from error


CONFIG_DIR = Path(__file__).parent / "configs"


def load_config(name: str, overrides: dict | None = None, assignments: list[str] = ()) -> TrainConfig:
    """A shipped config (``tiny-cpu``, ``vit-s16``, ``vit-b16-braindino``) or a YAML file, then overrides.

    Args:
        overrides: field -> value (e.g. data, out_dir from the command line).
        assignments: ``key=value`` strings with dotted keys for nested fields (``dino.prototypes=512``);
            values are parsed as YAML.
    """
    import yaml

    path = CONFIG_DIR / f"{name}.yaml" if (CONFIG_DIR / f"{name}.yaml").is_file() else Path(name)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise BrainDINOError(f"no training config '{name}' (shipped: {shipped}; or a YAML file)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise BrainDINOError(f"{path}: not valid YAML ({error})") from error
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise BrainDINOError(f"--set expects key=value, got '{assignment}'")
        *parents, leaf = key.strip().split(".")
        target = values
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(text)
    return TrainConfig.from_dict(values)


def cosine(start: float, end: float, steps: int, warmup: int = 0) -> np.ndarray:
    """Per-step values: linear warm-up from 0 to ``start``, then cosine to ``end``."""
    ramp = np.linspace(0.0, start, warmup, endpoint=False)
    t = np.arange(steps - warmup) / max(steps - warmup, 1)
    return np.concatenate([ramp, end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))])


@dataclass(frozen=True)
class Schedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temperature: np.ndarray

    @classmethod
    def build(cls, config: TrainConfig, steps_per_epoch: int) -> Schedules:
        total = config.epochs * steps_per_epoch
        lr = config.base_lr * math.sqrt(config.batch_size / 1024)
        temperature_warmup = int(config.teacher_temperature_warmup_epochs * steps_per_epoch)
        temperature = np.concatenate(
            [
                np.linspace(*config.teacher_temperature, temperature_warmup),
                np.full(max(total - temperature_warmup, 0), config.teacher_temperature[1]),
            ]
        )[:total]
        return cls(
            lr=cosine(lr, config.min_lr, total, int(config.warmup_epochs * steps_per_epoch)),
            weight_decay=cosine(*config.weight_decay, total),
            momentum=cosine(*config.teacher_momentum, total),
            teacher_temperature=temperature,
        )


def parameter_groups(objective: DINOObjective, config: TrainConfig) -> list[dict]:
    """AdamW groups: decay or not, layer-wise lr scale (blocks.i), patch embedding at a reduced rate."""
    depth = objective.encoder_config.depth
    groups: dict[tuple[bool, float], list] = {}
    named = [(f"backbone.{n}", p) for n, p in objective.student["backbone"].named_parameters()]
    named += [(f"head.{n}", p) for n, p in objective.student["head"].named_parameters()]
    named += [("mask_token", objective.mask_token)]
    for name, parameter in named:
        if not parameter.requires_grad:
            continue
        no_decay = parameter.ndim == 1 or name.endswith(".bias") or "token" in name or "gamma" in name
        match = re.search(r"blocks\.(\d+)\.", name)
        layer = int(match.group(1)) + 1 if match else (0 if name.startswith("backbone.") else depth + 1)
        scale = config.layer_decay ** (depth + 1 - layer)
        if "patch_embed" in name:
            scale *= config.patch_embed_lr_mult
        groups.setdefault((no_decay, scale), []).append(parameter)
    return [{"params": p, "lr_scale": s, "apply_wd": not nd} for (nd, s), p in sorted(groups.items())]


def epoch_order(length: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of an epoch, a pure function of (seed, epoch): resuming needs only the step."""
    return np.random.default_rng([seed, epoch]).permutation(length)


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when started by ``torchrun``.

    One process without ``torchrun`` is rank 0 of 1 and needs no process group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world > 1 and not is_distributed():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return (dist.get_rank() if is_distributed() else 0), world, device


class Trainer:
    """Runs, checkpoints and resumes one pretraining run in ``config.out_dir``.

    Under ``torchrun`` every process takes its share of each global batch (``batch_size`` is the
    global batch), gradients are averaged by DDP, centering statistics are reduced across ranks,
    and rank 0 writes checkpoints, logs and the exported bundle. KoLeo is computed within each
    rank's share, as in DINOv2.
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.rank, self.world, self.device = init_distributed(config.device)
        if config.batch_size % self.world:
            raise BrainDINOError(f"batch_size {config.batch_size} is not divisible by {self.world} processes")
        self.local_batch = config.batch_size // self.world
        self.dataset = SliceDataset(config.data)
        spec = self.dataset.spec
        if len(self.dataset) < config.batch_size:
            raise BrainDINOError(
                f"{config.data}: {len(self.dataset)} slices, fewer than one batch of {config.batch_size}"
            )
        self.steps_per_epoch = config.steps_per_epoch or len(self.dataset) // config.batch_size
        self.total_steps = config.epochs * self.steps_per_epoch
        self.schedules = Schedules.build(config, self.steps_per_epoch)
        torch.manual_seed(config.seed)
        self.objective = DINOObjective(encoder_config(config.encoder), config.dino, spec.image_size, spec.in_chans)
        self.objective.to(self.device)
        self.model = (  # the mask token sits out steps without masked patches, hence find_unused_parameters
            DistributedDataParallel(self.objective, broadcast_buffers=False, find_unused_parameters=True)
            if self.world > 1
            else self.objective
        )
        self.optimizer = torch.optim.AdamW(parameter_groups(self.objective, config), betas=(0.9, 0.999))
        self.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.rank)  # own augmentations
        self.step = 0
        self.grid = encoder_config(config.encoder).patch_grid(config.crops.global_size)
        self.probe = None
        if config.probe:
            if not config.probe_label:
                raise BrainDINOError("a probe set needs probe_label (the label column to classify)")
            self.probe = ProbeSet.load(config.probe, config.probe_label, spec)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write atomically: the file is either the previous complete checkpoint or the new one."""
        generators = [self.generator.get_state()]
        if is_distributed():
            generators = [None] * self.world
            dist.all_gather_object(generators, self.generator.get_state())
        path = self.out_dir / CHECKPOINT
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            state = {
                "objective": self.objective.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "generators": generators,
                "torch_rng": torch.get_rng_state(),
                "config": json.dumps(self.config.to_dict()),
            }
            tmp = path.with_name(path.name + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)
        if is_distributed():
            dist.barrier()
        return path

    def load_checkpoint(self) -> None:
        path = self.out_dir / CHECKPOINT
        if not path.is_file():
            raise BrainDINOError(f"{path}: no checkpoint to resume from")
        state = torch.load(path, map_location=self.device, weights_only=True)
        if json.loads(state["config"]) != json.loads(json.dumps(self.config.to_dict())):
            raise BrainDINOError(f"{path}: written with another configuration; resume with the same settings")
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        if len(state["generators"]) != self.world:
            raise BrainDINOError(f"{path}: written by {len(state['generators'])} processes; resume with as many")
        self.step = int(state["step"])
        self.generator.set_state(state["generators"][self.rank])
        torch.set_rng_state(state["torch_rng"])

    # -- one step ------------------------------------------------------------------------------
    def step_indices(self, step: int) -> list[int]:
        """Dataset indices of this rank's share of the global batch of ``step`` (a pure function of it)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.dataset), self.config.seed, epoch)
        start = position * self.config.batch_size + self.rank * self.local_batch
        return order[np.arange(start, start + self.local_batch) % len(order)].tolist()

    def loader(self, start: int, stop: int) -> DataLoader:
        """Batches of steps ``start`` to ``stop - 1``, read by ``config.workers`` processes in step order."""
        return DataLoader(
            self.dataset,
            batch_sampler=[self.step_indices(s) for s in range(start, stop)],
            num_workers=self.config.workers,
            pin_memory=self.device.type == "cuda",
        )

    def train_step(self, images: torch.Tensor) -> dict:
        """One optimisation step on (local batch, C, H, W) slices."""
        config, step = self.config, self.step
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.schedules.lr[step]) * group["lr_scale"]  # plain floats: checkpoints stay loadable
            group["weight_decay"] = float(self.schedules.weight_decay[step]) if group["apply_wd"] else 0.0
        global_crops, local_crops = multi_crop(images.to(self.device, non_blocking=True), config.crops, self.generator)
        masks = batch_masks(
            2 * self.local_batch, self.grid, self.generator, config.mask_probability, config.mask_ratio
        ).to(self.device)
        dtype = autocast_dtype(self.device)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            output = self.model(global_crops, local_crops, masks, float(self.schedules.teacher_temperature[step]))
        loss = output.losses["loss"]
        if not torch.isfinite(loss):
            raise BrainDINOError(
                f"step {step}: the loss is {loss.item()} (not finite); stopped. The last good checkpoint "
                f"{self.out_dir / CHECKPOINT} is intact: lower the learning rate or use fp32, then resume"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step < config.freeze_last_layer_epochs * self.steps_per_epoch:
            for parameter in self.objective.student["head"].last_layer.parameters():
                parameter.grad = None
        if config.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.objective.student.parameters(), config.clip_grad)
        self.optimizer.step()
        self.objective.update_teacher(float(self.schedules.momentum[step]))
        self.objective.update_centers(output)
        self.step += 1
        names = list(output.losses) + list(output.metrics)
        values = torch.tensor(
            [float(v.detach()) for v in output.losses.values()] + list(output.metrics.values()), dtype=torch.float64
        )
        if is_distributed():  # log the mean over ranks
            dist.all_reduce(values)
            values /= self.world
        return {
            "step": self.step,
            **{k: round(float(v), 6) for k, v in zip(names, values, strict=True)},
            "lr": float(self.schedules.lr[step]),
            "wd": float(self.schedules.weight_decay[step]),
            "momentum": float(self.schedules.momentum[step]),
            "teacher_temperature": float(self.schedules.teacher_temperature[step]),
        }

    # -- the run -------------------------------------------------------------------------------
    def fit(self, resume: bool = False, max_steps: int | None = None, progress=None) -> list[dict]:
        """Train to the end (or ``max_steps`` more steps); returns the logged rows of this call."""
        log_path = self.out_dir / "log.csv"
        if resume:
            self.load_checkpoint()
            if self.rank == 0 and log_path.is_file():  # drop rows a killed run logged after its last checkpoint
                lines = log_path.read_text().splitlines(keepends=True)
                log_path.write_text("".join(lines[: 1 + self.step]))
        elif (self.out_dir / CHECKPOINT).exists():
            raise BrainDINOError(f"{self.out_dir}: holds a run already; pass --resume or choose another folder")
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")
        stop = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        rows = []
        board = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            board = SummaryWriter(str(self.out_dir / "tensorboard"))
        for images in self.loader(self.step, stop):
            row = self.train_step(images)
            checkpoint_now = self.step % self.config.checkpoint_every == 0 or self.step == stop
            if self.probe is not None:  # a fixed column, filled at checkpoints (rank 0 only)
                row["knn_accuracy"] = self._probe_accuracy() if checkpoint_now and self.rank == 0 else ""
            rows.append(row)
            if board is not None:
                new = not log_path.exists()
                with open(log_path, "a", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=list(row))
                    if new:
                        writer.writeheader()
                    writer.writerow(row)
                for name, value in row.items():
                    if name != "step" and value != "":
                        board.add_scalar(name, value, self.step)
            if checkpoint_now:
                self.save_checkpoint()
            if progress and self.rank == 0:
                progress(self.step, self.total_steps)
        if board is not None:
            board.close()
        return rows

    def _probe_accuracy(self) -> float:
        teacher = self.objective.teacher["backbone"]
        return self.probe.accuracy(lambda x: encode_tokens(teacher, x)[0], self.dataset.spec.in_chans, self.device)

    def export(self, directory: str | Path) -> Path:
        """The teacher backbone as a model bundle with a card describing this run."""
        last = {}
        log_path = self.out_dir / "log.csv"
        if log_path.is_file():
            with open(log_path) as handle:
                rows = list(csv.DictReader(handle))
                last = rows[-1] if rows else {}
        card = ModelCard(
            name=Path(directory).name,
            description=f"{self.config.encoder} pretrained with DINO + iBOT + KoLeo on {self.config.data}",
            encoder=encoder_config(self.config.encoder),
            preprocessing=self.dataset.spec,
            random_init=False,
            intended_use="research on brain MRI features; not a medical device, not for clinical decisions",
            training={"data": self.config.data, "steps": self.step, "config": self.config.to_dict()},
            metrics={k: float(v) for k, v in last.items() if k != "step" and v != ""},
        )
        return save_bundle(directory, self.objective.teacher_encoder(), card, overwrite=True).path
