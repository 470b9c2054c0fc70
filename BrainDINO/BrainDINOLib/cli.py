"""Command line for inference and models: ``braindino infer | demo | models``.

Other packages (the training library) add their commands through ``main(extra_commands=...)``,
so the dependency direction stays training -> inference.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .diagnose import separate_python_stderr
from .errors import BrainDINOError
from .progress import CohortBar, ProgressBar, download_progress_lines

CommandAdder = Callable[[argparse._SubParsersAction], None]

# The MNI template voxel used as the demo's similarity query: right putamen.
DEMO_QUERY = (123, 130, 75)


def _voxel(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three integers i,j,k, got '{text}'")
    return values


def _sequence_file(text: str) -> tuple[str, Path]:
    name, _, path = text.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected SEQUENCE=FILE, got '{text}'")
    return name.lower(), Path(path)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle", help="model bundle folder or name (default: the catalogue default; see 'braindino models list')"
    )
    parser.add_argument("--models-dir", type=Path, help="folder of user bundles (default: ~/.braindino/models)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser)
    parser.add_argument(
        "--query",
        type=_voxel,
        metavar="I,J,K",
        help="voxel (file's own i,j,k indices) whose patch feature is compared with every patch: "
        "writes <name>_similarity.nii.gz",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--batch-size", type=int, help="slices per forward pass (default 32 on CPU, 128 on GPU)")
    parser.add_argument(
        "--precision", default="auto",
        help="auto (bf16 on GPUs that have it natively, fp16 on older GPUs and MPS, fp32 on CPU), fp32, bf16 or fp16",
    )  # fmt: skip
    parser.add_argument("--no-report", action="store_true", help="skip report.png")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``infer``, ``demo`` and ``models`` on a subparser set."""
    infer = subparsers.add_parser(
        "infer",
        help="run the encoder on one scan or a cohort and write maps, segmentations and predictions",
        description="Encode every brain slice of SCAN and write, in SCAN's own geometry: <name>_attention.nii.gz, "
        "<name>_pca.nii.gz (RGB), <name>_similarity.nii.gz (with --query), embeddings.safetensors, "
        "result.json and report.png. The bundle's task heads are applied too (see --sequence, --also): their "
        "predictions go to result.json and the report, a segmentation head writes <name>_seg.nii.gz. "
        "SCAN is a NIfTI/MGZ/NRRD/MHA file or a DICOM series folder. "
        "Several SCANs, a folder of scans (every image file and DICOM series inside, recursively), a CSV/TSV "
        "manifest, a BIDS or BraTS folder make a cohort: the model is loaded once, each scan's outputs go to "
        "OUT/<scan name>/, OUT/summary.csv and OUT/summary.json get one row per scan (ok, failed or skipped), a "
        "scan that fails does not stop the others (exit code 1 if any failed), and running the same command "
        "again skips the scans already done.",
    )
    infer.add_argument("scans", type=Path, nargs="+", metavar="SCAN")
    infer.add_argument("-o", "--out-dir", type=Path, required=True, help="output folder (created if missing)")
    infer.add_argument(
        "--dicom-seg",
        action="store_true",
        help="for a DICOM series, also write the segmentations as a DICOM Segmentation object (<name>_seg.dcm) "
        "that references the series",
    )
    infer.add_argument(
        "--force", action="store_true", help="cohorts: redo the scans a previous run finished with the same options"
    )
    infer.add_argument(
        "--cohort",
        action="store_true",
        help="treat the inputs as a cohort even when they are one scan (OUT/<scan name>/ and a summary)",
    )
    infer.add_argument("--volume", type=int, help="volume index of a 4D scan")
    infer.add_argument("--dicom-series", help="SeriesInstanceUID when a DICOM folder holds several series")
    infer.add_argument(
        "--sequence",
        type=str.lower,
        help="SCAN's MRI sequence as the bundle's heads name them (t1, t1ce, t2, flair); "
        "default: what the bundle's sequence head says. A segmentation head fitted on that sequence segments the "
        "scan instead of an any-contrast one. For a manifest: the column to analyse (default: the first of flair, "
        "t1ce, t2, t1 a row has; the row's other sequences feed the heads that read them)",
    )
    infer.add_argument(
        "--also",
        nargs="+",
        type=_sequence_file,
        default=[],
        metavar="SEQUENCE=FILE",
        help="other scans of the same subject, e.g. t1=sub_t1.nii.gz t1ce=sub_t1ce.nii.gz: "
        "heads that read those sequences are applied too",
    )
    infer.add_argument(
        "--keep-blocks",
        choices=("last", "all"),
        default="last",
        help="whose patch tokens embeddings.safetensors keeps: the last block's (default) or every block's, "
        "for PCA and similarity maps of any block made later from the file (the Slicer module keeps all)",
    )
    infer.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="canvas side in pixels for the maps and heads (default: the bundle's, 224 for the shipped ones): 448 "
        "gives a 28 x 28 patch grid instead of 14 x 14 for 3-5x the time; a multiple of the patch size "
        "from 112 to 1024, RoPE (DINOv3-family) encoders only. The brain mask and the out-of-distribution check "
        "stay on the bundle's canvas",
    )
    _add_run_options(infer)
    infer.set_defaults(func=_infer)

    demo = subparsers.add_parser(
        "demo",
        help="run 'infer' on a held-out phantom with a tumour and on the MNI T1 template",
        description="Run the full inference pipeline, with every head of the bundle, on (1) the shipped held-out "
        "phantom subject with a tumour (its FLAIR, with its T1, T1ce and T2 for the heads that read those) and "
        "(2) the real MNI ICBM152 2009a T1 template (shipped in the nilearn package) with a similarity query at "
        f"voxel {DEMO_QUERY}. Writes OUT/phantom/, OUT/mni/ and demo.png (both reports side by side), and prints "
        "the phantom's predictions next to its true labels.",
    )
    demo.add_argument(
        "-o", "--out-dir", type=Path, default=Path("braindino-demo"), help="output folder (default: %(default)s)"
    )
    _add_run_options(demo)
    demo.set_defaults(func=_demo)

    models = subparsers.add_parser(
        "models",
        help="list, download, import and verify model bundles",
        description="Manage model bundles (encoder.safetensors + model.json).",
    )
    actions = models.add_subparsers(dest="action", required=True, metavar="{list,download,import,verify}")
    listing = actions.add_parser("list", help="shipped and user bundles, public encoders and whether they are here")
    listing.add_argument("--models-dir", type=Path)
    listing.set_defaults(func=_models_list)
    imports = actions.add_parser(
        "import",
        help="turn a DINOv2/DINOv3/BrainDINO checkpoint into a bundle",
        description="Convert CHECKPOINT (.pth/.pt/.ckpt read with weights_only=True, or .safetensors) into a bundle. "
        "Accepts Meta's and timm's DINOv2/DINOv3 key layouts and training checkpoints with a 'teacher' "
        "entry (backbone kept, DINO/iBOT heads dropped). The architecture is detected from tensor shapes.",
    )
    imports.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    imports.add_argument("--name", help="bundle name (default: the checkpoint's file name)")
    imports.add_argument("--encoder", help="architecture when it cannot be detected (see 'braindino models list')")
    imports.add_argument("-o", "--out-dir", type=Path, help="bundle folder (default: <models-dir>/<name>)")
    imports.add_argument("--models-dir", type=Path)
    imports.add_argument("--force", action="store_true", help="replace an existing bundle of that name")
    imports.set_defaults(func=_models_import)
    verify = actions.add_parser("verify", help="check every file of a bundle against its sha256")
    verify.add_argument("bundle", metavar="BUNDLE", help="bundle folder or name")
    verify.add_argument("--models-dir", type=Path)
    verify.set_defaults(func=_models_verify)
    download = actions.add_parser(
        "download",
        help="download a public encoder of the catalogue (see 'braindino models list') as a bundle",
        description="Download NAME's weights from the Hugging Face Hub (with huggingface_hub, into a temporary "
        "folder), check their sha256 against the one the Hub publishes for the file, and import them as the bundle "
        "<models-dir>/NAME, which works offline from then on. Without network access, download the file elsewhere "
        "and use 'braindino models import FILE --name NAME'.",
    )
    download.add_argument("name", metavar="NAME")
    download.add_argument("--models-dir", type=Path)
    download.add_argument("--force", action="store_true", help="download and import again, replacing the bundle")
    download.add_argument(
        "--endpoint", help="address of a Hugging Face Hub mirror (default: HF_ENDPOINT, else https://huggingface.co)"
    )
    download.set_defaults(func=_models_download)


