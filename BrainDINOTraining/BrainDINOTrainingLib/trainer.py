"""The pretraining loop: optimizer, schedules, precision, checkpoints and logs around an objective.

The objective (``objective: dino | moco | mae | jepa | anatcl``, see `objectives.common.Objective`)
makes its views, returns loss terms and owns its EMA teacher, centers and heads; this loop owns
everything else (the dinov2 split):

- AdamW with per-step cosine schedules (learning rate with linear warm-up, weight decay, teacher
  momentum) and a teacher-temperature warm-up, all precomputed and indexed by step;
- parameter groups: no weight decay on biases, norms, LayerScale, tokens; layer-wise learning-rate
  decay; patch embedding at a reduced rate;
- gradient clipping; bf16 autocast on GPU;
- atomic checkpoints every N steps with model, optimizer, step, RNG states and resolved config,
  so ``resume`` continues exactly where the run stopped (data order included);
- a non-finite loss stops the run with a clear message, leaving the last good checkpoint intact;
- CSV and TensorBoard logs of every loss term, lr, wd, momentum, teacher temperature and collapse
  monitors, with a collapse verdict (`monitor.collapse_verdict`) at every checkpoint;
- a start from earlier weights (``init``: every ViT of the objective from a bundle or checkpoint, heads
  fresh) and, for DINO, the Gram teacher's weights and its periodic refresh (``gram``).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from BrainDINOLib.bundle import ModelCard, save_bundle
from BrainDINOLib.encoder import BrainEncoder, encoder_config
from BrainDINOLib.engine import PRECISIONS, autocast_dtype, precision_name, resolve_device, to_device
from BrainDINOLib.errors import BrainDINOError, from_fields, read_text
from BrainDINOLib.files import atomic_write
from BrainDINOLib.importers import read_checkpoint

from .augment import MultiCropConfig
from .monitor import ProbeSet, collapse_verdict
from .objectives import TITLES
from .objectives.anatcl import AnatCLConfig, AnatCLObjective
from .objectives.centering import is_distributed
from .objectives.common import Objective
from .objectives.dino import DINOConfig, DINOObjective
from .objectives.gram import GramConfig
from .objectives.jepa import JEPAConfig, JEPAObjective
from .objectives.mae import MAEConfig, MAEObjective
from .objectives.moco import MoCoConfig, MoCoObjective
from .slice_index import SliceDataset

CHECKPOINT = "checkpoint.pt"
#: Settings a resumed run may change: where and how precisely it computes, and how it reads its data.
RESUMABLE_CHANGES = ("device", "precision", "workers")
#: How long ranks wait in a collective: rank 0's kNN probe and checkpoint write of a large run can outlast
#: NCCL's 10-minute default while the other ranks wait at the barrier.
COLLECTIVE_TIMEOUT = timedelta(hours=1)
OBJECTIVES = {
    "dino": DINOObjective,
    "moco": MoCoObjective,
    "mae": MAEObjective,
    "jepa": JEPAObjective,
    "anatcl": AnatCLObjective,
}
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # unsharded, on rank 0's CPU
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """A pretraining run (saved with every checkpoint and in the exported model card)."""

    data: str = ""
    out_dir: str = "runs/pretrain"
    objective: str = "dino"  # dino, moco, mae, jepa, anatcl (settings in the section of that name)
    encoder: str = "vit-tiny16-dinov3"  # with init: the weights' own (a config naming another is an error)
    init: str = ""  # bundle (name or folder) or checkpoint whose weights every ViT of the objective starts from
    layer_scale_init: float = 1e-5  # DINOv2/v3's; larger (0.1) gives a fresh ViT input-dependent tokens sooner
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
    teacher_momentum: tuple[float, float] = (0.992, 1.0)  # also MoCo's momentum encoder, JEPA's target encoder
    teacher_temperature: tuple[float, float] = (0.04, 0.07)
    teacher_temperature_warmup_epochs: float = 1.0
    checkpoint_every: int = 50
    workers: int = 2  # data-loading processes (0: read in the training process)
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated model) or "fsdp" (parameters sharded, FSDP2)
    probe: str = ""  # labelled dataset for online kNN accuracy at every checkpoint (optional)
    probe_label: str = ""
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto, fp32, bf16, fp16 (with a gradient scaler); auto: `engine.autocast_dtype`
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    jepa: JEPAConfig = field(default_factory=JEPAConfig)
    anatcl: AnatCLConfig = field(default_factory=AnatCLConfig)
    gram: GramConfig = field(default_factory=GramConfig)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise BrainDINOError(f"unknown objective '{self.objective}' (choose from {', '.join(OBJECTIVES)})")
        if self.gram.weight > 0 and self.objective != "dino":
            raise BrainDINOError(f"Gram anchoring (gram.weight > 0) is for the DINO objective, not {self.objective}")
        if self.gram.weight > 0 and not (self.gram.teacher or self.init):
            raise BrainDINOError("Gram anchoring needs a Gram teacher: start from weights (--init) or set gram.teacher")
        if self.parallel not in ("ddp", "fsdp"):
            raise BrainDINOError(f"parallel must be 'ddp' or 'fsdp', got '{self.parallel}'")
        if self.precision not in PRECISIONS:
            raise BrainDINOError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Checked against the field types, sections included: a wrong type or unknown setting is an error."""
        moved = next((key for key in values if key in MOVED_TO_DINO), None) if isinstance(values, dict) else None
        if moved:
            raise BrainDINOError(f"invalid training configuration: unknown setting {moved} (it moved to dino.{moved})")
        return from_fields(cls, values, "invalid training configuration")


