"""Pretraining throughput per objective, and our DINO step vs the `lightly` package's.

For each config and objective, in its own process (so ``peak_rss_mb`` is its own): axial slices of
the MNI template are turned into the objective's inputs once (crops, masks; augmentation is not
timed), then full training steps are timed on them: forward, backward, AdamW step, EMA/centering
updates.

- ``dino``: our `DINOObjective` with only the DINO term (EMA centering), timed interleaved with the
  peer: lightly's ``DINOProjectionHead`` + ``DINOLoss`` + ``update_momentum`` around the same timm
  backbone (CLS token), same crops and batch, torch's default AdamW step (ours: the trainer's
  optimizer, fused AdamW over its parameter groups);
- ``dino+ibot+koleo`` (our default), ``moco``, ``mae``, ``jepa``, ``anatcl``: the objectives with the
  settings of the config file (tiny-cpu.yaml sections; paper defaults for vit-s16).

``images_per_s`` counts input slices (one slice makes 2 + local crops views for DINO, 2 for MoCo
and AnatCL, 1 for MAE and JEPA); ``ratio`` = ours / peer (DINO only). One JSON object per line.

    python benchmarks/pretrain.py [--config tiny-cpu --config vit-s16] [--objective mae] [--steps 3]
    python benchmarks/pretrain.py --device cuda --precision bf16   # GPU throughput (per GPU), peak GPU memory
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CONFIGS = {  # encoder, batch, local crops, DINO prototypes (smaller than the YAMLs' so a CPU can time them)
    "tiny-cpu": ("vit-tiny16-dinov3", 16, 4, 1024),
    "vit-s16": ("vit-s16-dinov3", 8, 4, 4096),
}
OBJECTIVES = ["dino", "dino+ibot+koleo", "moco", "mae", "jepa", "anatcl"]


def _slices(batch: int) -> torch.Tensor:
    from BrainDINOLib.preprocess import PreprocessSpec, prepare
    from BrainDINOLib.sample_data import mni_path
    from BrainDINOLib.volume import load_volume

    prepared = prepare(load_volume(mni_path("t1")), PreprocessSpec())
    chosen = prepared.slices[torch.linspace(0, len(prepared.slices) - 1, batch).long().numpy()]
    return prepared.model_input(chosen)


def _synchronize() -> None:
    """Wait for the GPU: its work is queued, and a step's time is when it is done."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(*steps, rounds: int) -> list[float]:
    """Seconds per call of each step, timed interleaved (a, b, a, b, ...) so drift hits all alike."""
    for step in steps:
        step()  # warm-up
    totals = [0.0] * len(steps)
    for _ in range(rounds):
        for i, step in enumerate(steps):
            _synchronize()
            start = time.perf_counter()
            step()
            _synchronize()
            totals[i] += time.perf_counter() - start
    return [t / rounds for t in totals]