def _models_dir(args) -> Path:
    from .bundle import DEFAULT_MODELS_DIR

    return args.models_dir or DEFAULT_MODELS_DIR


def _run_options(args, **choices):
    """The command line's InferenceOptions; ``choices`` override fields."""
    from .infer import InferenceOptions

    options = InferenceOptions(
        bundle=args.bundle,
        models_dir=_models_dir(args),
        device=args.device,
        batch_size=args.batch_size,
        precision=args.precision,
        query=args.query,
        report=not args.no_report,
        volume_index=getattr(args, "volume", None),
        dicom_series=getattr(args, "dicom_series", None),
        sequence=getattr(args, "sequence", None),
        other_scans=dict(getattr(args, "also", [])),
        keep_blocks=getattr(args, "keep_blocks", "last"),
        dicom_seg=getattr(args, "dicom_seg", False),
        image_size=getattr(args, "image_size", None),
    )
    return dataclasses.replace(options, **choices)


def _run(args, scan: Path, out_dir: Path, volume=None, **choices) -> dict:
    """``run_inference`` on one scan (``volume``: already read) with the command line's options; ``choices``
    override InferenceOptions fields."""
    from .infer import run_inference

    options = _run_options(args, **choices)
    others = f" and {len(options.other_scans)} other scan(s)" if options.other_scans else ""
    with ProgressBar(f"encoding {Path(scan).name}{others}", "slice", lines=args.progress_lines,
                     disable=args.quiet) as progress:  # fmt: skip
        result = run_inference(scan, out_dir, options, volume=volume, progress=progress)
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return result