MOVED_TO_DINO = ("freeze_last_layer_epochs", "mask_probability", "mask_ratio")  # top-level in older configs


CONFIG_DIR = Path(__file__).parent / "configs"


def load_config(name: str, overrides: dict | None = None, assignments: list[str] = ()) -> TrainConfig:
    """A shipped config (``tiny-cpu``, ``vit-s16``, ``vit-b16-braindino``) or a YAML file, then overrides.

    Args:
        overrides: field -> value (e.g. data, out_dir from the command line).
        assignments: ``key=value`` strings with dotted keys for nested fields (``dino.prototypes=512``);
            values are parsed as YAML.
    """
    path = CONFIG_DIR / f"{name}.yaml" if (CONFIG_DIR / f"{name}.yaml").is_file() else Path(name)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise BrainDINOError(f"no training config '{name}' (shipped: {shipped}; or a YAML file)")
    values = _yaml(read_text(path), str(path)) or {}
    if not isinstance(values, dict):
        raise BrainDINOError(f"{path}: a training config must be a mapping of settings (key: value lines)")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise BrainDINOError(f"--set expects key=value, got '{assignment}'")
        *parents, leaf = key.strip().split(".")
        target = values
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise BrainDINOError(f"--set {key}: '{parent}' is a setting, not a section")
        target[leaf] = _yaml(text, f"--set {assignment}")
    if values.get("init"):
        from .initial_weights import initial_architecture

        architecture = initial_architecture(values["init"])
        if values.setdefault("encoder", architecture) != architecture:
            raise BrainDINOError(
                f"the config trains {values['encoder']} but --init {values['init']} holds {architecture}: drop "
                "'encoder' from the config (the weights decide it) or start from weights of that architecture"
            )
    return TrainConfig.from_dict(values)


def _run_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A training run's checkpoint (read without unpickling objects; ``mmap``: tensors mapped from the file, read
    as they are used), or one line saying it is not one."""
    state = read_checkpoint(path, mmap=mmap)
    needed = {"objective", "optimizer", "step", "config", "generators", "torch_rng"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise BrainDINOError(f"{path}: not the checkpoint of a BrainDINO training run")
    return state


def _yaml(text: str, source: str):
    """YAML read with version 1.2's numbers (``1e-5`` is a float; PyYAML's 1.1 rules keep it text).

    Raises:
        BrainDINOError: not valid YAML, naming ``source`` and where.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    number = r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(number), list("-+0123456789."))
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BrainDINOError(f"{source}: not valid YAML ({getattr(error, 'problem', None) or error}{where})") from error


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


