"""Plant plausible bugs in the core, one at a time, and check that the tests meant to guard each one fail.

Each mutant is a small text patch of one source file and the tests that must catch it. The script copies the
tracked files of the repository into a temporary folder once, applies each patch there in turn, runs that
mutant's tests against the copy (its packages first on the path), puts the file back, and prints a line per
mutant: caught or SURVIVED. It exits 1 if any mutant survived or no longer applies (the code moved on: update
the patch). Run it before merging a change to the core; it is not part of the default test run (time).

    python tools/mutation_smoke.py                 # every mutant
    python tools/mutation_smoke.py pca ema         # mutants whose name contains one of these words
    python tools/mutation_smoke.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB, TRAIN = "BrainDINO/BrainDINOLib", "BrainDINOTraining/BrainDINOTrainingLib"
TESTS, TRAIN_TESTS = "Testing/BrainDINOLib", "Testing/BrainDINOTrainingLib"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant(
        "geometry: LPS origin dropped",
        f"{LIB}/volume.py",
        "    lps[:3, 3] = image.GetOrigin()\n",
        "    lps[:3, 3] = 0.0\n",
        (f"{TESTS}/test_volume.py::test_simpleitk_formats_match_nifti",),
    ),
    Mutant(
        "geometry: DICOM spacing halved",
        f"{LIB}/volume.py",
        'a colour DICOM series; BrainDINO needs a greyscale MRI volume")\n',
        'a colour DICOM series; BrainDINO needs a greyscale MRI volume")\n'
        "    image.SetSpacing([s / 2 for s in image.GetSpacing()])\n",
        (f"{TESTS}/test_volume.py::test_dicom_series_folder",),
    ),
    Mutant(
        "geometry: a 3D image accepts --volume 3",
        f"{LIB}/volume.py",
        "    if len(shape) == 3 and volume_index not in (None, 0):",
        "    if False:",
        (f"{TESTS}/test_volume.py::test_4d_needs_a_volume_choice",),
    ),
    Mutant(
        "data: masks in a folder indexed as scans",
        f"{LIB}/manifest.py",
        "    return _stem(path).lower().endswith(MASK_SUFFIXES)",
        "    return False",
        (f"{TRAIN_TESTS}/test_data.py::test_folder_of_volumes_leaves_masks_out",),
    ),
    Mutant(
        "maps: PCA fitted per slice",
        f"{LIB}/featuremaps.py",
        "        colors = PcaColors.fit(tokens, self.foreground_patches)\n"
        "        return to_volume(self.layout, colors.rgb(tokens), rgb_inside=self.foreground)",
        "        rgb = np.stack([PcaColors.fit(t[None], f[None]).rgb(t) if f.sum() > 3\n"
        "                        else np.zeros((*t.shape[:2], 3)) for t, f in zip(tokens, self.foreground_patches)])\n"
        "        return to_volume(self.layout, rgb, rgb_inside=self.foreground)",
        (f"{TESTS}/test_featuremaps.py::test_pca_colours_are_one_volume_level_fit",),
    ),
    Mutant(
        "maps: query patch one row off",
        f"{LIB}/featuremaps.py",
        "        min(int(row * rows / layout.plane.canvas), rows - 1),",
        "        min(int(row * rows / layout.plane.canvas) + 1, rows - 1),",
        (f"{TESTS}/test_featuremaps.py::test_similarity_peaks_at_a_planted_patch",),
    ),
    Mutant(
        "maps: similarity without normalising the query",
        f"{LIB}/featuremaps.py",
        "    return features @ features[query]",
        "    return features @ tokens[query].astype(np.float32)",
        (f"{TESTS}/test_featuremaps.py::test_similarity_peaks_at_a_planted_patch",),
    ),
    Mutant(
        "attention: patch -> CLS read instead of CLS -> patch",
        f"{LIB}/encoder.py",
        "        self._cls_attention = attention[:, :, 0, self.num_prefix_tokens :]",
        "        self._cls_attention = attention[:, :, self.num_prefix_tokens :, 0]",
        (f"{TESTS}/test_encoder.py::test_dinov3_attention_is_the_softmax_of_rope_rotated_queries_and_keys",),
    ),
    Mutant(
        "export: DINO exports its student",
        f"{TRAIN}/objectives/dino.py",
        '    def export_backbone(self) -> nn.Module:\n        return self.teacher["backbone"]',
        '    def export_backbone(self) -> nn.Module:\n        return self.student["backbone"]',
        (f"{TRAIN_TESTS}/test_trainer.py::test_student_learns_the_teacher_targets_and_the_export_drives_inference",),
    ),
    Mutant(
        "preprocessing: intensities centred but not scaled",
        f"{LIB}/preprocess.py",
        "    image[nonzero] = (values - mean) / max(std, 1e-6)",
        "    image[nonzero] = values - mean",
        (f"{TESTS}/test_preprocess.py",),
    ),
    Mutant(
        "importers: the student preferred to the teacher",
        f"{LIB}/importers.py",
        '    for key in ("teacher", "model_ema", "model", "state_dict"):',
        '    for key in ("model", "teacher", "model_ema", "state_dict"):',
        (f"{TESTS}/test_importers.py::test_the_ema_weights_are_taken_over_the_trained_model",),
    ),
    Mutant(
        "losses: DINO pairs a view with itself",
        f"{TRAIN}/objectives/dino_loss.py",
        "                if s == t:\n                    continue\n",
        "",
        (f"{TRAIN_TESTS}/test_objectives.py",),
    ),
    Mutant(
        "EMA: the teacher takes the student's share",
        f"{TRAIN}/objectives/common.py",
        "    torch._foreach_lerp_(targets, sources, 1.0 - momentum)",
        "    torch._foreach_lerp_(targets, sources, momentum)",
        (f"{TRAIN_TESTS}/test_objectives.py::test_ema_keeps_the_momentum_share_of_the_target",),
    ),
    Mutant(
        "resume: the augmentation generator starts afresh",
        f"{TRAIN}/trainer.py",
        '        self.generator.set_state(state["generators"][self.rank])\n',
        "",
        (f"{TRAIN_TESTS}/test_trainer.py::test_resume_is_bit_exact",),
    ),
    Mutant(
        "heads: regression head ignores its input",
        f"{LIB}/heads.py",
        "        return self.mlp(self.pool(tokens, mask))",
        "        return self.mlp(self.pool(tokens, mask) * 0)",
        (f"{TRAIN_TESTS}/test_heads.py::test_regression_head_beats_the_mean_predictor_in_ml",),
    ),
    Mutant(
        "brain mask: the smallest component kept",
        f"{LIB}/brain.py",
        "    largest = np.bincount(labels.ravel())[1:].argmax() + 1",
        "    largest = np.bincount(labels.ravel())[1:].argmin() + 1",
        (f"{TESTS}/test_infer.py::test_demo_runs_every_head_on_the_held_out_phantom_next_to_the_template",),
    ),
    Mutant(
        "report: the patient's left and right swapped",
        f"{LIB}/report.py",
        "    return np.swapaxes(plane[::-1, ::-1], 0, 1)",
        "    return np.swapaxes(plane[:, ::-1], 0, 1)",
        (f"{TESTS}/test_infer.py::test_report_shows_the_scan_in_radiological_view",),
    ),
    Mutant(
        "bundles: head weights written before the card that lists them",
        f"{LIB}/bundle.py",
        "    with atomic_write(bundle.path / relative, bundle.path / CARD_FILE) as (weights, card_file):\n",
        "    save_file(tensors, bundle.path / relative)\n"
        "    with atomic_write(bundle.path / relative, bundle.path / CARD_FILE) as (weights, card_file):\n",
        (f"{TESTS}/test_importers.py::test_a_head_whose_card_cannot_be_written_leaves_the_bundle_as_it_was",),
    ),
    Mutant(
        "precision: MoCo's logits in bf16 under autocast",
        f"{TRAIN}/objectives/moco.py",
        "    @in_fp32  # bf16 logits blur which key is the positive\n",
        "",
        (f"{TRAIN_TESTS}/test_precision.py::test_precision_sensitive_reductions_ignore_autocast",),
    ),
    Mutant(
        "precision: a NaN gradient reaches the weights",
        f"{TRAIN}/trainer.py",
        '            self._stop(step, "a gradient is not finite")',
        "            pass",
        (f"{TRAIN_TESTS}/test_precision.py::test_a_non_finite_gradient_stops_the_step_before_the_weights_change",),
    ),
    Mutant(
        "bundles: a changed file passes verification",
        f"{LIB}/bundle.py",
        "        elif sha256(path) != expected:",
        "        elif sha256(path) is None:",
        (f"{TESTS}/test_importers.py",),
    ),
    Mutant(
        "reading: NRRD/MetaImage headers not checked before ITK",
        f"{LIB}/volume.py",
        "    check_text_header(path, lambda shape: _check_shape(path, shape, volume_index))\n",
        "",
        ("Testing/test_bad_inputs.py::test_broken_files_users_met_give_one_line_and_exit_2",),
    ),
    Mutant(
        "reading: library stderr not captured",
        f"{LIB}/diagnose.py",
        "            os.dup2(self._sink.fileno(), 2)\n",
        "",
        ("Testing/test_bad_inputs.py::test_damaged_scans_load_or_fail_with_one_clean_line",),
    ),
    Mutant(
        "evaluation: a segmentation head's options given by position",
        f"{TRAIN}/evaluation.py",
        "            options = SegOptions(modalities=spec.modalities, target=spec.target, layers=spec.layers,\n"
        "                                 label_values=spec.label_values, classes=spec.classes,\n",
        "            options = SegOptions(spec.modalities, spec.layers, spec.label_values, spec.classes,\n",
        (
            f"{TRAIN_TESTS}/test_heads.py::test_segmentation_head_finds_the_tumor_and_infer_writes_it_in_the_scan_geometry",
        ),
    ),
    Mutant(
        "infer: a decoder that reads pixels is applied without them",
        f"{LIB}/infer.py",
        "    images = scan.prepared.canvases() if spec.image_channels else None\n",
        "    images = None\n",
        (
            f"{TRAIN_TESTS}/test_heads.py::test_segmentation_head_finds_the_tumor_and_infer_writes_it_in_the_scan_geometry"
            "[tokens-and-pixels]",
        ),
    ),
    Mutant(
        "ood: the outlier classifier's hidden layer loses its ReLU",
        f"{LIB}/typicality.py",
        "                values = np.maximum(values @ weights + bias, 0)\n",
        "                values = values @ weights + bias\n",
        (f"{TRAIN_TESTS}/test_brain.py::test_the_outlier_channel_runs_the_perceptron_as_fitted",),
    ),
    Mutant(
        "ood: drainage runs downstream first",
        f"{TRAIN}/outliers.py",
        "    for cell in reversed(order):  # upstream before downstream\n",
        "    for cell in order:\n",
        (f"{TRAIN_TESTS}/test_brain.py::test_drainage_gathers_a_valley_at_its_outlet",),
    ),
    Mutant(
        "seg: the lesion share is drawn from slices without a lesion",
        f"{TRAIN}/fit_segmentation.py",
        "pools, counts = [everything[lesion], everything[~lesion]]",
        "pools, counts = [everything[~lesion], everything[lesion]]",
        (f"{TRAIN_TESTS}/test_heads.py::test_lesion_share_fills_every_batch_and_draws_each_slice_in_turn",),
    ),
    Mutant(
        "volume heads: fitting drops the thumbnails the head is said to read",
        f"{TRAIN}/fit_heads.py",
        "features.thumbnails if options.thumbnails else None",
        "None",
        (f"{TRAIN_TESTS}/test_heads.py::test_a_sequence_head_with_thumbnails_reads_them_when_fitted_and_in_infer",),
    ),
    Mutant(
        "infer: the any-contrast tumour head segments a scan whose sequence has a head of its own",
        f"{LIB}/infer.py",
        'if spec.kind == "seg" and not reads and spec.target in own_sequence:',
        "if False:",
        (f"{TESTS}/test_infer.py::test_demo_runs_every_head_on_the_held_out_phantom_next_to_the_template",),
    ),
)


def copy_repository(target: Path) -> None:
    """The tracked and untracked-but-not-ignored files, as they are in the working tree."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for relative in filter(None, listed):
        source = ROOT / relative
        if source.is_file():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / relative)


