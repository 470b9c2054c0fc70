"""The ``braindino`` console script: the inference commands plus this library's training commands."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from BrainDINOLib import cli
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.progress import ProgressBar

from .objectives import TITLES


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """``cohort make`` and ``index``."""
    cohort = subparsers.add_parser("cohort", help="labelled phantom cohorts derived from the MNI template")
    actions = cohort.add_subparsers(dest="action", required=True, metavar="{make}")
    make = actions.add_parser(
        "make",
        help="write N whole-head phantom subjects (T1, T1ce, T2, FLAIR, lesion mask, brain mask) and manifest.csv",
        description="Generate N labelled phantom subjects from the real MNI ICBM152 template: whole heads (CSF rim, "
        "skull, scalp, eyes, sinuses, neck) in four contrasts (T1ce with dural and vessel enhancement), gliomas with "
        "mass effect or 1-5 metastases with BraTS labels (60 % of subjects), age- and diagnosis-dependent atrophy, "
        "and clinical acquisitions: axial/sagittal/coronal planes, 1-7 mm slices, 0.5-1.5 mm in-plane, random "
        "field of view, bias field, Rician noise, Gibbs ringing, motion ghosts, varied on-disk orientation. "
        "Each subject also gets its brain mask. manifest.csv lists age, sex, diagnosis-like class, GM/WM/CSF "
        "volumes, lesion type, count and volumes, a molecular-status-like marker and survival time/event. "
        "Deterministic by --seed.",
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
        "--skull-stripped",
        type=float,
        nargs="?",
        const=1.0,
        default=0.0,
        metavar="SHARE",
        help="cut the images to the brain mask (background exactly 0), like BraTS data: every subject, or the "
        "given share of subjects (e.g. 0.25)",
    )
    make.add_argument(
        "--random-contrasts",
        type=int,
        default=0,
        metavar="K",
        help="also write K images per subject in which every tissue, lesion compartment and head tissue has a "
        "random intensity (SynthSeg-style; manifest columns random1..K), for contrast-agnostic training "
        "(default %(default)s)",
    )
    make.add_argument(
        "--tumor-fraction",
        type=float,
        default=0.6,
        help="share of subjects with a lesion (default %(default)s)",
    )
    make.add_argument(
        "--metastasis-share",
        type=float,
        default=0.3,
        help="share of lesions that are metastases, the others gliomas (default %(default)s)",
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
        "--init continues from earlier weights (an imported DINOv3, an earlier run's bundle); with gram.weight > 0\n"
        "DINOv3's Gram anchoring keeps the dense features close to a Gram teacher's (the --init weights by default).\n"
        "The reference recipe's three stages: configs braindino-stage1, -stage2-gram, -stage3-highres.\n"
        "Many GPUs: torchrun --nproc_per_node=N -m BrainDINOTrainingLib pretrain ... (batch_size is global).",
    )
    pretrain.add_argument(
        "--config",
        default="tiny-cpu",
        help="a shipped config (tiny-cpu, the default; vit-s16; vit-b16-braindino; braindino-stage1, "
        "braindino-stage2-gram, braindino-stage3-highres and their tiny-stage* CPU versions) or a YAML file",
    )
    pretrain.add_argument(
        "--init",
        metavar="BUNDLE|CHECKPOINT",
        help="start every ViT of the objective from these weights (a bundle name or folder, e.g. an imported "
        "DINOv3 or a run's bundle/, or a checkpoint file); projection heads start fresh, and the encoder "
        "architecture is the weights'",
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
    pretrain.add_argument(
        "--precision",
        help="auto (bf16 on GPUs that have it natively, fp16 with loss scaling on older GPUs and MPS, fp32 on CPU), "
        "fp32, bf16 or fp16 (default: the config's); a resume may change it, and --device",
    )
    pretrain.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR from its checkpoint")
    pretrain.set_defaults(func=_pretrain)


def _pretrain(args) -> None:
    from .trainer import Trainer, load_config

    overrides = {"data": args.data, "out_dir": args.out_dir, "device": args.device, "precision": args.precision,
                 "objective": args.objective, "init": args.init}  # fmt: skip
    config = load_config(args.config, overrides, args.set)
    if not config.data:
        raise BrainDINOError("no data: pass --data INDEX (a folder made by 'braindino index')")
    trainer = Trainer(config)
    try:
        with ProgressBar("pretraining", "step", lines=args.progress_lines) as progress:
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
    finally:
        trainer.close()
    if trainer.rank == 0:
        bundle = trainer.export(Path(config.out_dir) / "bundle", command=args.command_line)
        print(f"trained {trainer.step} steps; checkpoint and log in {config.out_dir}; encoder exported to {bundle}")


def _cohort_make(args) -> None:
    from .phantoms import CohortOptions, make_cohort

    options = CohortOptions(args.skull_stripped, args.random_contrasts, args.tumor_fraction, args.metastasis_share)
    with ProgressBar("phantoms", "subject", lines=args.progress_lines) as progress:
        manifest = make_cohort(
            args.count,
            args.out_dir,
            seed=args.seed,
            resolution=args.resolution,
            workers=args.workers,
            options=options,
            progress=progress,
        )
    print(f"wrote {args.count} phantom subjects and {manifest}")


def _index(args) -> None:
    from BrainDINOLib.preprocess import PreprocessSpec

    from .slice_index import build_index

    spec = PreprocessSpec(
        image_size=args.image_size, min_entropy=args.min_entropy, position_range=tuple(args.position_range)
    )
    with ProgressBar("indexing", "volume", lines=args.progress_lines) as progress:
        info = build_index(args.data, args.out_dir, spec, workers=args.workers, progress=progress)
    print(
        f"indexed {info['volumes']} volumes ({info['volumes_skipped']} skipped, listed in volumes.json): "
        f"kept {info['slices_kept']} of {info['slices_seen']} slices, "
        f"{info['bytes_per_slice'] / 1024:.0f} KiB per slice ({info['gb_per_million_slices']} GB per million) "
        f"in {args.out_dir}"
    )


def add_head_commands(subparsers: argparse._SubParsersAction) -> None:
    """``fit-head``."""
    fit = subparsers.add_parser(
        "fit-head",
        help="fit a task head on the frozen encoder and measure it under label scarcity",
        description="Fit a head on a manifest's scans with the bundle's frozen encoder: seg (a tumour "
        "segmentation decoder on multi-layer patch tokens of the given sequences, BraTS labels 1/2/3 from the "
        "manifest's seg masks; Dice and HD95; '--sequence any' makes every scan a sample and gives a head that "
        "reads any contrast), brain (a brain-mask decoder from the manifest's brain_mask column, on every scan of "
        "whole heads: infer then analyses, normalises and shows the brain only), or a volume head (cls: classes of "
        "a label column; reg: a "
        "number such as age; surv: time to event; seq: MRI sequence type). "
        "Subjects are split train/val/test (60/20/20, by subject); each label fraction keeps that share "
        "of the training subjects, each seed draws it anew. The head (and for volume heads linear, kNN and "
        "majority/mean baselines) is measured on the test subjects; the table goes to REPORT (metrics.md, .csv, .png, "
        "and kaplan_meier.png for surv). The head fitted on the largest fraction with the first seed is "
        "stored in the bundle (heads/NAME.safetensors + model.json) and used by 'braindino infer'. "
        "Encoder features are cached per scan (see --cache).",
    )
    fit.add_argument("--task", required=True, choices=["seg", "brain", "cls", "reg", "surv", "seq"])
    fit.add_argument("--manifest", required=True, help="manifest table, folder with manifest.csv, BIDS or BraTS")
    fit.add_argument("--target", default="", help="label column (cls: required; reg: age; surv: survival_days)")
    fit.add_argument("--event", default="event", help="surv: event column, 1 = observed (default %(default)s)")
    fit.add_argument("--bundle", help="model bundle (default: the shipped default; then -o is required)")
    fit.add_argument("-o", "--out-bundle", type=Path, help="write a copy of the bundle with the head here")
    fit.add_argument("--name", help="head name (default: the target, or 'sequence')")
    fit.add_argument(
        "--sequence",
        "--modality",  # its former name, still accepted
        nargs="+",
        help="MRI sequences read per subject (default: t1; seg: flair; several are fused; seg: 'any' = every scan "
        "alone); --modality is the former name of this option",
    )
    fit.add_argument("--aggregation", choices=["mean", "attention"], default="mean", help="slice pooling")
    fit.add_argument(
        "--label-values", nargs="+", type=int, default=[1, 2, 3], help="seg: mask values (BraTS 2021: 1 2 4)"
    )
    fit.add_argument("--label-fraction", nargs="+", type=float, default=[1.0], help="e.g. 0.01 0.1 1.0")
    fit.add_argument("--seeds", nargs="+", type=int, default=[0], help="e.g. 0 1 2")
    fit.add_argument("--epochs", type=int, help="volume heads: full-batch epochs (default 300)")
    fit.add_argument(
        "--steps", type=int, help="seg: optimizer steps of 16 slices, the same at every label fraction (default 1000)"
    )
    fit.add_argument(
        "--slices-per-scan",
        type=int,
        help="seg, brain: training slices kept per scan, evenly spaced (default: all; brain and '--sequence any': "
        "24, to bound memory)",
    )
    fit.add_argument(
        "--image-channels",
        type=int,
        help="seg, brain: the decoder also reads the canvas pixels through a convolutional pyramid this wide at "
        "full resolution (e.g. 16): sharper boundaries, thin enhancing rims; several times the CPU time a step "
        "(default 0: patch tokens alone)",
    )
    fit.add_argument(
        "--lesion-share",
        type=float,
        help="seg: share of each batch of 16 slices drawn from slices that hold a lesion (default 0: drawn "
        "uniformly from all slices, where a lesion fills few)",
    )
    fit.add_argument(
        "--thumbnails",
        action="store_true",
        help="volume heads: each slice's embedding is followed by its 16 x 16 thumbnail (the canvas averaged "
        "down), so the head reads the slice's intensities too; the sequence head gains most (default: the "
        "embeddings alone, which compares encoders)",
    )
    fit.add_argument("--report", type=Path, help="report folder (default reports/NAME)")
    fit.add_argument("--cache", type=Path, help="feature cache folder (default ~/.braindino/cache/features)")
    fit.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    fit.set_defaults(func=_fit_head)


def _fit_head(args) -> None:
    from BrainDINOLib.brain import BRAIN_CLASSES, BRAIN_TARGET
    from BrainDINOLib.bundle import add_head, load_bundle
    from BrainDINOLib.manifest import load_manifest

    from .features import FeatureCache
    from .fit_heads import FitOptions, fit_and_evaluate
    from .fit_segmentation import BRATS_CLASSES, SegOptions, default_layers, fit_and_evaluate_segmentation
    from .head_report import write_report

    source = _checked_bundle(args)
    decoder = args.task in ("seg", "brain")
    if (decoder and args.epochs) or (not decoder and (args.steps or args.slices_per_scan or args.image_channels)):
        raise BrainDINOError(
            "--steps, --slices-per-scan and --image-channels set segmentation training, --epochs volume-head training"
        )
    if (args.image_channels or 0) < 0:
        raise BrainDINOError(f"--image-channels must be 0 or more, got {args.image_channels}")
    if not 0 <= (args.lesion_share or 0) < 1:
        raise BrainDINOError(f"--lesion-share must be at least 0 and below 1, got {args.lesion_share}")
    if args.lesion_share and args.task != "seg":
        raise BrainDINOError("--lesion-share applies to --task seg only")
    if args.thumbnails and decoder:
        raise BrainDINOError("--thumbnails applies to volume heads (cls, reg, surv, seq); decoders read the pixels "
                             "with --image-channels")  # fmt: skip
    manifest, bundle = load_manifest(args.manifest), load_bundle(source)
    if decoder:
        values = (1,) if args.task == "brain" else tuple(args.label_values)
        modalities = () if args.task == "brain" or args.sequence == ["any"] else tuple(args.sequence or ("flair",))
        options = SegOptions(
            modalities=modalities,
            target=BRAIN_TARGET if args.task == "brain" else "seg",
            slices_per_scan=args.slices_per_scan if args.slices_per_scan is not None else (0 if modalities else 24),
            label_values=values,
            classes=BRAIN_CLASSES if args.task == "brain" else BRATS_CLASSES if len(values) == 3
            else tuple(f"label {v}" for v in values),
            label_fractions=tuple(args.label_fraction),
            seeds=tuple(args.seeds),
            steps=args.steps or SegOptions.steps,
            image_channels=args.image_channels or 0,
            lesion_share=args.lesion_share or 0.0,
        )  # fmt: skip
        name = args.name or ("brain" if args.task == "brain" else "tumor")
        layers = default_layers(bundle.card.encoder.depth)
        cache = FeatureCache(bundle, args.cache, layers, args.device, masked=args.task != "brain")
        fit = fit_and_evaluate_segmentation
    else:
        options = FitOptions(
            task=args.task,
            target=args.target,
            event=args.event,
            modalities=tuple(args.sequence or FitOptions.modalities),
            aggregation=args.aggregation,
            label_fractions=tuple(args.label_fraction),
            seeds=tuple(args.seeds),
            epochs=args.epochs or FitOptions.epochs,
            thumbnails=args.thumbnails,
        )
        name = args.name or options.target or ("sequence" if options.task == "seq" else options.column)
        cache = FeatureCache(bundle, args.cache, device=args.device)
        fit = fit_and_evaluate
    with (
        ProgressBar("features", "scan", lines=args.progress_lines) as progress,
        ProgressBar("decoder", "step", lines=args.progress_lines) as steps,
    ):
        extra = {"training_progress": steps} if decoder else {}
        result = fit(manifest, cache, options, name, progress=progress, **extra)
    target = _changed_bundle(args, source)
    training = dataclasses.replace(result.spec.training, command=args.command_line)
    add_head(target, dataclasses.replace(result.spec, training=training), result.head)
    written = write_report(result, args.report or Path("reports") / name)
    print((Path(written[1])).read_text())
    print(f"head '{name}' stored in {target}; report in {written[0].parent}")


def add_evaluate_command(subparsers: argparse._SubParsersAction) -> None:
    """``evaluate``."""
    evaluate = subparsers.add_parser(
        "evaluate",
        help="measure a bundle's heads on a manifest",
        description="Score every head of a bundle (or --head NAME ...) on the test subjects of the split it was "
        "fitted with, or with --all-subjects on every subject of another dataset. Writes metrics.md and "
        "metrics.csv (one row per head and metric) to REPORT.",
    )
    evaluate.add_argument("--bundle", help="model bundle (default: the shipped default)")
    evaluate.add_argument("--manifest", required=True, help="manifest table, folder with manifest.csv, BIDS or BraTS")
    evaluate.add_argument("--head", nargs="+", default=[], help="only these heads")
    evaluate.add_argument("--all-subjects", action="store_true", help="score every subject (an external dataset)")
    evaluate.add_argument("--report", type=Path, default=Path("reports") / "evaluation", help="report folder")
    evaluate.add_argument("--cache", type=Path, help="feature cache folder (default ~/.braindino/cache/features)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    evaluate.set_defaults(func=_evaluate)


def _evaluate(args) -> None:
    import csv

    from BrainDINOLib.bundle import find_bundle, load_bundle
    from BrainDINOLib.manifest import load_manifest

    from .evaluation import evaluate_bundle

    bundle = load_bundle(find_bundle(args.bundle))
    manifest = load_manifest(args.manifest)
    with ProgressBar("features", "volume", lines=args.progress_lines) as progress:
        rows = evaluate_bundle(
            bundle, manifest, args.cache, args.device, args.all_subjects, tuple(args.head), progress=progress
        )
    args.report.mkdir(parents=True, exist_ok=True)
    with open(args.report / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    subjects = "every subject" if args.all_subjects else "the test subjects of each head's split"
    lines = [
        f"# {bundle.card.name} on {manifest.source} ({subjects})",
        "",
        "| head | kind | samples | metric | value |",
    ]
    lines += ["| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['head']} | {r['kind']} | {r['samples']} | {r['metric']} | {r['value']:.3f} |" for r in rows]
    (args.report / "metrics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"report in {args.report}")


def add_calibrate_command(subparsers: argparse._SubParsersAction) -> None:
    """``calibrate``."""
    calibrate = subparsers.add_parser(
        "calibrate",
        help="fit the out-of-distribution warning on training data (reference slices, outlier classifier)",
        description="Encode every scan of DATA whole, as the first pass of 'braindino infer' sees it; keep their "
        "slice embeddings and 16 x 16 slice thumbnails as the bundle's reference (ood.safetensors); fit a small "
        "perceptron (one hidden layer) to tell those slices from procedural images that are not head MRI (dead leaves, "
        "1/f fields, eroded terrain relief, gratings, text-like pages, textured objects: no photograph or real map is "
        "used); set a threshold per channel from held-out subjects "
        "(MARGIN x the largest held-out score; the classifier's at least 0.5). 'braindino infer' then scores every "
        "scan and flags it as out of distribution when a channel exceeds its threshold. Run it after the last head is "
        "added (a new brain-mask head makes the reference stale).",
    )
    calibrate.add_argument("--manifest", required=True, help="training-like data: manifest, folder, BIDS or BraTS")
    calibrate.add_argument("--bundle", help="model bundle (default: the shipped default; then -o is required)")
    calibrate.add_argument("-o", "--out-bundle", type=Path, help="write a calibrated copy of the bundle here")
    calibrate.add_argument("--k", type=int, default=10, help="nearest reference slices per slice (default %(default)s)")
    calibrate.add_argument("--margin", type=float, default=1.5, help="threshold factor (default %(default)s)")
    calibrate.add_argument(
        "--outliers", type=int, default=240, help="procedural non-MRI volumes for the classifier (default %(default)s)"
    )
    calibrate.add_argument("--cache", type=Path, help="feature cache folder (default ~/.braindino/cache/features)")
    calibrate.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    calibrate.set_defaults(func=_calibrate)


def _checked_bundle(args) -> Path:
    """The bundle a command reads (``--bundle``); it will change it, or its copy at ``-o`` (`_changed_bundle`).

    Raises:
        BrainDINOError: the bundle ships with BrainDINO and no copy was asked for, or the copy's folder exists.
    """
    from BrainDINOLib.bundle import CATALOG_DIR, find_bundle

    source = find_bundle(args.bundle)
    if args.out_bundle is None and source.resolve().is_relative_to(CATALOG_DIR.resolve()):
        raise BrainDINOError(f"{source} ships with BrainDINO and stays unchanged: pass -o NEW_BUNDLE for a copy")
    if args.out_bundle is not None and args.out_bundle.exists():
        raise BrainDINOError(f"{args.out_bundle}: already exists (choose another folder)")
    return source


def _changed_bundle(args, source: Path) -> Path:
    """Once the work is done: the copy at ``-o`` (made now), else the source itself."""
    import shutil

    if args.out_bundle is None:
        return source
    shutil.copytree(source, args.out_bundle)
    return args.out_bundle


def _calibrate(args) -> None:
    from BrainDINOLib.bundle import load_bundle, set_typicality
    from BrainDINOLib.manifest import load_manifest

    from .calibration import CalibrationOptions, calibrate_typicality
    from .features import FeatureCache

    source = _checked_bundle(args)
    manifest = load_manifest(args.manifest)
    cache = FeatureCache(load_bundle(source), args.cache, device=args.device, masked=False)  # whole scans
    with ProgressBar("features", "volume", lines=args.progress_lines) as progress:
        options = CalibrationOptions(k=args.k, margin=args.margin, outliers=args.outliers)
        typicality, info = calibrate_typicality(manifest, cache, options, progress=progress)
    target = _changed_bundle(args, source)
    set_typicality(target, typicality, {**info, "command": args.command_line})
    for channel, scores in info["held_out_scores"].items():
        print(
            f"{channel}: threshold {typicality.thresholds[channel]:.4f} (held-out scans: median score "
            f"{scores['median']:.4f}, largest {scores['max']:.4f})"
        )
    print(
        f"{target}: calibrated on {info['scans']} scans; reference of {info['reference_slices']} slices; classifier "
        f"against {info['outlier_slices']} slices of {info['outlier_volumes']} procedural non-MRI volumes"
    )


#: Registrars of the training commands; the inference commands come from BrainDINOLib.
TRAINING_COMMANDS: tuple[cli.CommandAdder, ...] = (
    add_data_commands,
    add_pretrain_command,
    add_head_commands,
    add_evaluate_command,
    add_calibrate_command,
)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, extra_commands=TRAINING_COMMANDS)
