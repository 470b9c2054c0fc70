"""The Training module's background process: real CLI commands in a child process, progress, cancel, resume."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from BrainDINOLib.background import BackgroundJob, JobEnded, LogLine
from BrainDINOLib.progress import Progress

ROOT = Path(__file__).resolve().parents[2]
LIB_DIRS = (ROOT / "BrainDINO", ROOT / "BrainDINOTraining")  # as Slicer's qt-scripted-modules folder holds them
TRAINING = "BrainDINOTrainingLib"
TINY = [
    "--config", "tiny-cpu", "--device", "cpu",
    "--set", "batch_size=4", "--set", "crops.global_size=64", "--set", "crops.local_size=32",
    "--set", "crops.local_crops=2", "--set", "dino.prototypes=128", "--set", "dino.head_hidden_dim=64",
    "--set", "dino.head_bottleneck_dim=32", "--set", "epochs=1", "--set", "checkpoint_every=2",
]  # fmt: skip


def _finish(job: BackgroundJob, timeout: float = 300) -> list:
    events, deadline = [], time.monotonic() + timeout
    while not events or not isinstance(events[-1], JobEnded):
        assert time.monotonic() < deadline, f"job did not end; last events {events[-5:]}"
        events += job.poll()
        time.sleep(0.05)
    return events


def _live_group_members(group: int) -> list[int]:
    """Processes of a process group that are still running (zombies waiting for a reaper do not count)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, cohort):
    """Two phantom subjects: eight volumes (T1, T1ce, T2, FLAIR each)."""
    folder = tmp_path_factory.mktemp("bg-data")
    for subject in ("phantom-0000", "phantom-0001"):
        shutil.copytree(cohort / subject, folder / subject)
    return folder


def test_index_then_pretrain_report_progress_and_export_a_bundle(tmp_path, small_data):
    index, run = tmp_path / "index", tmp_path / "run"
    job = BackgroundJob(
        [
            ["index", str(small_data), "-o", str(index), "--image-size", "64", "--workers", "1"],
            ["pretrain", "--data", str(index), "-o", str(run), *TINY, "--set", "steps_per_epoch=4"],
        ],
        module=TRAINING,
        python_path=LIB_DIRS,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    ).start()
    events = _finish(job)
    assert events[-1] == JobEnded(0, cancelled=False), [e for e in events if isinstance(e, LogLine)][-10:]
    progress = [e for e in events if isinstance(e, Progress)]
    assert {e.stage for e in progress} == {"indexing", "pretraining"}
    last = {e.stage: e for e in progress}
    assert last["indexing"].done == last["indexing"].total == 8 and last["pretraining"].done == 4
    log = "\n".join(e.text for e in events if isinstance(e, LogLine))
    assert log.startswith("$ PythonSlicer -m BrainDINOTrainingLib --progress-lines index") and "exported" in log
    assert (run / "bundle" / "model.json").is_file()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_cancel_ends_the_process_tree_and_resume_continues(tmp_path, index64):
    """On the shared 64-px index (a background index job is tested above); cancelled at step 3 or later of 200.
    Progress lines come at most once a second, and a tiny 64-px step can take a few ms: the run must outlast the
    second line."""
    steps = 200
    pretrain = ["pretrain", "--data", str(index64), "-o", str(tmp_path / "run"), *TINY]
    pretrain += ["--set", f"steps_per_epoch={steps}"]
    job = BackgroundJob([pretrain, ["models", "list"]], module=TRAINING, python_path=LIB_DIRS).start()
    events, deadline = [], time.monotonic() + 120
    while not any(isinstance(e, Progress) and e.done >= 3 for e in events):  # a checkpoint exists at step 2
        assert time.monotonic() < deadline and job.running, events[-5:]
        events += job.poll()
        time.sleep(0.05)
    group = job.pid
    assert len(_live_group_members(group)) >= 3  # the trainer and its two data-loading workers
    job.cancel()
    events += _finish(job)
    assert events[-1] == JobEnded(events[-1].code, cancelled=True) and events[-1].code != 0
    assert not any("models list" in e.text for e in events if isinstance(e, LogLine))  # later commands never start
    assert max(e.done for e in events if isinstance(e, Progress)) < steps  # cancelled mid-run, not after the end
    deadline = time.monotonic() + 10  # SIGTERM now, SIGKILL after the 5 s grace
    while _live_group_members(group) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _live_group_members(group) == []

    resumed = BackgroundJob([[*pretrain, "--resume"]], module=TRAINING, python_path=LIB_DIRS).start().wait(300)
    assert resumed[-1] == JobEnded(0, cancelled=False)
    done = [e.done for e in resumed if isinstance(e, Progress)]
    assert done[0] >= 2 and done[-1] == steps


