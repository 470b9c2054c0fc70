"""Many scans in one run: find the scans in files, folders and manifests, run `run_inference` on each with one
model load, and keep a summary table that a rerun uses to skip what is done.

``OUT/<scan name>/`` holds each scan's outputs, ``OUT/summary.csv`` and ``OUT/summary.json`` one row per scan
(rewritten after every scan, so an interrupted run leaves a true summary). A scan that fails is a row with its
error; the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import Bundle, find_bundle, load_bundle
from .errors import BrainDINOError, describe
from .featuremaps import TOKENS_FILE
from .infer import InferenceOptions, analysis_spec, input_signature, output_stem, read_scan, run_inference
from .manifest import IMAGE_SUFFIXES, is_mask, load_manifest, manifest_kind
from .predictions import summary_table
from .volume import DICOM_SUFFIXES, NOT_DICOM_SUFFIXES, dicom_series_in, unreadable_dicom

SUMMARY_CSV, SUMMARY_JSON = "summary.csv", "summary.json"
MANIFEST_SUFFIXES = (".csv", ".tsv")
#: Which scan of a manifest row is analysed when ``--sequence`` does not name one (the others feed the heads).
SCAN_PREFERENCE = ("flair", "t1ce", "t2", "t1")

#: ``progress(scan index, scan name, slices done, slices of the scan)`` across a cohort.
CohortProgress = Callable[[int, str, int, int], None]


@dataclass(frozen=True)
class ScanJob:
    """One scan of a cohort.

    Attributes:
        name: its output folder's name (unique in the run).
        path: image file or DICOM series folder.
        sequence: its sequence when the input says (a manifest column); None: ``--sequence`` or the sequence head.
        others: the subject's other sequences (a manifest row), read by the heads that need them.
        dicom_series: the series of a folder that holds several.
        error: why it cannot be run (found while looking for scans), None if it can.
    """

    name: str
    path: Path
    sequence: str | None = None
    others: dict[str, Path] = field(default_factory=dict)
    dicom_series: str | None = None
    error: str | None = None


def find_scans(inputs: Sequence[Path], *, exclude: Path | None = None, sequence: str | None = None) -> list[ScanJob]:
    """The scans of files, folders (every image file and DICOM series inside, recursively; or a dataset that
    `load_manifest` reads: BIDS, BraTS case folders, a folder with ``manifest.csv``) and CSV/TSV manifests.

    Args:
        exclude: a folder not to look in (the run's output folder).
        sequence: the scan column of manifest rows (default: the first of `SCAN_PREFERENCE` a row has).

    Raises:
        BrainDINOError: an input is missing, not an image, folder or manifest, or holds no scan.
    """
    jobs: list[ScanJob] = []
    for path in inputs:
        if not path.exists():
            raise BrainDINOError(f"{path}: no such file or folder")
        path = path.resolve()
        if exclude is not None and (exclude.resolve() == path or exclude.resolve() in path.parents):
            raise BrainDINOError(f"{path}: the output folder {exclude} holds these scans; choose one outside it (-o)")
        if path.is_file() and path.name.lower().endswith(MANIFEST_SUFFIXES):
            found = _manifest_jobs(path, sequence)
        elif path.is_file():
            found = [ScanJob(_clean(output_stem(path)), path)]
        elif manifest_kind(path) != "folder":
            found = _manifest_jobs(path, sequence)
        else:
            found = _folder_jobs(path, exclude)
        if not found:
            raise BrainDINOError(
                f"{path}: no scans found (looked for {', '.join(IMAGE_SUFFIXES)} files and DICOM series)"
            )
        jobs += found
    return _unique_names(jobs)


def _manifest_jobs(source: Path, sequence: str | None) -> list[ScanJob]:
    jobs = []
    for entry in load_manifest(source).entries:
        name = _clean("_".join(filter(None, (entry.subject_id, entry.session))))
        scans = entry.scans
        if not scans:
            jobs.append(ScanJob(name, source, error=f"{source}: subject {entry.subject_id} has no scan, only masks"))
            continue
        chosen = sequence if sequence in scans else next((s for s in SCAN_PREFERENCE if s in scans), None)
        if sequence and chosen != sequence:
            raise BrainDINOError(f"{source}: subject {entry.subject_id} has no {sequence} scan (--sequence)")
        chosen = chosen or next(iter(scans))
        named = {s: p.resolve() for s, p in scans.items() if s in SCAN_PREFERENCE}  # t1, t1ce, t2, flair
        jobs.append(
            ScanJob(
                name=name,
                path=scans[chosen].resolve(),
                sequence=chosen if chosen in named else None,
                others={s: p for s, p in named.items() if s != chosen},
            )
        )
    return jobs


def _folder_jobs(folder: Path, exclude: Path | None) -> list[ScanJob]:
    jobs = []
    skip = exclude.resolve() if exclude else None
    for directory, subdirectories, files in os.walk(folder):
        here = Path(directory)
        if _made_by_braindino(files):  # an earlier run's outputs inside the scans' folder
            subdirectories.clear()
            continue
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith(".") and (here / d).resolve() != skip)
        files = sorted(f for f in files if not f.startswith("."))
        where = here.relative_to(folder).parts
        images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
        scans = [f for f in images if not is_mask(here / f)]
        jobs += [ScanJob(_clean("_".join((*where, output_stem(here / f)))), here / f) for f in scans]
        others = [f for f in files if f not in images and not f.lower().endswith(NOT_DICOM_SUFFIXES)]
        if not others:
            continue
        stem = "_".join(where) or folder.name
        try:
            series = dicom_series_in(here)
        except BrainDINOError as error:
            jobs.append(ScanJob(_clean(stem), here, error=str(error)))
            continue
        for uid in series:
            jobs.append(ScanJob(_clean(stem if len(series) == 1 else f"{stem}_{uid[-8:]}"), here, dicom_series=uid))
        unread = [f for f in others if f.lower().endswith(DICOM_SUFFIXES)]
        if not series and unread:
            jobs.append(ScanJob(_clean(stem), here, error=unreadable_dicom(here, unread)))
    return jobs


def _made_by_braindino(files: list[str]) -> bool:
    """A folder of `run_cohort` (its summary) or of one scan's outputs (result and tokens)."""
    return SUMMARY_JSON in files or {"result.json", TOKENS_FILE} <= set(files)


def _clean(name: str) -> str:
    """A scan's name as a folder name of the output folder (never a path outside it)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "scan"


def _unique_names(jobs: list[ScanJob]) -> list[ScanJob]:
    """Names made unique (ignoring case): a repeated name gets the first free ``-2``, ``-3``, ..."""
    taken, unique = set(), []
    for job in jobs:
        name, count = job.name, 1
        while name.lower() in taken:
            count += 1
            name = f"{job.name}-{count}"
        taken.add(name.lower())
        unique.append(dataclasses.replace(job, name=name))
    return unique


def job_options(options: InferenceOptions, job: ScanJob) -> InferenceOptions:
    """A cohort's options as one scan runs with them."""
    return dataclasses.replace(
        options,
        sequence=job.sequence or options.sequence,
        other_scans=job.others,
        dicom_series=job.dicom_series or options.dicom_series,
    )


def previous_result(folder: Path, bundle: Bundle, options: InferenceOptions, job: ScanJob) -> dict | None:
    """The scan's ``result.json`` when a run with the same model, options and input wrote every output there."""
    try:
        result = json.loads((folder / "result.json").read_text())
        same = (
            result["model"]["sha256"] == bundle.card.files
            and result["options"] == options.record()
            and result["input"]["path"] == str(job.path)
            and result["input"]["signature"] == input_signature(job.path, *job.others.values())
        )
        complete = all((folder / name).is_file() for name in result["outputs"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return result if same and complete else None


def run_cohort(
    jobs: Sequence[ScanJob],
    out_dir: Path,
    options: InferenceOptions,
    *,
    force: bool = False,
    progress: CohortProgress | None = None,
    on_failure: Callable[[ScanJob, str], None] | None = None,
) -> list[dict]:
    """Run every scan into ``out_dir/<name>/`` and write the summary; returns its rows.

    The model is loaded once; while one scan is encoded the next is read. A scan whose outputs a run with the
    same model, options and input left is ``skipped`` (unless ``force``); one that fails is ``failed`` with its
    error and the run goes on. The summary is rewritten after each scan.

    Raises:
        BrainDINOError: the model cannot be loaded, does not take ``options.image_size``, or ``out_dir`` cannot be
            written.
    """
    bundle = load_bundle(find_bundle(options.bundle, options.models_dir))
    analysis_spec(bundle.card, options.image_size)  # a bad size fails once, not for every scan
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BrainDINOError(f"{out_dir}: cannot write outputs there ({describe(error)})") from error
    plans = [(job, job_options(options, job)) for job in jobs]
    done = {
        job.name: previous
        for job, chosen in plans
        if not force and not job.error and (previous := previous_result(out_dir / job.name, bundle, chosen, job))
    }
    to_read = [(job, chosen) for job, chosen in plans if job.name not in done and not job.error]
    rows: list[dict] = []
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-next-scan")
    try:
        reads: dict[str, Future] = {}

        def read_ahead(position: int) -> None:
            if position < len(to_read):
                job, chosen = to_read[position]
                reads[job.name] = reader.submit(read_scan, job.path, chosen)

        read_ahead(0)
        position = 0
        for index, (job, chosen) in enumerate(plans):
            clock = time.perf_counter()
            if job.error:
                row = _row(job, "failed", error=job.error)
            elif job.name in done:
                row = _row(job, "skipped", result=done[job.name])
            else:
                position += 1
                read_ahead(position)  # the next scan is read while this one is encoded
                try:
                    volume = reads.pop(job.name).result()
                    _clear_previous(out_dir / job.name)
                    scan_progress = None if progress is None else _scan_progress(progress, index, job.name)
                    result = run_inference(
                        job.path, out_dir / job.name, chosen, bundle=bundle, volume=volume, progress=scan_progress
                    )
                    row = _row(job, "ok", result=result)
                except BrainDINOError as error:
                    row = _row(job, "failed", error=str(error))
                except Exception as error:  # one scan's unforeseen failure must not end the cohort
                    row = _row(job, "failed", error=f"{job.path}: {type(error).__name__}: {describe(error)}")
            row["seconds"] = round(time.perf_counter() - clock, 3)
            if row["status"] == "failed" and on_failure:
                on_failure(job, row["error"])
            rows.append(row)
            write_summary(out_dir, rows, bundle)
            if progress is not None:
                progress(index, job.name, 1, 1)
    finally:  # interrupted: the scan being read ahead is dropped, not waited for
        reader.shutdown(wait=False, cancel_futures=True)
    return rows


def _clear_previous(folder: Path) -> None:
    """Remove an earlier run's outputs of a scan done again, so that no file of another run lingers beside the new."""
    try:
        outputs = list(json.loads((folder / "result.json").read_text())["outputs"].values())
    except (OSError, ValueError, KeyError, AttributeError):
        return
    for name in [*outputs, "result.json"]:
        (folder / Path(name).name).unlink(missing_ok=True)


def _scan_progress(progress: CohortProgress, index: int, name: str):
    return lambda done, total: progress(index, name, done, total)


def _row(job: ScanJob, status: str, *, result: dict | None = None, error: str = "") -> dict:
    result = result or {}
    return {
        "scan": job.name,
        "status": status,
        "error": error,
        "input": str(job.path),
        "outputs": job.name if result else "",
        "sequence": result.get("sequence"),
        "out_of_distribution": result.get("out_of_distribution"),
        "ood_score": result.get("ood_score"),
        "ood_threshold": result.get("ood_threshold"),
        "predictions": result.get("predictions", {}),
        "slices": result.get("slices", {}).get("analysed"),
        "timings_s": result.get("timings_s", {}),
        "warnings": result.get("warnings", []),
    }


def write_summary(out_dir: Path, rows: list[dict], bundle: Bundle) -> None:
    """``summary.json`` (the rows in full) and ``summary.csv`` (`predictions.summary_table`), each replaced
    atomically."""
    document = {"model": {"name": bundle.card.name, "path": str(bundle.path)}, "scans": rows}
    _replace(out_dir / SUMMARY_JSON, lambda handle: handle.write(json.dumps(document, indent=2) + "\n"))
    columns = summary_table(rows)

    def write_csv(handle) -> None:
        import csv

        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(zip(*columns.values(), strict=True))

    _replace(out_dir / SUMMARY_CSV, write_csv)


def _replace(path: Path, write) -> None:
    staging = path.with_name(f".{path.name}.partial")
    with open(staging, "w", newline="", encoding="utf-8") as handle:
        write(handle)
    os.replace(staging, path)
