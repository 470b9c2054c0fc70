"""The GPU lane: run whenever PyTorch sees CUDA GPUs, skipped with the reason otherwise. One GPU: inference
against the CPU's, training steps in the device's automatic precision; two GPUs: NCCL DDP and FSDP under
torchrun. Throughput and peak memory: ``benchmarks/inference.py`` and ``benchmarks/pretrain.py`` with
``--device cuda``."""

from __future__ import annotations

import csv
import dataclasses
import math
import sys

import pytest
import torch

from BrainDINOLib.bundle import find_bundle, load_bundle
from BrainDINOLib.engine import encode_volume
from BrainDINOLib.preprocess import prepare
from BrainDINOLib.sample_data import mni_path
from BrainDINOLib.volume import load_volume
from BrainDINOTrainingLib.augment import MultiCropConfig
from BrainDINOTrainingLib.objectives.dino import DINOConfig
from BrainDINOTrainingLib.trainer import TrainConfig, Trainer

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
one_gpu = pytest.mark.skipif(GPUS < 1, reason="the GPU lane: needs a CUDA GPU")
two_gpus = pytest.mark.skipif(GPUS < 2, reason="the GPU lane: needs two CUDA GPUs")


@one_gpu
def test_gpu_encoding_matches_the_cpus():
    """The shipped encoder on the MNI template: CUDA in its automatic precision against CPU fp32."""
    bundle = load_bundle(find_bundle())
    prepared = prepare(load_volume(mni_path("t1")), bundle.card.preprocessing)
    cpu = encode_volume(prepared, bundle.load_encoder(), device="cpu")
    torch.cuda.reset_peak_memory_stats()
    gpu = encode_volume(prepared, bundle.load_encoder(), device="cuda")
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(gpu.cls), torch.from_numpy(cpu.cls), dim=1)
    assert float(cosine.min()) > 0.99
    assert torch.cuda.max_memory_allocated() < 2**30  # a tiny encoder, 128-slice batches


@one_gpu
def test_gpu_training_steps_in_automatic_precision(tmp_path, index64):
    config = TrainConfig(
        data=str(index64), out_dir=str(tmp_path / "run"), epochs=1, steps_per_epoch=4, batch_size=8,
        checkpoint_every=2, device="cuda", dino=DINOConfig(prototypes=128, head_hidden_dim=64, head_bottleneck_dim=32),
        crops=MultiCropConfig(global_size=64, local_size=32, local_crops=2),
    )  # fmt: skip
    trainer = Trainer(config)
    native_bf16 = torch.cuda.get_device_capability() >= (8, 0)
    assert trainer.autocast == (torch.bfloat16 if native_bf16 else torch.float16)
    rows = trainer.fit()
    assert len(rows) == 4 and all(math.isfinite(row["loss"]) for row in rows)
    resumed = Trainer(dataclasses.replace(config, precision="fp32"))
    resumed.fit(resume=True)  # written on the GPU in reduced precision, resumed in fp32
    assert resumed.step == 4


@two_gpus
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gpus_under_torchrun(tmp_path, index64, parallel):
    """NCCL process groups take CUDA tensors only: any collective handed a CPU tensor fails on step 1."""
    import subprocess
    from pathlib import Path

    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2"]
    command = torchrun + ["-m", "BrainDINOTrainingLib", "pretrain", "--config", "tiny-cpu", "--data", str(index64)]
    command += ["-o", str(tmp_path / "run"), "--device", "cuda"]
    for setting in ("epochs=1", "steps_per_epoch=4", "batch_size=8", "checkpoint_every=2", f"parallel={parallel}",
                    "crops.global_size=64", "crops.local_size=32"):  # fmt: skip
        command += ["--set", setting]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "run" / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(math.isfinite(float(row["loss"])) for row in rows)
