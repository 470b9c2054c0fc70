"""Slice-indexing throughput and disk cost; prints one JSON object.

Makes a phantom cohort (default 6 subjects at 1 mm = 24 volumes, not timed), then times
``build_index`` over it with the default spec (224-px canvas, float16 shards).

    python benchmarks/indexing.py [--subjects 6] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from BrainDINOLib.preprocess import PreprocessSpec
from BrainDINOTrainingLib.phantoms import make_cohort
from BrainDINOTrainingLib.slice_index import build_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cohort = Path(tmp) / "cohort"
        make_cohort(args.subjects, cohort, seed=0, workers=args.workers)
        start = time.perf_counter()
        info = build_index([cohort], Path(tmp) / "index", PreprocessSpec(), workers=args.workers)
        seconds = time.perf_counter() - start
        shard_bytes = sum(p.stat().st_size for p in (Path(tmp) / "index" / "shards").iterdir())
    print(
        json.dumps(
            {
                "volumes": info["volumes"],
                "slices_seen": info["slices_seen"],
                "slices_kept": info["slices_kept"],
                "workers": args.workers,
                "seconds": round(seconds, 2),
                "volumes_per_s": round(info["volumes"] / seconds, 2),
                "slices_per_s": round(info["slices_kept"] / seconds, 1),
                "slices_seen_per_s": round(info["slices_seen"] / seconds, 1),
                "bytes_per_kept_slice": round(shard_bytes / info["slices_kept"]),
                "gb_per_million_slices": round(shard_bytes / info["slices_kept"] * 1e6 / 1e9, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
