"""Cohort inference: one ``braindino infer FOLDER`` against one ``braindino infer SCAN`` per scan, and the rerun
that skips finished scans; prints one JSON object.

The scans are copies of the real MNI T1 template (1 mm, 197 x 233 x 189), each command a fresh process as a
user runs it, with the default bundle (or ``--bundle``).

    python benchmarks/cohort.py [--scans 4] [--device cpu] [--bundle NAME]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from BrainDINOLib.sample_data import mni_path


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{completed.stderr}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bundle", help="bundle name or folder (default: the catalogue default)")
    args = parser.parse_args()
    options = ["-q", "--device", args.device, *(["--bundle", args.bundle] if args.bundle else [])]
    infer = [sys.executable, "-m", "BrainDINOLib", "infer"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "scans"
        folder.mkdir()
        for index in range(args.scans):
            shutil.copy(mni_path("t1"), folder / f"mni_{index}.nii.gz")
        one_by_one = sum(
            _timed([*infer, str(scan), "-o", str(Path(tmp) / "single" / scan.name), *options])
            for scan in sorted(folder.iterdir())
        )
        cohort = _timed([*infer, str(folder), "-o", str(Path(tmp) / "cohort"), *options])
        rerun = _timed([*infer, str(folder), "-o", str(Path(tmp) / "cohort"), *options])
        summary = json.loads((Path(tmp) / "cohort" / "summary.json").read_text())
    print(
        json.dumps(
            {
                "scans": args.scans,
                "device": args.device,
                "model": summary["model"]["name"],
                "one_command_per_scan_s": round(one_by_one, 2),
                "cohort_s": round(cohort, 2),
                "cohort_speedup": round(one_by_one / cohort, 2),
                "rerun_s": round(rerun, 2),
                "rerun_statuses": sorted({row["status"] for row in summary["scans"]}),
            }
        )
    )


if __name__ == "__main__":
    main()