def _autocast(device: torch.device):
    """The autocast of ``--precision`` on the benchmark's device (the trainer's choice for ``auto``)."""
    from BrainDINOLib.engine import autocast_dtype

    dtype = autocast_dtype(device, ARGS.precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def ours(config_name: str, objective_name: str, slices: torch.Tensor):
    """One training step of our objective on fixed inputs (a closure)."""
    from BrainDINOLib.encoder import encoder_config
    from BrainDINOTrainingLib.trainer import OBJECTIVES as CLASSES
    from BrainDINOTrainingLib.trainer import build_optimizer, load_config

    encoder, _, local_crops, prototypes = CONFIGS[config_name]
    name = "dino" if objective_name.startswith("dino") else objective_name
    assignments = [f"crops.local_crops={local_crops}", "crops.global_size=224", "crops.local_size=96"]
    assignments += [f"dino.prototypes={prototypes}", "dino.head_hidden_dim=2048", "dino.head_bottleneck_dim=256"]
    if objective_name == "dino":
        assignments += ["dino.ibot_weight=0", "dino.koleo_weight=0"]
    config = load_config(config_name, {"encoder": encoder, "objective": name}, assignments)
    device = torch.device(ARGS.device)
    torch.manual_seed(0)
    objective = CLASSES[name](encoder_config(encoder), getattr(config, name), config.crops).to(device)
    optimizer = build_optimizer(objective, config)  # the trainer's: parameter groups, fused AdamW
    descriptors = torch.randn(len(slices), 3, generator=torch.Generator().manual_seed(2)).to(device)
    inputs = objective.make_inputs(slices.to(device), torch.Generator().manual_seed(1), descriptors)

    def step():
        with _autocast(device):
            output = objective(inputs, 0.04)
        optimizer.zero_grad(set_to_none=True)
        output.losses["loss"].backward()
        optimizer.step()
        objective.after_step(output, 0.996)

    return step, inputs


def peer(encoder: str, prototypes: int, global_crops: list, local_crops: list):
    """One training step of lightly's DINO around the same backbone (a closure)."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    from BrainDINOLib.encoder import build_vit, encoder_config

    config = encoder_config(encoder)

    def build() -> torch.nn.ModuleDict:
        torch.manual_seed(0)
        return torch.nn.ModuleDict(
            {"backbone": build_vit(config), "head": DINOProjectionHead(config.embed_dim, 2048, 256, prototypes)}
        )

    student, teacher = build(), build()  # lightly's weight-normed head cannot be deep-copied
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    criterion = DINOLoss(output_dim=prototypes, warmup_teacher_temp=0.04, teacher_temp=0.04)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)

    def embed(modules, x):
        return modules["head"](modules["backbone"].forward_features(x)[:, 0])

    def step():
        with torch.no_grad():
            teacher_out = [embed(teacher, x) for x in global_crops]
        student_out = [embed(student, x) for x in global_crops + local_crops]
        loss = criterion(teacher_out, student_out, epoch=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_momentum(student, teacher, 0.996)

    return step


def run_one(config: str, objective: str) -> dict:
    encoder, batch, local_crops, prototypes = CONFIGS[config]
    slices = _slices(batch)
    row = {"objective": objective, "config": config, "encoder": encoder, "batch": batch, "device": ARGS.device}
    step, inputs = ours(config, objective, slices)
    if objective == "dino" and ARGS.device == "cpu":  # the peer runs as lightly's examples do: on the CPU here
        peer_step = peer(encoder, prototypes, inputs["global_crops"], inputs["local_crops"])
        seconds, peer_seconds = _time(step, peer_step, rounds=ARGS.steps)
        row.update(
            crops=f"2x224 + {local_crops}x96",
            prototypes=prototypes,
            images_per_s=round(batch / seconds, 2),
            peer_images_per_s=round(batch / peer_seconds, 2),
            ratio=round(peer_seconds / seconds, 3),
        )
    else:
        (seconds,) = _time(step, rounds=ARGS.steps)
        row.update(images_per_s=round(batch / seconds, 2))
    row.update(
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        threads=torch.get_num_threads(),
        precision=ARGS.precision,
        torch=torch.__version__,
    )
    if ARGS.device.startswith("cuda"):
        row.update(gpu=torch.cuda.get_device_name(), peak_gpu_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, action="append")
    parser.add_argument("--objective", choices=OBJECTIVES, action="append")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16, fp16 (default %(default)s)")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    global ARGS
    ARGS = parser.parse_args()
    configs = ARGS.config or list(CONFIGS)
    objectives = ARGS.objective or OBJECTIVES
    if ARGS.in_process:
        print(json.dumps(run_one(configs[0], objectives[0])), flush=True)
        return
    for config in configs:
        for objective in objectives:
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--in-process",
                    "--config",
                    config,
                    "--objective",
                    objective,
                    "--steps",
                    str(ARGS.steps),
                    "--device",
                    ARGS.device,
                    "--precision",
                    ARGS.precision,
                ],
                check=True,
            )


ARGS = argparse.Namespace(steps=3, device="cpu", precision="auto")

if __name__ == "__main__":
    main()