def test_forms_become_commands_the_cli_accepts(tmp_path, small_data):
    from BrainDINOLib import engine
    from BrainDINOLib.cli import build_parser
    from BrainDINOLib.errors import BrainDINOError
    from BrainDINOTrainingLib.cli import TRAINING_COMMANDS
    from BrainDINOTrainingLib.forms import PRECISIONS, FitHeadForm, PretrainForm, parse_fractions

    parser = build_parser(TRAINING_COMMANDS)
    form = PretrainForm(small_data, tmp_path / "out", objective="mae", epochs=3)
    index, pretrain = form.commands()
    assert index == ["index", str(small_data), "-o", str(tmp_path / "out" / "index")]
    args = parser.parse_args(pretrain)
    assert (args.objective, args.data, args.out_dir) == ("mae", str(tmp_path / "out" / "index"), str(form.run_dir))
    assert args.set == ["epochs=3"] and not args.resume
    with pytest.raises(BrainDINOError, match="no checkpoint to resume from"):
        form.commands(resume=True)
    (form.run_dir).mkdir(parents=True)
    (form.run_dir / "checkpoint.pt").touch()
    assert form.commands(resume=True)[-1][-1] == "--resume"
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "index.json").write_text("{}")
    (pretrain,) = PretrainForm(tmp_path / "idx", tmp_path / "o2", precision="bf16").commands()
    assert pretrain[0] == "pretrain" and pretrain[pretrain.index("--precision") + 1] == "bf16"
    assert PRECISIONS == engine.PRECISIONS  # the form lists what the engine takes, without importing torch
    for bad, problem in [
        (PretrainForm(tmp_path / "missing", tmp_path / "o"), "no such data folder"),
        (PretrainForm(small_data, tmp_path / "o", objective="simclr"), "'simclr' is not a pretraining objective"),
        (PretrainForm(small_data, tmp_path / "o", precision="half"), "'half' is not a precision"),
    ]:
        with pytest.raises(BrainDINOError, match=problem):
            bad.commands()

    fit = FitHeadForm(small_data, "seg", tmp_path / "new-bundle", label_fractions=(0.1, 1.0), iterations=50)
    (command,) = fit.commands()
    args = parser.parse_args(command)
    assert (args.task, args.steps, args.epochs, args.label_fraction) == ("seg", 50, None, [0.1, 1.0])
    assert args.report == tmp_path / "new-bundle-report" and args.out_bundle == tmp_path / "new-bundle"
    assert (args.sequence, args.image_channels) == (None, None)  # the command's defaults
    pixels = FitHeadForm(small_data, "seg", tmp_path / "b", sequences="t1, t1ce", image_channels=16).commands()[0]
    args = parser.parse_args(pixels)
    assert (args.sequence, args.image_channels, args.steps) == (["t1", "t1ce"], 16, None)
    with pytest.raises(BrainDINOError, match="pixel channels are for segmentation and brain heads"):
        FitHeadForm(small_data, "seq", tmp_path / "b", image_channels=16).commands()
    assert parser.parse_args(FitHeadForm(small_data, "seq", tmp_path / "b", thumbnails=True).commands()[0]).thumbnails
    assert not args.thumbnails
    with pytest.raises(BrainDINOError, match="thumbnails are for volume heads"):
        FitHeadForm(small_data, "seg", tmp_path / "b", thumbnails=True).commands()
    assert (
        parser.parse_args(
            FitHeadForm(small_data, "reg", tmp_path / "b", target="age", iterations=9).commands()[0]
        ).epochs
        == 9
    )
    with pytest.raises(BrainDINOError, match="needs a target"):
        FitHeadForm(small_data, "cls", tmp_path / "b").commands()
    with pytest.raises(BrainDINOError, match="already exists"):
        FitHeadForm(small_data, "seq", tmp_path / "idx").commands()
    assert parse_fractions("0.01, 0.1 1") == (0.01, 0.1, 1.0) and parse_fractions("") == (1.0,)
    with pytest.raises(BrainDINOError, match="not a list of numbers"):
        parse_fractions("ten percent")
    for empty in ("", "  ", None):  # the GUI's path fields give text, "" when empty
        with pytest.raises(BrainDINOError, match="choose the data"):
            PretrainForm(empty, tmp_path / "o").commands()
    typed = PretrainForm(f"{small_data}/", f"{tmp_path / 'typed'}/").commands()  # as typed, trailing "/" and all
    assert typed[0] == ["index", str(small_data), "-o", str(tmp_path / "typed" / "index")]


def test_headless_script_returns_the_command_exit_code(tmp_path):
    import subprocess
    import sys

    script = ROOT / "BrainDINOTraining" / "Resources" / "Scripts" / "braindino_headless.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in LIB_DIRS)}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    listing = subprocess.Popen([sys.executable, script, "models", "list"], env=env, **pipes)  # alongside the next
    missing = subprocess.run([sys.executable, script, "infer", str(tmp_path / "no.nii.gz"), "-o", str(tmp_path)],
                             env=env, capture_output=True, text=True)  # fmt: skip
    listed_out, _ = listing.communicate(timeout=300)
    assert listing.returncode == 0 and "braindino-tiny-phantom" in listed_out
    assert missing.returncode == 2 and "no.nii.gz: no such file" in missing.stderr


def test_a_job_that_cannot_start_or_is_cancelled_first_still_ends(tmp_path):
    broken = BackgroundJob([["models", "list"]], module=TRAINING, python=str(tmp_path / "no-python")).start()
    events = _finish(broken, timeout=30)
    assert events[-1] == JobEnded(127, cancelled=False) and "cannot start" in events[-2].text

    job = BackgroundJob([["models", "list"]], module=TRAINING, python_path=LIB_DIRS)
    job.cancel()
    events = _finish(job.start(), timeout=30)
    assert events == [JobEnded(-1, cancelled=True)]  # nothing ran, nothing logged, not a success
