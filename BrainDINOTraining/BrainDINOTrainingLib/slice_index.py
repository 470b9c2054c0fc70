"""Slice index and cache for pretraining at scale, and a `SliceDataset` that streams from it.

``build_index`` records every axial slice of every volume (volume, slice, relative position in
the brain extent, entropy, foreground fraction, kept by the filters) and writes the kept slices,
preprocessed exactly as for inference (`BrainDINOLib.preprocess`) and stored as float16 canvases,
into one memory-mappable ``.npy`` shard per volume. Volumes are processed in parallel; each shard
and its record appear atomically, so an interrupted build resumes where it stopped and gives the
same files as an uninterrupted one. Unreadable volumes are skipped and listed, never fatal.

Layout of an index folder::

    index.json        format, preprocessing spec (with the filter thresholds), counts
    volumes.json      one entry per volume: path, shard, slices, kept, status, numeric labels
    slices.npy        structured array, one row per slice of every volume (`RECORD_DTYPE`)
    shards/NNNNNN.npy (kept slices, canvas, canvas) float16 per volume
    records/          per-volume work records (kept for resuming)
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from BrainDINOLib import __version__
from BrainDINOLib.diagnose import LibraryOutput
from BrainDINOLib.errors import BrainDINOError, from_fields, read_json
from BrainDINOLib.files import atomic_write
from BrainDINOLib.manifest import load_manifest
from BrainDINOLib.preprocess import PreprocessSpec, prepare
from BrainDINOLib.volume import load_volume

logger = logging.getLogger(__name__)

INDEX_FORMAT = 2  # 2: volumes.json holds each volume's numeric labels
RECORD_DTYPE = np.dtype(
    [
        ("volume", "<i4"),
        ("slice", "<i4"),
        ("position", "<f4"),
        ("entropy", "<f4"),
        ("foreground", "<f4"),
        ("kept", "?"),
        ("row", "<i4"),
    ]
)
SHARD_DTYPE = np.float16


@dataclass(frozen=True)
class IndexJob:
    volume: int
    path: str
    folder: str
    spec: dict
    labels: dict


def _save_array(array: np.ndarray, path: Path) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def index_volume(job: IndexJob) -> dict:
    """Index one volume and write its shard and record; returns the record's summary."""
    folder = Path(job.folder)
    record_path = folder / "records" / f"{job.volume:06d}.json"
    shard = f"shards/{job.volume:06d}.npy"
    summary = {"volume": job.volume, "path": job.path, "shard": None, "slices": 0, "kept": 0, "status": "ok"}
    summary["labels"] = job.labels
    spec = PreprocessSpec.from_dict(job.spec)
    try:
        volume = load_volume(job.path)
        prepared = prepare(volume, spec)
        kept = prepared.slices
    except BrainDINOError as error:
        summary.update(status="skipped", reason=str(error))
        records = np.zeros(0, RECORD_DTYPE)
    else:
        depth = volume.data.shape[2]
        records = np.zeros(depth, RECORD_DTYPE)
        records["volume"], records["slice"] = job.volume, np.arange(depth)
        records["position"] = np.nan_to_num(prepared.position, nan=-1.0)
        records["entropy"], records["foreground"] = prepared.entropy, prepared.foreground_fraction
        records["kept"][kept] = True
        records["row"] = -1
        records["row"][kept] = np.arange(len(kept))
        with torch.no_grad():
            canvases = prepared.model_input(kept)[:, 0].numpy().astype(SHARD_DTYPE)
        _save_array(canvases, folder / shard)
        summary.update(shard=shard, slices=int(depth), kept=int(len(kept)))
    _save_array(records, folder / "records" / f"{job.volume:06d}.npy")
    with atomic_write(record_path) as tmp:  # written last: its presence means the volume is done
        tmp.write_text(json.dumps(summary))
    return summary


def _worker_init() -> None:
    torch.set_num_threads(1)  # one process per core


def collect_volumes(sources: Sequence[str | Path]) -> dict[Path, dict[str, float]]:
    """Image files of every dataset given (manifests, folders, BIDS, BraTS), masks excluded, de-duplicated,
    each with its scan's numeric labels (subject descriptors such as age for weakly-supervised objectives)."""
    volumes: dict[Path, dict[str, float]] = {}
    for source in sources:
        for entry in load_manifest(source).entries:
            numeric = {k: float(v) for k, v in entry.labels.items() if isinstance(v, int | float)}
            for path in entry.scans.values():
                volumes.setdefault(path.resolve(), numeric)
    return volumes