def parameter_groups(objective: Objective, config: TrainConfig) -> list[dict]:
    """AdamW groups: decay or not, layer-wise lr scale (backbone blocks.i; heads, decoders and predictors
    at the top rate), patch embedding at a reduced rate."""
    depth = encoder_config(config.encoder).depth
    groups: dict[tuple[bool, float], list] = {}
    for name, parameter in objective.named_parameters():
        if not parameter.requires_grad:
            continue
        no_decay = parameter.ndim == 1 or name.endswith(".bias") or "token" in name or "gamma" in name
        match = re.search(r"(?:^|\.)backbone\.blocks\.(\d+)\.", name)
        layer = int(match.group(1)) + 1 if match else (0 if re.search(r"(?:^|\.)backbone\.", name) else depth + 1)
        scale = config.layer_decay ** (depth + 1 - layer)
        if "patch_embed" in name:
            scale *= config.patch_embed_lr_mult
        groups.setdefault((no_decay, scale), []).append(parameter)
    return [{"params": p, "lr_scale": s, "apply_wd": not nd} for (nd, s), p in sorted(groups.items())]


def build_optimizer(objective: Objective, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`, fused into one kernel per parameter group (CPU and CUDA)."""
    return torch.optim.AdamW(parameter_groups(objective, config), betas=(0.9, 0.999), fused=True)


@functools.lru_cache(maxsize=2)
def epoch_order(length: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of an epoch, a pure function of (seed, epoch): resuming needs only the step.
    Cached: every step of an epoch reads the same permutation (do not modify the array)."""
    return np.random.default_rng([seed, epoch]).permutation(length)


@dataclass(frozen=True)
class StepBatches:
    """The index lists of steps ``start`` to ``stop - 1``, made as the loader asks for them
    (a long run's full list would not fit in memory)."""

    indices: Callable[[int], list[int]]
    start: int
    stop: int

    def __iter__(self):
        return (self.indices(step) for step in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when started by ``torchrun``.

    One process without ``torchrun`` is rank 0 of 1 and needs no process group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: NCCL binds to the current device
    if world > 1 and not is_distributed():
        # A backend for the training device's type only, on CPUs as NCCL is on GPUs: a collective handed a tensor
        # on another device fails at once instead of working on one kind of machine and not the other.
        backend = f"{device.type}:{'nccl' if device.type == 'cuda' else 'gloo'}"
        bound = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, **bound)
    return (dist.get_rank() if is_distributed() else 0), world, device


class Trainer:
    """Runs, checkpoints and resumes one pretraining run in ``config.out_dir``.

    Under ``torchrun`` every process takes its share of each global batch (``batch_size`` is the
    global batch), gradients are averaged by DDP, DINO's centering statistics are reduced and
    MoCo's keys gathered across ranks, and rank 0 writes checkpoints, logs and the exported bundle.
    KoLeo, JEPA's variance-covariance terms and AnatCL's contrast are computed within each rank's
    share (as DINOv2 does for KoLeo); BatchNorm in MoCo's MLPs is synchronised across CUDA ranks.
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.rank, self.world, self.device = init_distributed(config.device)
        self.autocast = autocast_dtype(self.device, config.precision)
        if self.autocast == torch.float16 and self.world > 1 and config.parallel == "fsdp":
            raise BrainDINOError("fp16 with FSDP would let each rank skip overflowing steps on its own shard: use "
                                 "--set precision=bf16 (or fp32), or parallel=ddp")  # fmt: skip
        # fp16's narrow range underflows small gradients: scale the loss, and skip steps that overflow
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast == torch.float16)
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
        if encoder_config(config.encoder).family != "dinov3":
            raise BrainDINOError(
                f"pretraining needs a DINOv3-family encoder (RoPE, registers), got {config.encoder}: "
                "vit-tiny16-dinov3, vit-s16-dinov3, vit-b16-dinov3 or vit-l16-dinov3"
            )
        settings = getattr(config, config.objective)
        extra = {"gram": config.gram} if config.objective == "dino" else {}
        self.objective: Objective = OBJECTIVES[config.objective](
            encoder_config(config.encoder), settings, config.crops, spec.image_size, spec.in_chans, **extra
        )
        with torch.no_grad():  # every ViT copy (student, teacher) starts with the same LayerScale
            for module in self.objective.modules():
                for gamma in (getattr(module, "gamma_1", None), getattr(module, "gamma_2", None)):
                    if isinstance(gamma, torch.nn.Parameter):
                        gamma.fill_(config.layer_scale_init)
        self._check_initial_weights()
        if self.world > 1 and self.device.type == "cuda":
            self.objective = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.objective)
        self.objective.to(self.device)
        self.descriptors = None
        if self.objective.descriptor_names:
            self.descriptors = torch.from_numpy(self.dataset.descriptors(self.objective.descriptor_names))
        names = {id(module): name for name, module in self.objective.named_modules()}
        self.export_prefix = names[id(self.objective.export_backbone())] + "."
        self.model = self._parallel()
        self.optimizer = build_optimizer(self.objective, config)
        self.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.rank)  # own augmentations
        self.step = 0
        self.last_checkpoint: int | None = None  # step of the checkpoint on disk (rank 0 knows)
        self.embed_dim = encoder_config(config.encoder).embed_dim
        self.prototypes = config.dino.prototypes if config.objective == "dino" else None
        self.probe = None
        if config.probe:
            if not config.probe_label:
                raise BrainDINOError("a probe set needs probe_label (the label column to classify)")
            self.probe = ProbeSet.load(config.probe, config.probe_label, spec)

    def _sources(self) -> dict[str, str]:
        """Module-name prefix -> the bundle or checkpoint its weights start from (every ViT of the objective
        from ``init``; DINO's Gram teacher from ``gram.teacher`` or ``init``)."""
        from timm.models.eva import Eva

        sources = {}
        for name, module in self.objective.named_modules():
            if isinstance(module, Eva):
                source = (self.config.gram.teacher or self.config.init) if name == "gram_teacher" else self.config.init
                if source:
                    sources[name] = source
        return sources

    def _check_initial_weights(self) -> None:
        """Before anything trains: the initial weights' architecture is the run's (one line otherwise)."""
        from .initial_weights import initial_architecture

        for source in set(self._sources().values()):
            if initial_architecture(source) != self.config.encoder:
                raise BrainDINOError(f"{source}: holds {initial_architecture(source)} weights; this run trains "
                                     f"{self.config.encoder}")  # fmt: skip

    def _start_from_initial_weights(self) -> None:
        """Load the `_sources` weights into their ViTs (every process, DDP or FSDP alike); heads stay fresh."""
        from .initial_weights import load_initial_encoder

        state = {}
        for source in sorted(set(self._sources().values())):
            encoder = load_initial_encoder(source)
            in_chans = encoder.model.patch_embed.proj.in_channels
            if in_chans != self.dataset.spec.in_chans:
                raise BrainDINOError(f"{source}: weights for {in_chans}-channel input; the index {self.config.data} "
                                     f"has {self.dataset.spec.in_chans}-channel slices")  # fmt: skip
            weights = encoder.model.state_dict()
            for name, chosen in self._sources().items():
                if chosen == source:
                    state.update({f"{name}.{key}": value for key, value in weights.items()})
        if state:
            set_model_state_dict(self.objective, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def _parallel(self) -> torch.nn.Module:
        """The module the step calls: the objective itself, or wrapped for DDP, or sharded in place by FSDP2."""
        if self.world == 1:
            return self.objective
        if self.config.parallel == "ddp":  # DINO's mask token sits out steps without masks: find_unused_parameters
            return DistributedDataParallel(self.objective, broadcast_buffers=False, find_unused_parameters=True)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        for name, module in list(self.objective.named_modules()):
            if name.endswith("blocks"):  # every transformer block is its own all-gather unit
                for block in module:
                    fully_shard(block, mesh=mesh)
        fully_shard(self.objective, mesh=mesh)  # the rest (embeddings, heads, norms) as one unit
        return self.objective

    def close(self) -> None:
        """Leave the process group (after the last collective; rank 0 then exports alone)."""
        if is_distributed():
            dist.destroy_process_group()

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_state(self) -> dict | None:
        """Everything a resume needs, gathered by every process; the dict on rank 0, None elsewhere.

        Model and optimizer state are gathered in full (unsharded, keyed by parameter name): one file
        format for one process, DDP and FSDP, and the exported encoder is read from it.
        """
        generators = [self.generator.get_state()]
        if is_distributed():
            generators = [None] * self.world
            dist.all_gather_object(generators, self.generator.get_state())
        model_state, optimizer_state = get_state_dict(self.objective, self.optimizer, options=FULL_STATE)
        if self.rank != 0:
            return None
        return {
            "objective": model_state,
            "optimizer": optimizer_state,
            "step": self.step,
            "generators": generators,
            "torch_rng": torch.get_rng_state(),
            "config": json.dumps(self.config.to_dict()),
            "precision": precision_name(self.autocast),  # what ``auto`` chose on this run's device
        }

    def save_checkpoint(self, state: dict | None) -> Path:
        """Write atomically (rank 0): the file is either the previous complete checkpoint or the new one."""
        path = self.out_dir / CHECKPOINT
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp:
                torch.save(state, tmp)
            self.last_checkpoint = state["step"]
        if is_distributed():
            dist.barrier()
        return path

    def load_checkpoint(self) -> None:
        path = self.out_dir / CHECKPOINT
        if not path.is_file():
            raise BrainDINOError(f"{path}: no checkpoint to resume from")
        state = _run_checkpoint(path, mmap=True)  # mapped, not read: every rank shares the page cache
        if len(state["generators"]) != self.world:
            raise BrainDINOError(f"{path}: written by {len(state['generators'])} processes; resume with as many")
        written, now = json.loads(state["config"]), json.loads(json.dumps(self.config.to_dict()))
        changed = [key for key in RESUMABLE_CHANGES if written.get(key) != now[key]]
        if {k: v for k, v in written.items() if k not in changed} != {k: v for k, v in now.items() if k not in changed}:
            raise BrainDINOError(
                f"{path}: written with other settings (or by another BrainDINO version); resume with the "
                "same config and --set values (only " + ", ".join(RESUMABLE_CHANGES) + " may change), or start "
                "a new run in another folder"
            )
        for key in changed:
            logger.warning("resuming with %s %s (the checkpoint was written with %s)", key, now[key], written.get(key))
        set_model_state_dict(self.objective, state["objective"], options=StateDictOptions(full_state_dict=True))
        # Parameters that never had a gradient yet (DINO's prototypes, frozen early) have no saved state:
        # load without them, then drop the zero state the loader made up, so their first step stays a first step.
        set_optimizer_state_dict(
            self.objective,
            self.optimizer,
            state["optimizer"],
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        for name, parameter in self.objective.named_parameters():
            if name not in state["optimizer"]["state"]:
                self.optimizer.state.pop(parameter, None)
        self.step = self.last_checkpoint = int(state["step"])
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
            batch_sampler=StepBatches(self.step_indices, start, stop),
            num_workers=self.config.workers,
            pin_memory=self.device.type == "cuda",
        )

    def train_step(self, images: torch.Tensor) -> dict:
        """One optimisation step on this rank's (local batch, C, H, W) slices of step ``self.step``."""
        config, step = self.config, self.step
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.schedules.lr[step]) * group["lr_scale"]  # plain floats: checkpoints stay loadable
            group["weight_decay"] = float(self.schedules.weight_decay[step]) if group["apply_wd"] else 0.0
        descriptors = None if self.descriptors is None else self.descriptors[self.step_indices(step)]
        inputs = self.objective.make_inputs(to_device(images, self.device), self.generator, descriptors)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            output = self.model(inputs, float(self.schedules.teacher_temperature[step]))
        loss = output.losses["loss"]
        if not self._everywhere(torch.isfinite(loss.detach())):
            self._stop(step, f"the loss is not finite ({loss.item()} in this process)")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.objective.after_backward(step / self.steps_per_epoch)
        self.scaler.unscale_(self.optimizer)
        trained = [p for p in self.objective.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(trained, config.clip_grad if config.clip_grad > 0 else math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: the norm over every shard
        overflowed = not self._everywhere(torch.isfinite(norm))
        if overflowed and not self.scaler.is_enabled():
            self._stop(step, "a gradient is not finite")
        self.scaler.step(self.optimizer)  # with fp16, skipped when a gradient overflowed
        self.scaler.update()
        if overflowed:
            logger.info("step %d: fp16 gradients overflowed; the step is skipped and the loss scale lowered", step)
        else:
            self.objective.after_step(output, float(self.schedules.momentum[step]))
        self.step += 1
        if config.gram.weight > 0 and config.gram.refresh and self.step % config.gram.refresh == 0:
            self.objective.refresh_gram_teacher()
        names = list(output.losses) + list(output.metrics)
        values = torch.tensor(
            [float(v.detach()) for v in output.losses.values()] + list(output.metrics.values()), device=self.device
        )  # float32 on the training device: what collectives there take (NCCL, MPS: no float64)
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

    def _everywhere(self, flag: torch.Tensor) -> bool:
        """Whether a (device) bool holds on every rank: they stop together, or the others would wait forever."""
        flag = flag.float().reshape(1)
        if is_distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _stop(self, step: int, problem: str) -> None:
        advice = "lower the learning rate" + ("" if self.autocast is None else " or use --set precision=fp32")
        raise BrainDINOError(f"step {step}: {problem}; stopped before the weights changed. The last good checkpoint "
                             f"{self.out_dir / CHECKPOINT} is intact: {advice}, then resume")  # fmt: skip

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
        else:
            self._start_from_initial_weights()
            if self.rank == 0:
                log_path.unlink(missing_ok=True)  # a run stopped before its first checkpoint starts over
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")
        stop = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        rows = []
        board = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            board = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step + 1 if resume else None)
        for images in self.loader(self.step, stop):
            row = self.train_step(images)
            checkpoint_now = self.step % self.config.checkpoint_every == 0 or self.step == stop
            state = self.checkpoint_state() if checkpoint_now else None
            if self.probe is not None:  # a fixed column, filled at checkpoints (rank 0 only)
                row["knn_accuracy"] = self._probe_accuracy(state["objective"]) if state is not None else ""
            row["collapse"] = collapse_verdict(row, self.embed_dim, self.prototypes) if checkpoint_now else ""
            if row["collapse"] and self.rank == 0:
                logger.warning("step %d: %s", self.step, row["collapse"])
            rows.append(row)
            if board is not None:
                new = not log_path.exists()
                with open(log_path, "a", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=list(row))
                    if new:
                        writer.writeheader()
                    writer.writerow(row)
                for name, value in row.items():
                    if name not in ("step", "collapse") and value != "":
                        board.add_scalar(name, value, self.step)
            if checkpoint_now:
                self.save_checkpoint(state)
            if progress and self.rank == 0:
                progress(self.step, self.total_steps)
        if board is not None:
            board.close()
        return rows

    def _exported_encoder(self, objective_state: dict) -> BrainEncoder:
        """The exported backbone (DINO's teacher, MoCo's query encoder, ...) of a full objective state dict."""
        spec, prefix = self.dataset.spec, self.export_prefix
        encoder = BrainEncoder(encoder_config(self.config.encoder), spec.image_size, spec.in_chans)
        weights = {k[len(prefix) :]: v for k, v in objective_state.items() if k.startswith(prefix)}
        encoder.load_weights(weights, f"{self.config.objective} run in {self.out_dir}")
        return encoder.to(self.device).eval()

    def _probe_accuracy(self, objective_state: dict) -> float:
        """kNN accuracy of the exported encoder's embeddings (pooled as the objective pools them)."""
        encoder = self._exported_encoder(objective_state)

        def embed(images: torch.Tensor) -> torch.Tensor:
            output = encoder(images)
            return output.cls if self.objective.pooling == "cls" else output.patch_tokens.mean(dim=(1, 2))

        return round(self.probe.accuracy(embed, self.dataset.spec.in_chans, self.device), 4)

    def export(self, directory: str | Path, command: str = "") -> Path:
        """The run's last checkpoint as a model bundle (the objective's exported backbone) with a model card.

        Reads the checkpoint file, so one process can export a run that many trained.

        Args:
            command: the command line that started the run (recorded in the model card).
        """
        state = _run_checkpoint(self.out_dir / CHECKPOINT)
        last = {}
        log_path = self.out_dir / "log.csv"
        if log_path.is_file():
            with open(log_path) as handle:
                rows = list(csv.DictReader(handle))
                last = rows[-1] if rows else {}
        config = self.config
        card = ModelCard(
            name=f"{self.out_dir.name}-{config.objective}",
            description=f"{config.encoder} pretrained with {TITLES[config.objective]} on {config.data}",
            encoder=encoder_config(config.encoder),
            preprocessing=self.dataset.spec,
            random_init=False,
            intended_use="research on brain MRI features; not a medical device, not for clinical decisions",
            pooling=self.objective.pooling,
            training={
                "objective": config.objective,
                "data": config.data,
                "slices": len(self.dataset),
                "steps": int(state["step"]),
                "precision": state.get("precision"),  # of the last stretch of training (a resume may change it)
                "command": command,
                "config": config.to_dict(),
            },
            metrics={k: float(v) for k, v in last.items() if k not in ("step", "collapse") and v != ""},
        )
        encoder = self._exported_encoder(state["objective"]).cpu()
        return save_bundle(directory, encoder, card, overwrite=True).path
