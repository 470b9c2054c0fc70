"""The ``braindino`` console script: the inference commands plus this library's training commands."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from BrainDINOLib import cli
from BrainDINOLib.errors import BrainDINOError

from .objectives import TITLES


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """``cohort make`` and ``index``."""
    cohort = subparsers.add_parser("cohort", help="labelled phantom cohorts derived from the MNI template")
    actions = cohort.add_subparsers(dest="action", required=True, metavar="{make}")
    make = actions.add_parser(
        "make",
        help="write N phantom subjects (T1, T1ce, T2, FLAIR, tumor mask) and manifest.csv",
        description="Generate N labelled phantom subjects from the real MNI ICBM152 template: four contrasts, "
        "BraTS-labelled tumors with mass effect (60 %% of subjects), age- and diagnosis-dependent "
        "atrophy, bias field, noise and varied resolution, slice thickness and orientation. "
        "manifest.csv lists age, sex, diagnosis-like class, GM/WM/CSF volumes, tumor volumes, a "
        "molecular-status-like marker and survival time/event. Deterministic by --seed.",
    )
    make.add_argument("count", type=int, metavar="N")
    make.add_argument("out_dir", type=Path, metavar="OUTDIR")
    make.add_argument("--seed", type=int, default=0, help="cohort seed (default %(default)s)")
    make.add_argument(
        "--resolution",
        type=float,
        default=1.0,
        help="base grid in whole mm: 1 (default, realistic) or 2 (8x faster, for quick tests)",
    )
    make.add_argument(
        "--workers", type=int, default=_default_workers(), help="parallel processes (default %(default)s)"
    )
    make.set_defaults(func=_cohort_make)

    index = subparsers.add_parser(
        "index",
        help="index and cache preprocessed axial slices for pretraining",
        description="Record every axial slice of every volume in DATA (folders, manifests, BIDS, BraTS) with its "
        "relative position in the brain extent, entropy and foreground fraction, and write the slices "
        "kept by the filters, preprocessed as for inference, to memory-mappable float16 shards. "
        "Resumes an interrupted build in the same folder.",
    )
    index.add_argument("data", nargs="+", type=Path, metavar="DATA")
    index.add_argument("-o", "--out-dir", type=Path, required=True, help="index folder")
    index.add_argument("--image-size", type=int, default=224, help="canvas side in pixels (default %(default)s)")
    index.add_argument(
        "--min-entropy",
        type=float,
        default=0.0,
        help="drop slices whose 256-bin intensity entropy (bits) is lower (default: off)",
    )
    index.add_argument(
        "--position-range",
        type=float,
        nargs=2,
        default=(0.0, 1.0),
        metavar=("LOW", "HIGH"),
        help="keep slices at this relative position in the brain extent (default 0 1)",
    )
    index.add_argument(
        "--workers", type=int, default=_default_workers(), help="parallel processes (default %(default)s)"
    )
    index.set_defaults(func=_index)


def add_pretrain_command(subparsers: argparse._SubParsersAction) -> None:
    """``pretrain``."""
    pretrain = subparsers.add_parser(
        "pretrain",
        help="self-supervised pretraining (DINO + iBOT + KoLeo, or a baseline) on a slice index",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain an encoder on the slices of an index ('braindino index'). Objectives:\n"
        + "\n".join(f"  {name:7} {title}" for name, title in TITLES.items())
        + "\nCheckpoints are written atomically to OUT_DIR; --resume continues exactly. log.csv and TensorBoard\n"
        "hold every loss term and the collapse monitors. At the end the encoder (DINO's teacher) is exported\n"
        "as a model bundle (OUT_DIR/bundle) that 'braindino infer --bundle' uses.\n"
        "Many GPUs: torchrun --nproc_per_node=N -m BrainDINOTrainingLib pretrain ... (batch_size is global).",
    )
    pretrain.add_argument(
        "--config", default="tiny-cpu", help="tiny-cpu (default), vit-s16, vit-b16-braindino or a YAML"
    )
    pretrain.add_argument("--data", help="slice index folder")
    pretrain.add_argument("--objective", choices=list(TITLES), help="default: the config's (dino)")
    pretrain.add_argument("-o", "--out-dir", help="run folder (checkpoint.pt, log.csv, config.json, bundle/)")
    pretrain.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set epochs=4 --set dino.prototypes=512",
    )
    pretrain.add_argument("--device", help="auto, cpu, cuda, mps (default: the config's)")
    pretrain.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR from its checkpoint")
    pretrain.set_defaults(func=_pretrain)


def _pretrain(args) -> None:
    from .trainer import Trainer, load_config

    overrides = {"data": args.data, "out_dir": args.out_dir, "device": args.device, "objective": args.objective}
    config = load_config(args.config, overrides, args.set)
    if not config.data:
        raise BrainDINOError("no data: pass --data INDEX (a folder made by 'braindino index')")
    trainer = Trainer(config)
    try:
        with cli.ProgressBar("pretraining", "step") as progress:
            trainer.fit(resume=args.resume, progress=progress)
    except KeyboardInterrupt:
        if trainer.rank == 0:
            last = trainer.last_checkpoint
            hint = (
                f"the checkpoint of step {last} is in {config.out_dir}: run the same command with --resume"
                if last
                else f"no checkpoint yet (the first is written at step {config.checkpoint_every})"
            )
            print(f"braindino: stopped at step {trainer.step}; {hint}", file=sys.stderr)
        raise
    if trainer.rank == 0:
        bundle = trainer.export(Path(config.out_dir) / "bundle", command=shlex.join(["braindino", *sys.argv[1:]]))
        print(f"trained {trainer.step} steps; checkpoint and log in {config.out_dir}; encoder exported to {bundle}")


def _cohort_make(args) -> None:
    from .phantoms import make_cohort

    with cli.ProgressBar("phantoms", "subject") as progress:
        manifest = make_cohort(
            args.count,
            args.out_dir,
            seed=args.seed,
            resolution=args.resolution,
            workers=args.workers,
            progress=progress,
        )
    print(f"wrote {args.count} phantom subjects and {manifest}")


def _index(args) -> None:
    from BrainDINOLib.preprocess import PreprocessSpec

    from .slice_index import build_index

    spec = PreprocessSpec(
        image_size=args.image_size, min_entropy=args.min_entropy, position_range=tuple(args.position_range)
    )
    with cli.ProgressBar("indexing", "volume") as progress:
        info = build_index(args.data, args.out_dir, spec, workers=args.workers, progress=progress)
    print(
        f"indexed {info['volumes']} volumes ({info['volumes_skipped']} skipped, listed in volumes.json): "
        f"kept {info['slices_kept']} of {info['slices_seen']} slices, "
        f"{info['bytes_per_slice'] / 1024:.0f} KiB per slice ({info['gb_per_million_slices']} GB per million) "
        f"in {args.out_dir}"
    )


#: Registrars of the training commands; the inference commands come from BrainDINOLib.
TRAINING_COMMANDS: tuple[cli.CommandAdder, ...] = (add_data_commands, add_pretrain_command)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, extra_commands=TRAINING_COMMANDS)