def build_index(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    spec: PreprocessSpec | None = None,
    *,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    stop_after: int | None = None,
) -> dict:
    """Build (or resume) an index; returns the contents of ``index.json``.

    Args:
        sources: datasets (anything `load_manifest` reads).
        out_dir: index folder; an unfinished index there with the same inputs and spec is resumed.
        spec: preprocessing, including the entropy and position filters (default `PreprocessSpec()`).
        workers: processes working on volumes in parallel.
        progress: called as ``progress(volumes_done, volumes_total)``.
        stop_after: stop after this many newly indexed volumes (an interruption, for tests and
            for splitting long builds across sessions).

    Raises:
        BrainDINOError: no inputs, or an existing index built from other inputs or settings.
    """
    out_dir = Path(out_dir)
    spec = spec or PreprocessSpec()
    labels = collect_volumes(sources)
    volumes = list(labels)
    if not volumes:
        raise BrainDINOError("no volumes to index")
    labels_digest = hashlib.sha256(json.dumps([labels[p] for p in volumes], sort_keys=True).encode()).hexdigest()
    config = {
        "format": INDEX_FORMAT,
        "preprocessing": spec.to_dict(),
        "volumes": [str(p) for p in volumes],
        "labels_sha256": labels_digest,  # changed manifest labels make another index, never a stale one
    }
    config = json.loads(json.dumps(config))  # as it reads back from config.json
    config_path = out_dir / "config.json"
    if config_path.is_file():
        if json.loads(config_path.read_text()) != config:
            raise BrainDINOError(
                f"{out_dir}: holds an index of other volumes, labels or settings (or an older format); "
                "choose a new folder"
            )
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(config, indent=1))
    (out_dir / "shards").mkdir(exist_ok=True)
    (out_dir / "records").mkdir(exist_ok=True)
    done = {i for i in range(len(volumes)) if (out_dir / "records" / f"{i:06d}.json").is_file()}
    todo = [
        IndexJob(i, str(p), str(out_dir), spec.to_dict(), labels[p]) for i, p in enumerate(volumes) if i not in done
    ]
    if stop_after is not None:
        todo = todo[:stop_after]
    finished = len(done)
    if progress:
        progress(finished, len(volumes))
    if workers > 1 and len(todo) > 1:
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
            for _ in pool.imap_unordered(index_volume, todo):
                finished += 1
                if progress:
                    progress(finished, len(volumes))
    else:
        for job in todo:
            index_volume(job)
            finished += 1
            if progress:
                progress(finished, len(volumes))
    if finished < len(volumes):
        return {"complete": False, "volumes_done": finished, "volumes": len(volumes)}
    return _finalize(out_dir, volumes, spec)


