"""Real processes: 2-process torchrun (gloo, CPU) runs with DDP and with FSDP (started from weights, with Gram
anchoring) match one process; SIGKILL then resume is exact."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from BrainDINOTrainingLib.slice_index import SliceDataset
from BrainDINOTrainingLib.trainer import Trainer, load_config

COMMON = [
    "epochs=1",
    "batch_size=8",
    "crops.global_size=64",
    "crops.local_size=32",
    "dino.prototypes=128",
    "dino.head_hidden_dim=64",
    "dino.head_bottleneck_dim=32",
]
# Same data, same crops, no random augmentation or masking, and no KoLeo (computed per rank, as in
# DINOv2): one process with the global batch and two with half each must then agree.
DETERMINISTIC = [
    "crops.local_crops=0",
    "crops.global_scale=[1.0, 1.0]",
    "crops.ratio=[1.0, 1.0]",
    "crops.flip_probability=0",
    "crops.intensity_probability=0",
    "crops.gamma_probability=0",
    "crops.bias_probability=0",
    "crops.blur_probability=0",
    "crops.noise_probability=0",
    "dino.mask_probability=0",
    "dino.koleo_weight=0",
    "steps_per_epoch=3",
    # from shipped weights, anchored to other weights' Gram matrices, the Gram teacher refreshed mid-run
    "init=braindino-tiny-random",
    "gram.weight=1.0",
    "gram.teacher=braindino-tiny-phantom",
    "gram.refresh=2",
]


@pytest.fixture(scope="module")
def index(index64):
    return index64


def _command(index: Path, out: Path, settings: list[str], launcher: list[str]) -> list[str]:
    args = ["pretrain", "--config", "tiny-cpu", "--data", str(index), "-o", str(out), "--device", "cpu"]
    return launcher + args + [a for s in settings for a in ("--set", s)]


def _log(out: Path) -> list[dict]:
    with open(out / "log.csv") as handle:
        return list(csv.DictReader(handle))


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def single_process_log(tmp_path_factory, index):
    out = tmp_path_factory.mktemp("single") / "one"
    single = _command(index, out, COMMON + DETERMINISTIC, [sys.executable, "-m", "BrainDINOTrainingLib"])
    subprocess.run(single, check=True, capture_output=True, env=_env(), timeout=300)
    return _log(out)


def _torchrun_two_processes(index: Path, out: Path, settings: list[str]) -> None:
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        _command(index, out, settings, torchrun + ["-m", "BrainDINOTrainingLib"]),
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_torchrun_matches_one_process(tmp_path, index, single_process_log, parallel):
    _torchrun_two_processes(index, tmp_path / "two", COMMON + DETERMINISTIC + [f"parallel={parallel}"])
    one, two = single_process_log, _log(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        for term in ("loss", "gram"):  # stated tolerance: float sum order
            assert float(a[term]) == pytest.approx(float(b[term]), abs=1e-4)
    assert float(one[0]["gram"]) > 1e-3  # the student's and the Gram teacher's weights differ at the start
    assert (tmp_path / "two" / "bundle" / "model.json").is_file()


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, index):
    settings = COMMON + ["steps_per_epoch=8", "checkpoint_every=2", "crops.local_crops=2"]
    launcher = [sys.executable, "-m", "BrainDINOTrainingLib"]
    with open(tmp_path / "straight.txt", "w") as output:  # the uninterrupted run goes on alongside (1 thread each)
        straight = subprocess.Popen(
            _command(index, tmp_path / "straight", settings, launcher),
            env=_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    victim = subprocess.Popen(
        _command(index, tmp_path / "killed", settings, launcher),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp_path / "killed" / "log.csv"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 6):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert len(_log(tmp_path / "killed")) < 8  # really interrupted mid-run
    resume = _command(index, tmp_path / "killed", settings, launcher) + ["--resume"]
    subprocess.run(resume, check=True, capture_output=True, env=_env(), timeout=300)
    assert straight.wait(timeout=300) == 0, (tmp_path / "straight.txt").read_text()[-2000:]
    assert _log(tmp_path / "killed") == _log(tmp_path / "straight")  # bit-exact: every logged value equal
    weights = "bundle/encoder.safetensors"
    assert (tmp_path / "killed" / weights).read_bytes() == (tmp_path / "straight" / weights).read_bytes()


def test_ranks_without_masked_patches_stay_in_step(tmp_path, index):
    """With one slice per process and small iBOT masks, some steps leave a process with no masked
    patch: EMA centering and FSDP's gradient reduction must still run on every process alike."""
    settings = COMMON + [
        "batch_size=2",
        "steps_per_epoch=8",
        "checkpoint_every=8",
        "crops.local_crops=0",
        "dino.koleo_weight=0",
        "dino.mask_ratio=[0.1, 0.3]",
        "parallel=fsdp",
    ]
    _torchrun_two_processes(index, tmp_path / "run", settings)
    assert len(_log(tmp_path / "run")) == 8
    # Such a step occurred: each rank's augmentation generator (seeded per rank, as the trainer seeds it)
    # replayed here draws the same crops and masks, and some (rank, step) masks no patch at all.
    overrides = {"data": str(index), "out_dir": str(tmp_path / "replay"), "device": "cpu"}
    config = load_config("tiny-cpu", overrides, settings)
    objective, image = Trainer(config).objective, SliceDataset(index)[0][None]
    unmasked = []
    for rank in (0, 1):
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + rank)
        unmasked += [not objective.make_inputs(image, generator)["masks"].any() for _ in range(8)]
    assert 0 < sum(unmasked) < 16
