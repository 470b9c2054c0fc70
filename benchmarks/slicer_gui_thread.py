"""How long the Slicer module's GUI thread is busy during and after a run; prints one JSON object.

The module's logic (`BrainDINOLib.session`) runs on a real MRML scene (the slicer-core wheel, as the tests
use it): the demo phantom's FLAIR with its T1 and T1ce is run through a background ``infer`` process while
this process polls every 50 ms, as the module's timer does. Every call the GUI thread makes is timed: writing
the scans and starting the child, each poll while the child encodes, each poll that makes a node, the first
similarity query (it makes the node), later queries, another attention head and another block. The goal is
that none of them takes more than 100 ms on the sample. Times are wall-clock milliseconds on this machine.
Python's full (generation-2) garbage collections pause whatever call they land in; they are timed and
reported apart, with the longest call that had none.

    python benchmarks/slicer_gui_thread.py [--device cpu] [--queries 20]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing" / "helpers"))

from BrainDINOLib import mrml  # noqa: E402
from BrainDINOLib.sample_data import demo_phantom  # noqa: E402
from BrainDINOLib.session import Finished, InferenceSession, RunOptions  # noqa: E402
from slicer_scene import add_volume_node, slicer_app  # noqa: E402

FULL_COLLECTIONS: list[float] = []  # milliseconds of each generation-2 collection
_CALLS_WITH_ONE: list[float] = []  # milliseconds of each timed call a full collection landed in


def _watch_collections(phase: str, info: dict, started: list = [0.0]) -> None:  # noqa: B006 (the start time)
    if info["generation"] == 2:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            FULL_COLLECTIONS.append((time.perf_counter() - started[0]) * 1000)


def _timed(call):
    collections = len(FULL_COLLECTIONS)
    start = time.perf_counter()
    value = call()
    milliseconds = (time.perf_counter() - start) * 1000
    if len(FULL_COLLECTIONS) > collections:
        _CALLS_WITH_ONE.append(milliseconds)
    return value, milliseconds


def _summary(milliseconds: list[float]) -> dict:
    median = float(np.median(milliseconds))
    return {"calls": len(milliseconds), "max_ms": round(max(milliseconds), 1), "median_ms": round(median, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args()
    gc.callbacks.append(_watch_collections)
    slicer_app()
    scans, _ = demo_phantom()
    nodes = {s: add_volume_node(nib.load(scans[s]), f"phantom {s}") for s in ("flair", "t1", "t1ce")}
    session = InferenceSession()
    options = RunOptions(sequence="flair", device=args.device)
    _, start_ms = _timed(lambda: session.start(nodes["flair"], options, {"t1": nodes["t1"], "t1ce": nodes["t1ce"]}))
    clock = time.perf_counter()
    waiting, making, run = [], [], None
    while run is None:
        building = session._steps is not None
        events, ms = _timed(session.poll)
        (making if building else waiting).append(ms)
        run = next((e.run for e in events if isinstance(e, Finished)), None)
        time.sleep(0.05)
    wall = time.perf_counter() - clock

    shape = np.array(nib.load(scans["flair"]).shape)
    rng = np.random.default_rng(0)
    centre = shape // 2
    reach = shape // 8  # points in the middle of the scan: on analysed slices
    points = [tuple(mrml.ijk_to_ras(run.input)[:3] @ [*(centre + rng.integers(-reach, reach + 1)), 1.0])
              for _ in range(args.queries)]  # fmt: skip
    _, first_query = _timed(lambda: session.query(points[0]))
    later = [_timed(lambda p=p: session.query(p))[1] for p in points[1:]]
    _, head_ms = _timed(lambda: session.show_head(0))
    _, block_ms = _timed(lambda: session.use_block(2))
    _, block_query = _timed(lambda: session.query(points[1]))
    session.forget()
    every = [start_ms, *waiting, *making, first_query, *later, head_ms, block_ms, block_query]
    print(
        json.dumps(
            {
                "sample": f"demo phantom FLAIR {'x'.join(map(str, shape))} with T1 and T1ce",
                "device": args.device,
                "run_wall_s": round(wall, 2),
                "start_ms": round(start_ms, 1),
                "poll_while_encoding": _summary(waiting),
                "poll_making_nodes": _summary(making),
                "first_query_ms": round(first_query, 1),
                "query": _summary(later),
                "attention_head_ms": round(head_ms, 1),
                "block_ms": round(block_ms, 1),
                "query_after_block_ms": round(block_query, 1),
                "longest_gui_call_ms": round(max(every), 1),
                "full_collections_in_gui_calls_ms": [round(ms, 1) for ms in _CALLS_WITH_ONE],
                "full_collection_pauses_ms": [round(ms, 1) for ms in FULL_COLLECTIONS],
                "longest_gui_call_without_a_full_collection_ms": round(
                    max(ms for ms in every if ms not in _CALLS_WITH_ONE), 1
                ),
                "all_under_100_ms": max(every) < 100,
            }
        )
    )


if __name__ == "__main__":
    main()