def _finalize(out_dir: Path, volumes: list[Path], spec: PreprocessSpec) -> dict:
    summaries = [json.loads((out_dir / "records" / f"{i:06d}.json").read_text()) for i in range(len(volumes))]
    records = np.concatenate([np.load(out_dir / "records" / f"{i:06d}.npy") for i in range(len(volumes))])
    _save_array(records, out_dir / "slices.npy")
    (out_dir / "volumes.json").write_text(json.dumps(summaries, indent=1) + "\n")
    kept = int(records["kept"].sum())
    bytes_per_slice = spec.image_size**2 * np.dtype(SHARD_DTYPE).itemsize
    index = {
        "format": INDEX_FORMAT,
        "complete": True,
        "braindino_version": __version__,
        "preprocessing": spec.to_dict(),
        "filters": {
            "min_entropy": spec.min_entropy,
            "position_range": list(spec.position_range),
            "min_foreground_fraction": spec.min_foreground_fraction,
        },
        "volumes": len(volumes),
        "volumes_skipped": sum(s["status"] != "ok" for s in summaries),
        "slices_seen": int(len(records)),
        "slices_kept": kept,
        "shard_dtype": np.dtype(SHARD_DTYPE).name,
        "bytes_per_slice": bytes_per_slice,
        "gb_per_million_slices": round(bytes_per_slice * 1e6 / 1e9, 1),
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


@dataclass(frozen=True)
class IndexedVolume:
    """One entry of ``volumes.json``."""

    volume: int
    path: str
    shard: str | None
    slices: int
    kept: int
    status: str
    labels: dict[str, float] = field(default_factory=dict)
    reason: str = ""


def _read_array(path: Path, what: str, **options) -> np.ndarray:
    """A ``.npy`` file of the index (never unpickled), or one line saying it is damaged."""
    try:
        with LibraryOutput():  # a damaged header can make numpy's parser warn
            return np.load(path, allow_pickle=False, **options)
    except Exception as error:  # numpy raises many types for a damaged header or short data
        raise BrainDINOError(f"{path}: not a readable {what}, the file is truncated or corrupt") from error


def _kept_records(path: Path, volumes: list[IndexedVolume]) -> np.ndarray:
    """The kept rows of ``slices.npy``, checked against the volumes they name."""
    records = _read_array(path, "slice table")
    if records.dtype != RECORD_DTYPE or records.ndim != 1:
        raise BrainDINOError(f"{path}: not a slice table of this index format (rebuild the index)")
    kept = records[records["kept"]]
    # Each slice's row checked against its volume's count, per volume rather than per slice (an index may list
    # millions of slices).
    counts = {v.volume: v.kept for v in volumes}
    ids = np.unique(kept["volume"])
    limit = np.array([counts.get(int(i), 0) for i in ids], dtype=np.int64)[np.searchsorted(ids, kept["volume"])]
    bad = np.flatnonzero((kept["row"] < 0) | (kept["row"] >= limit))
    if bad.size:
        row, volume = kept["row"][bad[0]], kept["volume"][bad[0]]
        raise BrainDINOError(f"{path}: names slice {row} of volume {volume}, which its index lacks")
    return kept


class SliceDataset(torch.utils.data.Dataset):
    """Kept slices of an index as (in_chans, canvas, canvas) float32 tensors.

    Shards are memory-mapped and only a bounded number stay open per worker, so memory stays
    constant however large the index. Works with ``DistributedSampler`` (plain map-style dataset).

    Args:
        index_dir: folder written by `build_index`.
        max_open_shards: memory maps kept open per worker (least recently used are closed).
    """

    def __init__(self, index_dir: str | Path, max_open_shards: int = 32):
        self.index_dir = Path(index_dir)
        info_path = self.index_dir / "index.json"
        if not info_path.is_file():
            raise BrainDINOError(f"{self.index_dir}: not a finished slice index (no index.json); run 'braindino index'")
        self.info = read_json(info_path)
        if not isinstance(self.info, dict) or not isinstance(self.info.get("format"), int):
            raise BrainDINOError(f"{info_path}: not the index.json of a slice index (no format number)")
        try:
            self.spec = PreprocessSpec.from_dict(self.info.get("preprocessing"))
        except BrainDINOError as error:
            raise BrainDINOError(f"{info_path}: {error}") from error
        volumes_path = self.index_dir / "volumes.json"
        entries = read_json(volumes_path)
        if not isinstance(entries, list):
            raise BrainDINOError(f"{volumes_path}: must be a list of volumes")
        self.volumes = [from_fields(IndexedVolume, e, f"{volumes_path}: volume {i}") for i, e in enumerate(entries)]
        self.records = _kept_records(self.index_dir / "slices.npy", self.volumes)
        self.shards = self._checked_shards()
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def _checked_shards(self) -> dict[int, Path]:
        """Shard files of the volumes with kept slices, each there and large enough for its rows (a size check:
        the index may hold a hundred thousand shards)."""
        shards = {}
        bytes_per_slice = self.spec.image_size**2 * np.dtype(SHARD_DTYPE).itemsize
        for volume in self.volumes:
            if volume.kept == 0:
                continue
            path = self.index_dir / (volume.shard or "")
            if volume.shard is None or not path.is_file() or path.parent.parent != self.index_dir:
                raise BrainDINOError(
                    f"{self.index_dir}: the shard of volume {volume.volume} ({volume.shard}) is missing"
                )
            if path.stat().st_size < volume.kept * bytes_per_slice:
                raise BrainDINOError(f"{path}: shorter than its {volume.kept} slices (truncated)")
            shards[volume.volume] = path
        return shards

    def __len__(self) -> int:
        return len(self.records)

    def _shard(self, volume: int) -> np.ndarray:
        if volume in self._open:
            self._open.move_to_end(volume)
        else:
            shard = _read_array(self.shards[volume], "shard", mmap_mode="r")
            if shard.dtype != SHARD_DTYPE or shard.shape[1:] != (self.spec.image_size,) * 2:
                raise BrainDINOError(f"{self.shards[volume]}: not a shard of this index (rebuild the index)")
            self._open[volume] = shard
            if len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        return self._open[volume]

    def __getitem__(self, i: int) -> torch.Tensor:
        record = self.records[i]
        canvas = np.asarray(self._shard(int(record["volume"]))[int(record["row"])], dtype=np.float32)
        return torch.from_numpy(canvas)[None].expand(self.spec.in_chans, -1, -1)

    def descriptors(self, names: Sequence[str]) -> np.ndarray:
        """(slices, len(names)) float32 subject descriptors of every kept slice, standardised over the volumes.

        Raises:
            BrainDINOError: a volume of the index has no value for one of ``names``.
        """
        if self.info["format"] < 2:
            raise BrainDINOError(f"{self.index_dir}: indexed before labels were recorded; rebuild it in a new folder")
        table = {}
        for volume in self.volumes:
            if volume.status != "ok":
                continue
            missing = [n for n in names if n not in volume.labels]
            if missing:
                raise BrainDINOError(
                    f"{self.index_dir}: {volume.path} has no {', '.join(missing)}; build the index from a "
                    f"manifest (CSV) with numeric columns {', '.join(names)}"
                )
            table[volume.volume] = [volume.labels[n] for n in names]
        ids = sorted(table)
        values = np.array([table[i] for i in ids], dtype=np.float64).reshape(len(ids), len(names))
        values = (values - values.mean(axis=0)) / np.where(values.std(axis=0) > 0, values.std(axis=0), 1.0)
        rows = np.searchsorted(ids, self.records["volume"])
        return values[rows].astype(np.float32)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # each DataLoader worker opens its own maps
        return state