def _infer(args) -> int:
    from .volume import is_single_scan, load_volume

    if not args.cohort and is_single_scan(args.scans):
        # Read before the model's libraries load, so that a bad scan is reported in a second.
        volume = load_volume(args.scans[0], volume_index=args.volume, dicom_series=args.dicom_series)
        result = _run(args, args.scans[0], args.out_dir, volume=volume)
        print(f"wrote {len(result['outputs']) + 1} files to {args.out_dir} in {result['timings_s']['total']:.1f} s")
        return 0
    if args.also:
        raise BrainDINOError("--also names one subject's other scans; for a cohort, give a manifest with a column "
                             "per sequence (t1, t1ce, t2, flair)")  # fmt: skip
    from .batch import find_scans

    jobs = find_scans(args.scans, exclude=args.out_dir, sequence=args.sequence)
    return _cohort(args, jobs)


def _cohort(args, jobs) -> int:
    """Run a cohort; failures are reported as they happen; exit code 1 if any scan failed."""
    from .batch import SUMMARY_CSV, run_cohort

    def failed(job, error: str) -> None:
        print(f"braindino: {job.name}: failed: {error}", file=sys.stderr, flush=True)

    options = _run_options(args)
    with CohortBar(len(jobs), lines=args.progress_lines, disable=args.quiet) as bar:
        rows = run_cohort(jobs, args.out_dir, options, force=args.force, progress=bar, on_failure=failed)
    counts = {status: sum(row["status"] == status for row in rows) for status in ("ok", "skipped", "failed")}
    flagged = sum(bool(row["out_of_distribution"]) for row in rows)
    flags = f"; {flagged} out of distribution" if flagged else ""
    print(f"{len(rows)} scans: {counts['ok']} done, {counts['skipped']} already done, {counts['failed']} failed"
          f"{flags}. Summary: {args.out_dir / SUMMARY_CSV}")  # fmt: skip
    return 1 if counts["failed"] else 0


def _demo(args) -> None:
    from .bundle import find_bundle, read_card
    from .predictions import prediction_text
    from .report import side_by_side
    from .sample_data import demo_phantom, mni_path

    scans, truth = demo_phantom()
    card = read_card(find_bundle(args.bundle, _models_dir(args)))
    read = {m for head in card.heads if head.kind != "seg" for m in head.modalities}
    others = {k: v for k, v in scans.items() if k in read and k != "flair"}  # what the bundle's heads read
    phantom = _run(args, scans["flair"], args.out_dir / "phantom", sequence="flair", other_scans=others, query=None)
    mni = _run(args, mni_path("t1"), args.out_dir / "mni", sequence="t1", query=args.query or DEMO_QUERY)
    print(f"BrainDINO demo, model '{mni['model']['name']}'")
    print(f"1. held-out phantom ({truth['generated']}): FLAIR, with {', '.join(others) or 'no other scan'} for the "
          f"heads reading them, {phantom['timings_s']['total']:.1f} s. prediction | truth")  # fmt: skip
    for name, prediction in phantom["predictions"].items():
        print(f"   {prediction_text(name, prediction)} | {truth_line(prediction, truth)}")
    print(f"2. MNI ICBM152 2009a T1 template ({mni['slices']['analysed']} slices, {mni['timings_s']['total']:.1f} s)")
    for name, prediction in mni["predictions"].items():
        print(f"   {prediction_text(name, prediction)}")
    for title, result, folder in (("phantom", phantom, "phantom"), ("MNI", mni, "mni")):
        print(f"{title} outputs:")
        for name in [*result["outputs"].values(), "result.json"]:
            print(f"  {args.out_dir / folder / name}")
    if not args.no_report:
        side_by_side([args.out_dir / "phantom" / "report.png", args.out_dir / "mni" / "report.png"],
                     args.out_dir / "demo.png")  # fmt: skip
        print(f"both reports: {args.out_dir / 'demo.png'}")