def run_mutant(mutant: Mutant, copy: Path, timeout: int) -> tuple[str, float]:
    """("caught" | "SURVIVED" | "STALE" | "TIMEOUT", seconds) of one mutant."""
    path = copy / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return "STALE", 0.0
    path.write_text(original.replace(mutant.old, mutant.new))
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(copy / "BrainDINO"), str(copy / "BrainDINOTraining")]),
    }
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
            cwd=copy, env=environment, capture_output=True, timeout=timeout,
        )  # fmt: skip
        verdict = (
            "caught" if done.returncode == 1 else "SURVIVED" if done.returncode == 0 else f"ERROR {done.returncode}"
        )
    except subprocess.TimeoutExpired:
        verdict = "TIMEOUT"
    finally:
        path.write_text(original)
    return verdict, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only mutants whose name contains one of these words")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--timeout", type=int, default=900, help="seconds a mutant's tests may take")
    parser.add_argument("--json", type=Path, help="also write the verdicts to this JSON file")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or any(word in m.name for word in args.names)]
    if args.list:
        for mutant in chosen:
            print(f"{mutant.name}\n    {mutant.path}; tests: {' '.join(mutant.tests)}")
        return 0
    verdicts = {}
    with tempfile.TemporaryDirectory(prefix="braindino-mutants-") as folder:
        copy = Path(folder)
        copy_repository(copy)
        for mutant in chosen:
            verdict, seconds = run_mutant(mutant, copy, args.timeout)
            verdicts[mutant.name] = verdict
            print(f"{verdict:<9} {seconds:6.1f} s  {mutant.name}", flush=True)
    caught = sum(v == "caught" for v in verdicts.values())
    print(f"{caught} of {len(verdicts)} mutants caught")
    if args.json:
        args.json.write_text(json.dumps(verdicts, indent=1) + "\n")
    return 0 if caught == len(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
