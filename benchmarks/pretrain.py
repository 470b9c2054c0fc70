"""Pretraining throughput: our DINO step vs the `lightly` package's, same backbone, crops and batch.

For each config, in its own process (so ``peak_rss_mb`` is its own): axial slices of the MNI
template are cropped once (2 global + local crops); then, timed over the same crops:

- ``dino``: our `DINOObjective` with only the DINO term (EMA centering), AdamW step, EMA update,
  timed interleaved with the peer;
- ``dino+ibot+koleo``: our default objective (iBOT masks on half the global crops, KoLeo);
- the peer: lightly's ``DINOProjectionHead`` + ``DINOLoss`` + ``update_momentum`` around the same
  timm backbone (CLS token), AdamW step.

One JSON object per objective and config; ``ratio`` = ours / peer images per second (DINO only).

    python benchmarks/pretrain.py [--config tiny-cpu --config vit-s16] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CONFIGS = {  # encoder, batch, local crops, prototypes
    "tiny-cpu": ("vit-tiny16-dinov3", 16, 4, 1024),
    "vit-s16": ("vit-s16-dinov3", 8, 4, 4096),
}


def _crops(batch: int, local_crops: int):
    from BrainDINOLib.preprocess import PreprocessSpec, prepare
    from BrainDINOLib.sample_data import mni_path
    from BrainDINOLib.volume import load_volume
    from BrainDINOTrainingLib.augment import MultiCropConfig, multi_crop

    prepared = prepare(load_volume(mni_path("t1")), PreprocessSpec())
    chosen = prepared.slices[torch.linspace(0, len(prepared.slices) - 1, batch).long().numpy()]
    crops = multi_crop(
        prepared.model_input(chosen), MultiCropConfig(local_crops=local_crops), torch.Generator().manual_seed(0)
    )
    return crops


def _time(*steps, rounds: int) -> list[float]:
    """Seconds per call of each step, timed interleaved (a, b, a, b, ...) so drift hits all alike."""
    for step in steps:
        step()  # warm-up
    totals = [0.0] * len(steps)
    for _ in range(rounds):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            totals[i] += time.perf_counter() - start
    return [t / rounds for t in totals]


def ours(encoder: str, prototypes: int, crops, full: bool):
    """One training step of our objective (a closure)."""
    from BrainDINOLib.encoder import encoder_config
    from BrainDINOTrainingLib.objectives.dino import DINOConfig, DINOObjective
    from BrainDINOTrainingLib.objectives.masking import batch_masks

    torch.manual_seed(0)
    config = DINOConfig(prototypes=prototypes, ibot_weight=1.0 if full else 0.0, koleo_weight=0.1 if full else 0.0)
    objective = DINOObjective(encoder_config(encoder), config)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-4)
    global_crops, local_crops = crops
    grid = encoder_config(encoder).patch_grid(224)
    masks = batch_masks(
        2 * global_crops[0].shape[0], grid, torch.Generator().manual_seed(1), probability=0.5 if full else 0.0
    )

    def step():
        output = objective(global_crops, local_crops, masks, 0.04)
        optimizer.zero_grad(set_to_none=True)
        output.losses["loss"].backward()
        optimizer.step()
        objective.update_teacher(0.996)
        objective.update_centers(output)

    return step


def peer(encoder: str, prototypes: int, crops):
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
    global_crops, local_crops = crops

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
    crops = _crops(batch, local_crops)
    images = batch * (2 + local_crops)
    row = {
        "objective": objective,
        "config": config,
        "encoder": encoder,
        "batch": batch,
        "crops": f"2x224 + {local_crops}x96",
        "prototypes": prototypes,
    }
    if objective == "dino":
        seconds, peer_seconds = _time(
            ours(encoder, prototypes, crops, full=False), peer(encoder, prototypes, crops), rounds=ARGS.steps
        )
        row.update(
            images_per_s=round(images / seconds, 2),
            peer_images_per_s=round(images / peer_seconds, 2),
            ratio=round(peer_seconds / seconds, 3),
        )
    else:
        (seconds,) = _time(ours(encoder, prototypes, crops, full=True), rounds=ARGS.steps)
        row.update(images_per_s=round(images / seconds, 2))
    row.update(
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, action="append")
    parser.add_argument("--objective", choices=["dino", "dino+ibot+koleo"], action="append")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    global ARGS
    ARGS = parser.parse_args()
    configs = ARGS.config or list(CONFIGS)
    objectives = ARGS.objective or ["dino", "dino+ibot+koleo"]
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
                ],
                check=True,
            )


ARGS = argparse.Namespace(steps=3)

if __name__ == "__main__":
    main()