def truth_line(prediction: dict, truth: dict) -> str:
    """The demo phantom's true value of what a head predicts, from its manifest labels."""
    kind, target = prediction["kind"], prediction["target"]
    if kind == "seg":
        parts = {"core": truth["ncr_ml"], "oedema": truth["ed_ml"], "enhancing": truth["et_ml"]}
        return f"{sum(parts.values()):.1f} mL (" + ", ".join(f"{k} {v:.1f} mL" for k, v in parts.items()) + ")"
    if kind == "seq":
        return "flair"
    if target not in truth:
        return "–"
    if kind == "surv":
        outcome = "death" if truth.get("event") == 1 else "censored"
        return f"{truth[target]:g} days ({outcome})"
    return f"{truth[target]} {prediction.get('units', '')}".rstrip()


def _models_list(args) -> None:
    from .bundle import list_bundles, read_card
    from .download import is_present, public_encoders
    from .encoder import ENCODERS

    print("bundles:")
    for name, source, path in list_bundles(_models_dir(args)):
        card = read_card(path)
        label = "RANDOM INIT" if card.random_init else "trained"
        print(f"  {name:<28} {source:<8} {card.encoder.name:<20} {label:<12} {card.description}")
        for head in card.heads:
            print(f"  {'':<28} head {head.name} ({head.kind}, target {head.target})")
    print("\npublic encoders (here: in the models folder; download: 'braindino models download NAME'; access request: "
          "obtain the file as its page says, then 'braindino models import FILE --name NAME'):")  # fmt: skip
    for entry in public_encoders():
        downloadable = "source" in entry
        state = "here" if is_present(entry, _models_dir(args)) else "download" if downloadable else "access request"
        where = f"https://huggingface.co/{entry['source']['repo']}" if downloadable else entry["access"]["url"]
        print(f"  {entry['name']:<28} {state:<14} {entry['encoder']:<20} {entry['license']:<15} {where}")
    print("\nencoder architectures (for 'models import --encoder'):")
    for config in ENCODERS.values():
        print(f"  {config.name:<28} {config.description}")


def _models_import(args) -> None:
    from .importers import bundle_name, import_checkpoint

    out_dir = args.out_dir or _models_dir(args) / bundle_name(args.checkpoint, args.name)
    bundle = import_checkpoint(args.checkpoint, out_dir, encoder_name=args.encoder, overwrite=args.force)
    print(f"imported {args.checkpoint} as {bundle.card.encoder.name} bundle '{bundle.card.name}' at {bundle.path}")


def _models_download(args) -> None:
    from .download import download, download_entry

    bundle = download(
        download_entry(args.name),
        _models_dir(args),
        force=args.force,
        endpoint=args.endpoint,
        tqdm_class=download_progress_lines(args.name) if args.progress_lines else None,
    )
    print(f"downloaded '{args.name}' ({bundle.card.license}) as a {bundle.card.encoder.name} bundle at {bundle.path}; "
          f"use it with --bundle {args.name}")  # fmt: skip


def _models_verify(args) -> None:
    from .bundle import find_bundle, verify_bundle

    path = find_bundle(args.bundle, _models_dir(args))
    problems = verify_bundle(path)
    if problems:
        raise BrainDINOError("; ".join(problems))
    print(f"{path}: every file matches its sha256")


def build_parser(extra_commands: Sequence[CommandAdder] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="braindino",
        description="BrainDINO: a frozen self-supervised ViT encoder for brain MRI, run slice by slice, "
        "with attention, PCA and similarity maps written in the scan's own geometry.",
    )
    parser.add_argument(
        "--progress-lines",
        action="store_true",
        help="report progress as '[progress] STAGE DONE/TOTAL' lines on stderr instead of bars (for programs)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(subparsers)
    for add in extra_commands:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, extra_commands: Sequence[CommandAdder] = ()) -> int:
    """Run one command; user errors print one line and return 2, interruption returns 130 (a cohort with failed
    scans returns 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(extra_commands).parse_args(argv)
    args.command_line = shlex.join(["braindino", *argv])  # recorded in model cards
    with separate_python_stderr():  # readers silence libraries on descriptor 2 while bars and messages go on
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
        try:
            return args.func(args) or 0
        except BrainDINOError as error:
            print(f"braindino: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("braindino: interrupted", file=sys.stderr)
            return 130
