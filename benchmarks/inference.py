"""Encoder alone vs the full ``infer`` pipeline on a BraTS-sized volume; one JSON object per config.

The volume is the real MNI T1 template, its brain extent stretched to 155 axial slices and
padded to 240 x 240, so every slice is encoded. For each config, in one process: a warm-up, the
encoder alone over all slices (input prepared beforehand), then ``run_inference`` end to end
(load, preprocess, encode, maps, NIfTI + embeddings + report). Each config runs in its own
subprocess so ``peak_rss_mb`` is that config's own peak. CPU times (all threads) come beside the
wall times: they depend less on other work on the machine. With several ``--image-size`` values,
each config runs at each size, followed by a comparison object (times and peak memory relative to
the first size).

    python benchmarks/inference.py                       # tiny and vit-s16 on the default shape
    python benchmarks/inference.py --config vit-b16 --shape 512,512,400   # memory on a large scan
    python benchmarks/inference.py --image-size 224 --image-size 448      # the cost of finer maps
    python benchmarks/inference.py --device cuda --batch-size 128          # GPU throughput and peak GPU memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "tiny": "vit-tiny16-dinov3",
    "vit-s16": "vit-s16-dinov3",
    "vit-b16": "vit-b16-dinov3",
}


def make_scan(path: Path, shape: tuple[int, int, int]) -> Path:
    """The MNI brain extent resampled to ``shape[2]`` axial slices, centred in a ``shape[:2]`` plane."""
    import nibabel as nib
    import numpy as np
    import torch
    import torch.nn.functional as F

    from BrainDINOLib.sample_data import mni_path

    mni = nib.load(mni_path("t1"))
    data = np.asarray(mni.dataobj, dtype=np.float32)
    slices = np.flatnonzero((data > 0).mean(axis=(0, 1)) >= 0.05)  # well inside the brain extent
    brain = data[:, :, slices[0] : slices[-1] + 1]
    scale = min(shape[0] / brain.shape[0], shape[1] / brain.shape[1], 1.0 if shape[0] < 300 else 2.0)
    size = (round(brain.shape[0] * scale), round(brain.shape[1] * scale), shape[2])
    resized = F.interpolate(torch.from_numpy(brain)[None, None], size=size, mode="trilinear", align_corners=False)
    volume = np.zeros(shape, dtype=np.int16)
    x0, y0 = (shape[0] - size[0]) // 2, (shape[1] - size[1]) // 2
    volume[x0 : x0 + size[0], y0 : y0 + size[1]] = resized[0, 0].round().numpy().astype(np.int16)
    affine = np.diag([1 / scale, 1 / scale, brain.shape[2] / shape[2], 1.0])
    nib.save(nib.Nifti1Image(volume, affine), path)
    return path


def run_one(
    config: str, shape: tuple[int, int, int], batch_size: int, image_size: int | None, device: str, precision: str
) -> dict:
    import torch

    from BrainDINOLib.bundle import create_random_bundle, find_bundle, load_bundle
    from BrainDINOLib.engine import autocast_dtype, precision_name, resolve_device, to_device
    from BrainDINOLib.infer import InferenceOptions, analysis_spec, run_inference
    from BrainDINOLib.preprocess import prepare
    from BrainDINOLib.volume import load_volume

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scan = make_scan(tmp / "scan.nii.gz", shape)
        if config == "tiny":
            bundle_path = find_bundle()
        else:
            bundle_path = create_random_bundle(tmp / config, CONFIGS[config]).path
        bundle = load_bundle(bundle_path)
        target = resolve_device(device)
        encoder = bundle.load_encoder().to(target)
        dtype = autocast_dtype(target, precision)
        prepared = prepare(load_volume(scan), analysis_spec(bundle.card, image_size))
        batches = [
            prepared.model_input(prepared.slices[i : i + batch_size])
            for i in range(0, len(prepared.slices), batch_size)
        ]

        def encode(batch: torch.Tensor) -> None:
            with torch.inference_mode(), torch.autocast(target.type, dtype=dtype, enabled=dtype is not None):
                encoder(to_device(batch, target))

        def finished() -> float:
            if target.type == "cuda":
                torch.cuda.synchronize()  # GPU work is queued: count it when done
            return time.perf_counter()

        options = InferenceOptions(bundle=str(bundle_path), device=device, batch_size=batch_size,
                                   image_size=image_size, precision=precision)  # fmt: skip
        encode(batches[0])  # warm-up
        start, cpu = finished(), time.process_time()
        for batch in batches:
            encode(batch)
        encoder_s, encoder_cpu_s = finished() - start, time.process_time() - cpu
        del batches
        start, cpu = finished(), time.process_time()
        result = run_inference(scan, tmp / "out", options)
        pipeline_s, pipeline_cpu_s = finished() - start, time.process_time() - cpu
    slices = result["slices"]["analysed"]
    return {
        "config": config,
        "encoder": CONFIGS[config],
        "shape": list(shape),
        "image_size": prepared.spec.image_size,
        "slices": slices,
        "batch_size": batch_size,
        "encoder_s": round(encoder_s, 3),
        "pipeline_s": round(pipeline_s, 3),
        "encoder_cpu_s": round(encoder_cpu_s, 3),
        "pipeline_cpu_s": round(pipeline_cpu_s, 3),
        "ratio": round(pipeline_s / encoder_s, 3),
        "slices_per_s": round(slices / pipeline_s, 2),
        "encoder_slices_per_s": round(slices / encoder_s, 2),
        "pipeline_stages_s": result["timings_s"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": str(target),
        "precision": precision_name(dtype),
        **(
            {"gpu": torch.cuda.get_device_name(target), "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20)}
            if target.type == "cuda"
            else {}
        ),
        "threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 2),  # other processes on the machine slow the wall times
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, action="append", help="default: tiny and vit-s16")
    parser.add_argument("--shape", default="240,240,155", help="X,Y,Z of the synthetic scan (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default %(default)s)")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 (default %(default)s)")
    parser.add_argument(
        "--image-size", type=int, action="append", help="canvas side for the maps and heads (default: the bundle's)"
    )
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    configs = args.config or ["tiny", "vit-s16"]
    sizes = args.image_size or [None]
    if args.in_process:
        print(
            json.dumps(run_one(configs[0], shape, args.batch_size, sizes[0], args.device, args.precision)), flush=True
        )
        return
    for config in configs:
        runs = []
        for size in sizes:
            command = [sys.executable, __file__, "--in-process", "--config", config, "--shape", args.shape,
                       "--batch-size", str(args.batch_size), "--device", args.device,
                       "--precision", args.precision]  # fmt: skip
            if size:
                command += ["--image-size", str(size)]
            output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
            print(output, end="", flush=True)
            runs.append(json.loads(output))
        if len(runs) > 1:
            print(json.dumps(compare(runs)), flush=True)


def compare(runs: list[dict]) -> dict:
    """Each run's times and peak memory as ratios to the first run's (one config at several image sizes)."""
    first = runs[0]
    keys = ("encoder_s", "pipeline_s", "encoder_cpu_s", "pipeline_cpu_s", "peak_rss_mb")
    return {
        "config": first["config"],
        "image_sizes": [run["image_size"] for run in runs],
        **{f"{key}_ratio": [round(run[key] / first[key], 2) for run in runs] for key in keys},
    }


if __name__ == "__main__":
    main()
