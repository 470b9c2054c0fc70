"""Volume heads on a frozen encoder: fitting under label scarcity, baselines, storage in the bundle,
the encoder check, the feature cache, and the survival statistics."""

from __future__ import annotations

import csv
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from BrainDINOLib.bundle import add_head, create_random_bundle, find_bundle, load_bundle
from BrainDINOLib.engine import encode_volume
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.heads import predict_volume, volume_input
from BrainDINOLib.manifest import load_manifest
from BrainDINOLib.preprocess import PreprocessSpec, prepare
from BrainDINOLib.volume import load_volume
from BrainDINOTrainingLib.baselines import baseline_predictions
from BrainDINOTrainingLib.cli import main
from BrainDINOTrainingLib.features import FeatureCache
from BrainDINOTrainingLib.fit_heads import FitOptions, Samples, fit_and_evaluate, predict
from BrainDINOTrainingLib.fit_segmentation import SegOptions, default_layers, training_batches
from BrainDINOTrainingLib.metrics import c_index, cox_loss, kaplan_meier, metrics
from BrainDINOTrainingLib.phantoms import CohortOptions, make_cohort
from testdata import file_hashes


@pytest.fixture(scope="module")
def cohort40(tmp_path_factory):
    """Skull-stripped phantoms with gliomas only, as the shipped encoder was pretrained on (head fitting is tested
    here; whole heads and the brain-mask head in test_brain.py)."""
    folder = tmp_path_factory.mktemp("heads") / "cohort"
    make_cohort(
        40, folder, seed=5, resolution=2, workers=2, options=CohortOptions(skull_stripped=1.0, metastasis_share=0)
    )
    return folder


@pytest.fixture(scope="module")
def bundle64(tmp_path_factory):
    """A random tiny encoder on 64-px canvases (fast); its CLS tokens still carry intensity and shape cues."""
    return create_random_bundle(tmp_path_factory.mktemp("b") / "tiny64", "vit-tiny16-dinov3",
                                preprocessing=PreprocessSpec(image_size=64)).path  # fmt: skip


@pytest.fixture(scope="module")
def cache(cohort40, bundle64, tmp_path_factory):
    """Features of the cohort's scans; the FLAIR files also keep the blocks a segmentation head reads, so the
    seg test's fit-head reads them from here instead of encoding the same scans again."""
    bundle, folder = load_bundle(bundle64), tmp_path_factory.mktemp("features")
    layered = FeatureCache(bundle, folder, default_layers(bundle.card.encoder.depth), device="cpu")
    for entry in load_manifest(cohort40).entries:
        layered.get(entry.images["flair"])
    return FeatureCache(bundle, folder, device="cpu")


@pytest.fixture(scope="module")
def sequence_fit(cohort40, cache):
    """The sequence head, fitted once for the two tests that use it."""
    return fit_and_evaluate(load_manifest(cohort40), cache, FitOptions(task="seq"), "sequence")


def _primary(rows, model, metric):
    return [r[metric] for r in rows if r["model"] == model]


def test_sequence_head_beats_the_majority_class(sequence_fit):
    result = sequence_fit
    assert result.spec.classes == ("flair", "t1", "t1ce", "t2") and len(result.test) == 32  # 8 subjects x 4
    assert _primary(result.rows, "head", "accuracy")[0] > _primary(result.rows, "majority", "accuracy")[0] + 0.2


def test_regression_head_beats_the_mean_predictor_in_ml(cohort40, cache):
    """Oedema volume from FLAIR (bright): the phantoms' random fields of view hide absolute head size on the canvas,
    so a size-driven target such as CSF volume is not what a random encoder can show."""
    options = FitOptions(task="reg", target="ed_ml", modalities=("flair",))
    result = fit_and_evaluate(load_manifest(cohort40), cache, options, "oedema")
    assert result.spec.units == "mL" and result.spec.target_std > 1
    # Measured: MAE 66.6 mL against the mean predictor's 101.0, R2 0.31; a head that ignores its input gets R2 <= 0.
    assert _primary(result.rows, "head", "mae")[0] < 0.85 * _primary(result.rows, "mean", "mae")[0]
    assert _primary(result.rows, "head", "r2")[0] > 0.1


def test_label_fractions_and_seeds_give_one_row_per_model(cohort40, cache):
    options = FitOptions(task="cls", target="diagnosis", label_fractions=(0.25, 1.0), seeds=(0, 1))
    result = fit_and_evaluate(load_manifest(cohort40), cache, options, "diagnosis")
    assert {(r["label_fraction"], r["seed"]) for r in result.rows} == {(f, s) for f in (0.25, 1.0) for s in (0, 1)}
    sizes = {r["label_fraction"]: r["train_samples"] for r in result.rows}
    assert sizes[1.0] == 24 and 6 <= sizes[0.25] <= 8  # stratified: a quarter of each class, rounded
    assert {"head", "linear", "knn", "majority"} == {r["model"] for r in result.rows}
    assert result.spec.training.label_fraction == 1.0 and set(result.spec.metrics) >= {"auc", "accuracy"}


def test_fit_head_command_stores_a_head_that_reloads_and_predicts_the_same(tmp_path, cohort40, bundle64, cache, capsys):
    out, source = tmp_path / "with-heads", file_hashes(bundle64)
    args = ["fit-head", "--task", "surv", "--modality", "t1ce", "--manifest", str(cohort40), "--bundle"]  # former name
    args += [str(bundle64), "-o", str(out), "--report", str(tmp_path / "report"), "--cache", str(cache.folder)]
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "kaplan_meier.png", "metrics.csv", "metrics.md", "metrics.png"
    ]  # fmt: skip
    bundle = load_bundle(out)
    (spec,) = bundle.card.heads
    assert spec.kind == "surv" and spec.target == "survival_days" and spec.modalities == ("t1ce",)
    assert "braindino fit-head --task surv" in spec.training.command
    again = fit_and_evaluate(load_manifest(cohort40), cache, FitOptions(task="surv", modalities=("t1ce",)), "x")
    assert np.allclose(predict(spec, bundle.load_head(spec), again.test), again.test_predictions, atol=1e-5)
    assert spec.metrics["c_index"] == pytest.approx(_primary(again.rows, "head", "c_index")[0])  # what was measured
    assert file_hashes(bundle64) == source  # the source bundle is unchanged, file for file
    capsys.readouterr()
    assert main(["models", "list", "--models-dir", str(tmp_path)]) == 0
    assert "head survival_days (surv, target survival_days)" in capsys.readouterr().out
    scan = cohort40 / "phantom-0007" / "phantom-0007_t1ce.nii.gz"
    assert main(["infer", str(scan), "-o", str(tmp_path / "out"), "--bundle", str(out), "-q"]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    prediction = result["predictions"]["survival_days"]
    assert prediction["kind"] == "surv" and prediction["reads"] == {"t1ce": str(scan)}
    fitted_on = predict_volume(spec, bundle.load_head(spec), cache.get(scan).embeddings)  # the features fitting saw
    assert prediction["value"] == pytest.approx(fitted_on["value"], abs=1e-3)


def test_a_sequence_head_with_thumbnails_reads_them_when_fitted_and_in_infer(
    tmp_path, cohort40, bundle64, cache, capsys
):
    out = tmp_path / "thumbnails"
    args = ["fit-head", "--task", "seq", "--thumbnails", "--manifest", str(cohort40), "--bundle", str(bundle64)]
    assert main(args + ["-o", str(out), "--report", str(tmp_path / "report"), "--cache", str(cache.folder)]) == 0
    bundle = load_bundle(out)
    (spec,) = bundle.card.heads
    assert spec.thumbnails and spec.width == bundle.card.encoder.embed_dim + 16 * 16
    scan = cohort40 / "phantom-0007" / "phantom-0007_t2.nii.gz"
    assert main(["infer", str(scan), "-o", str(tmp_path / "out"), "--bundle", str(out), "-q"]) == 0
    prediction = json.loads((tmp_path / "out" / "result.json").read_text())["predictions"]["sequence"]
    features = cache.get(scan)  # what fitting read
    fitted_on = predict_volume(spec, bundle.load_head(spec), volume_input(features.embeddings, features.thumbnails))
    assert prediction["probabilities"] == pytest.approx(fitted_on["probabilities"], abs=1e-3)
    capsys.readouterr()
    seg = ["fit-head", "--task", "seg", "--thumbnails", "--manifest", str(cohort40), "-o", str(tmp_path / "x")]
    assert main(seg) == 2
    assert "--thumbnails applies to volume heads" in capsys.readouterr().err


def test_a_head_refuses_another_encoder_and_the_shipped_bundle_stays_unchanged(
    tmp_path, cohort40, bundle64, sequence_fit
):
    other = create_random_bundle(tmp_path / "other", "vit-tiny16-dinov3", seed=1,
                                 preprocessing=PreprocessSpec(image_size=64))  # fmt: skip
    result = sequence_fit
    with pytest.raises(BrainDINOError, match="fitted on another encoder"):
        other.load_head(result.spec)
    shipped = file_hashes(find_bundle())
    assert main(["fit-head", "--task", "seq", "--manifest", str(cohort40)]) == 2  # default bundle, no -o
    assert file_hashes(find_bundle()) == shipped
    brats2021 = ["fit-head", "--task", "seg", "--manifest", str(cohort40), "--bundle", str(bundle64), "-o"]
    assert main(brats2021 + [str(tmp_path / "x"), "--label-values", "1", "2", "4"]) == 2  # the masks hold 3
    assert not (tmp_path / "x").exists()


def test_feature_cache_reuses_only_identical_inputs_and_shares_blocks_between_heads(tmp_path, cohort40, bundle64):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes((cohort40 / "phantom-0000" / "phantom-0000_t1.nii.gz").read_bytes())
    cache = FeatureCache(load_bundle(bundle64), tmp_path / "features", device="cpu", layers=[1, 5])
    first = cache.get(scan)
    assert (
        first.embeddings.shape[1] == 96
        and first.layers[5].shape[1:] == (4, 4, 96)
        and len(os.listdir(cache.folder)) == 1
    )
    assert np.array_equal(cache.get(scan).embeddings, first.embeddings) and len(os.listdir(cache.folder)) == 1
    scan.write_bytes((cohort40 / "phantom-0001" / "phantom-0001_t1.nii.gz").read_bytes())  # the scan changed
    assert (
        not np.array_equal(cache.get(scan).embeddings[:3], first.embeddings[:3]) and len(os.listdir(cache.folder)) == 2
    )
    file = cache.folder / f"{cache.key(scan)}.safetensors"
    written = file.stat().st_mtime_ns
    volume_heads = FeatureCache(load_bundle(bundle64), tmp_path / "features", device="cpu")  # no patch tokens
    assert np.array_equal(volume_heads.get(scan).embeddings, cache.get(scan).embeddings)
    assert file.stat().st_mtime_ns == written  # read from the segmentation head's file
    deeper = FeatureCache(load_bundle(bundle64), tmp_path / "features", device="cpu", layers=[3])
    assert deeper.get(scan).layers[3].shape[1:] == (4, 4, 96) and file.stat().st_mtime_ns != written
    np.testing.assert_array_equal(cache.get(scan).layers[5], deeper._compute(scan, [5])["layer_5"])  # all kept
    assert len(os.listdir(cache.folder)) == 2


def test_infer_applies_each_head_to_its_own_sequence(tmp_path, cohort40, bundle64):
    """A mean-pooling encoder (as MAE is exported): the cache and infer read the same slice embeddings,
    the sequence head names the scan, and heads reading other sequences take them from --also."""
    pooled = tmp_path / "mean-pooling"
    shutil.copytree(bundle64, pooled)
    card = json.loads((pooled / "model.json").read_text())
    card["pooling"] = "mean"
    (pooled / "model.json").write_text(json.dumps(card))
    cache = FeatureCache(load_bundle(pooled), tmp_path / "features", device="cpu")
    with open(cohort40 / "manifest.csv") as handle:  # half the cohort: the heads only need to exist
        rows = list(csv.DictReader(handle))[:20]
    with open(tmp_path / "half.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows({k: str(cohort40 / v) if v.endswith(".nii.gz") else v for k, v in r.items()} for r in rows)
    manifest = load_manifest(tmp_path / "half.csv")
    for options, name in (
        (FitOptions(task="seq"), "sequence"),
        (FitOptions(task="reg", modalities=("t1", "t2")), "age"),
    ):
        result = fit_and_evaluate(manifest, cache, options, name)
        add_head(pooled, result.spec, result.head)
    subject = cohort40 / "phantom-0003"
    flair, t1, t2 = (subject / f"phantom-0003_{s}.nii.gz" for s in ("flair", "t1", "t2"))
    prepared = prepare(load_volume(t1), load_bundle(pooled).card.preprocessing)
    encoded = encode_volume(prepared, load_bundle(pooled).load_encoder(), device="cpu")
    assert np.allclose(cache.get(t1).embeddings, encoded.patch_tokens.astype(np.float32).mean(axis=(1, 2)))

    assert main(["infer", str(flair), "-o", str(tmp_path / "a"), "--bundle", str(pooled), "-q"]) == 0
    alone = json.loads((tmp_path / "a" / "result.json").read_text())
    assert "age" not in alone["predictions"] and any("--also" in w for w in alone["warnings"])
    assert main(["infer", str(flair), "-o", str(tmp_path / "b"), "--bundle", str(pooled), "-q",
                 "--sequence", "flair", "--also", f"t1={t1}", f"t2={t2}"]) == 0  # fmt: skip
    both = json.loads((tmp_path / "b" / "result.json").read_text())["predictions"]
    bundle = load_bundle(pooled)
    (spec,) = [s for s in bundle.card.heads if s.name == "age"]
    tokens = np.concatenate([cache.get(t1).embeddings, cache.get(t2).embeddings])
    assert both["age"]["value"] == pytest.approx(
        predict_volume(spec, bundle.load_head(spec), tokens)["value"], abs=1e-3
    )
    assert both["age"]["reads"] == {"t1": str(t1), "t2": str(t2)}
    unread = tmp_path / "phantom-0003_t1ce.nii.gz"
    unread.write_text("not an image")  # no head reads t1ce: the file is never opened
    assert main(["infer", str(flair), "-o", str(tmp_path / "e"), "--bundle", str(pooled), "-q",
                 "--sequence", "flair", "--also", f"t1ce={unread}"]) == 0  # fmt: skip
    warnings = json.loads((tmp_path / "e" / "result.json").read_text())["warnings"]
    assert "the other t1ce scan was not used: no volume head of this bundle reads t1ce scans" in warnings
    assert main(["infer", str(flair), "-o", str(tmp_path / "c"), "--bundle", str(bundle64), "--also", f"t1={t1}"]) == 2
    for wrong in (["--sequence", "dwi"], ["--sequence", "T1", "--also", f"t1={t1}"], ["--also", f"t2={t2}.missing"]):
        assert main(["infer", str(flair), "-o", str(tmp_path / "d"), "--bundle", str(pooled), *wrong]) == 2
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_baselines_fitted_on_one_subject_give_finite_predictions():
    """A 1 % label fraction of a small cohort keeps one subject: every baseline must still predict."""
    generator = torch.Generator().manual_seed(0)

    def samples(n):
        tokens = torch.randn(n, 3, 8, generator=generator)
        return Samples(tokens, torch.ones(n, 3, dtype=torch.bool), torch.rand(n, generator=generator) * 100,
                       torch.ones(n), [f"s{i}" for i in range(n)])  # fmt: skip

    for task in ("surv", "reg"):
        for values in baseline_predictions(task, samples(1), samples(4), 0, seed=0).values():
            assert np.isfinite(values).all()


def test_auc_of_predictions_that_give_the_present_classes_no_probability():
    """A head or kNN vote fitted on few subjects can put all probability on a class absent from the test split;
    such samples tie instead of making the AUC undefined."""
    targets = torch.tensor([0, 0, 1, 1])
    samples = Samples(torch.zeros(4, 1, 8), torch.ones(4, 1, dtype=torch.bool), targets, torch.ones(4), list("abcd"))
    predictions = np.array([[0.9, 0.1, 0.0], [0.0, 0.0, 1.0], [0.2, 0.8, 0.0], [0.5, 0.5, 0.0]])
    assert metrics("cls", predictions, samples)["auc"] == pytest.approx(0.875)  # 3 of 4 pairs and a tie
    three = Samples(torch.zeros(3, 1, 8), torch.ones(3, 1, dtype=torch.bool), torch.tensor([0, 1, 2]),
                    torch.ones(3), list("abc"))  # fmt: skip
    assert np.isfinite(metrics("cls", np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 0.0]]), three)["auc"])


def test_survival_statistics_by_hand():
    times, events = np.array([2.0, 4.0, 6.0, 8.0]), np.array([1, 0, 1, 1])
    assert c_index(np.array([4.0, 3.0, 2.0, 1.0]), times, events) == 1.0  # riskier always dies first
    assert c_index(np.array([1.0, 2.0, 3.0, 4.0]), times, events) == 0.0
    x, survival = kaplan_meier(times, events)
    assert x.tolist() == [0, 2, 4, 6, 8] and np.allclose(survival, [1, 0.75, 0.75, 0.375, 0.0])
    _, tied = kaplan_meier(np.array([1.0, 5, 5, 5, 7]), np.array([1, 0, 1, 0, 1]))  # the event at 5 counts first
    assert np.allclose(tied, [1, 0.8, 0.6, 0.6, 0.6, 0.0])
    tied_times, tied_events = torch.tensor([3.0, 3.0, 1.0, 3.0]), torch.tensor([1.0, 0.0, 1.0, 1.0])
    tied_risk = torch.tensor([0.3, -1.0, 0.5, 2.0])
    orders = (torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0]), torch.tensor([1, 3, 0, 2]))
    losses = {float(cox_loss(tied_risk[p], tied_times[p], tied_events[p])) for p in orders}
    assert max(losses) - min(losses) < 1e-6  # Breslow: the order of tied times does not matter
    risk = torch.tensor([0.5, -0.2, 0.1, 0.0])
    expected = (
        -(
            (0.5 - torch.logsumexp(risk, 0))
            + (0.1 - torch.logsumexp(risk[2:], 0))
            + (0.0 - torch.logsumexp(risk[3:], 0))
        )
        / 3
    )
    assert torch.allclose(cox_loss(risk, torch.from_numpy(times), torch.from_numpy(events).float()), expected)


@pytest.mark.parametrize("image_channels", [0, 8], ids=["tokens", "tokens-and-pixels"])
def test_segmentation_head_finds_the_tumor_and_infer_writes_it_in_the_scan_geometry(
    tmp_path, cohort40, bundle64, cache, image_channels
):
    """Fitted, evaluated and applied by infer, with a decoder that reads the patch tokens alone or the canvas
    pixels too (each command must hand it the pixels)."""
    out = tmp_path / "seg-bundle"
    args = ["fit-head", "--task", "seg", "--sequence", "flair", "--manifest", str(cohort40), "--bundle"]
    args += [str(bundle64), "-o", str(out), "--steps", "250", "--report", str(tmp_path / "report")]
    args += ["--image-channels", str(image_channels), "--cache", str(cache.folder)]
    assert main(args) == 0  # the FLAIR features with their blocks, encoded once
    (spec,) = load_bundle(out).card.heads
    assert spec.kind == "seg" and spec.layers == (1, 2, 3, 5) and spec.label_values == (1, 2, 3)
    assert spec.image_channels == image_channels
    assert spec.metrics["dice_whole_tumor"] > 0.15  # predicting nothing scores 0 on every tumour subject
    report = tmp_path / "evaluation"
    evaluate = ["evaluate", "--bundle", str(out), "--manifest", str(cohort40), "--cache", str(cache.folder)]
    assert main(evaluate + ["--report", str(report)]) == 0  # the same test subjects, the same voxel metrics
    with open(report / "metrics.csv") as handle:
        scores = {row["metric"]: float(row["value"]) for row in csv.DictReader(handle)}
    assert scores == pytest.approx({k: v for k, v in spec.metrics.items() if k != "train_samples"}, nan_ok=True)
    manifest = load_manifest(cohort40).split(SegOptions().split, seed=SegOptions().split_seed)
    held_out = next(  # a test subject with a tumour, stored in a non-RAS orientation
        e
        for e in manifest.entries
        if manifest.splits[e.subject_id] == "test" and e.labels["tumor"] == 1 and e.labels["orientation"] != "RAS"
    )
    scan = held_out.images["flair"]
    assert main(["infer", str(scan), "-o", str(tmp_path / "out"), "--bundle", str(out), "-q"]) == 0
    written = nib.load(tmp_path / "out" / scan.name.replace(".nii.gz", "_seg.nii.gz"))
    source, truth = nib.load(scan), np.asarray(nib.load(held_out.images["seg"]).dataobj)
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    predicted = np.asarray(written.dataobj)
    assert set(np.unique(predicted).tolist()) <= {0, 1, 2, 3}
    overlap = 2 * ((predicted > 0) & (truth > 0)).sum() / ((predicted > 0).sum() + (truth > 0).sum())
    assert overlap > 0.2  # voxel for voxel in the file's own grid: a flipped axis would give ~0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["predictions"]["tumor"]["total_ml"] > 0 and "segmentation:tumor" in result["outputs"]


def test_evaluate_reproduces_the_fitted_metrics_and_scores_other_data(tmp_path, cohort40, bundle64, cache):
    out = tmp_path / "b"
    fit = ["fit-head", "--task", "cls", "--target", "diagnosis", "--manifest", str(cohort40), "--bundle"]
    assert (
        main(fit + [str(bundle64), "-o", str(out), "--cache", str(cache.folder), "--report", str(tmp_path / "r")]) == 0
    )
    (spec,) = load_bundle(out).card.heads
    report = tmp_path / "evaluation"
    evaluate = ["evaluate", "--bundle", str(out), "--manifest", str(cohort40), "--cache", str(cache.folder)]
    assert main(evaluate + ["--report", str(report)]) == 0
    with open(report / "metrics.csv") as handle:
        scores = {row["metric"]: float(row["value"]) for row in csv.DictReader(handle)}
    assert scores == pytest.approx({k: v for k, v in spec.metrics.items() if k != "train_samples"})
    assert main(evaluate + ["--report", str(tmp_path / "all"), "--all-subjects"]) == 0
    assert "| diagnosis | cls | 40 |" in (tmp_path / "all" / "metrics.md").read_text()
    assert main(evaluate + ["--head", "nope"]) == 2


@pytest.mark.parametrize("patch_size", [8, 16])
def test_a_decoder_that_reads_pixels_sees_one_pixel_and_the_tokens_alone_do_not(patch_size):
    """A one-pixel change of the canvas moves the logits at and around that pixel (far more than elsewhere, which
    only the normalisations' image-wide statistics reach); a tokens-only decoder cannot see it."""
    from BrainDINOLib.heads import SegmentationDecoder

    torch.manual_seed(0)
    grid = 4
    tokens, canvas = torch.randn(1, 12, grid, grid), torch.rand(1, 2, grid * patch_size, grid * patch_size)
    changed = canvas.clone()
    changed[0, 1, 13, 21] += 1.0
    for image_channels in (0, 4):
        decoder = SegmentationDecoder(12, 3, patch_size, 32, image_channels, sequences=2).eval()
        with torch.no_grad():
            before, after = (decoder(tokens, image if image_channels else None) for image in (canvas, changed))
        assert before.shape == (1, 3, grid * patch_size, grid * patch_size)
        moved = (after - before).abs().amax(dim=1)[0]
        if image_channels:
            assert moved[13, 21] > 20 * moved[0, 0] and moved[13, 21 + patch_size // 2] > 20 * moved[0, 0]
        else:
            assert not moved.any()
    with pytest.raises(BrainDINOError, match="reads the canvas pixels too"):
        decoder(tokens)


def test_lesion_share_fills_every_batch_and_draws_each_slice_in_turn(tmp_path, capsys):
    """With a share, that share of every batch holds a label and each pool is drawn without repeats until it runs out;
    without one, the batches are reshuffled passes over all slices, as before the option existed. A share of 1 or
    one for a brain head is refused before anything is read."""
    targets = torch.zeros(40, 8, 8, dtype=torch.uint8)
    targets[[2, 3, 5, 7, 11, 19, 23, 31, 35, 39], 4, 4] = 3
    lesion = targets.flatten(1).amax(dim=1) > 0
    batches = training_batches(targets, SegOptions(lesion_share=0.75), torch.Generator().manual_seed(0))
    drawn = torch.stack([next(batches) for _ in range(5)])
    assert (lesion[drawn].sum(dim=1) == 12).all()
    counts = torch.bincount(drawn.flatten(), minlength=40)
    assert (counts[lesion] == 6).all()  # 60 draws from 10 slices: six full passes
    assert counts[~lesion].sum() == 20 and counts[~lesion].max() == 1  # 20 draws from 30: no slice twice
    for share, count in ((0.01, 1), (0.99, 15)):  # at least one slice of each kind
        first = next(training_batches(targets, SegOptions(lesion_share=share), torch.Generator().manual_seed(0)))
        assert lesion[first].sum() == count
    plain = training_batches(targets, SegOptions(), torch.Generator().manual_seed(0))
    expected = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(next(plain), expected[:16]) and torch.equal(next(plain), expected[16:32])
    everywhere = torch.ones_like(targets)
    with pytest.raises(BrainDINOError, match="both with and without a label"):
        next(training_batches(everywhere, SegOptions(lesion_share=0.5), torch.Generator()))
    fit = ["fit-head", "--manifest", str(tmp_path / "none"), "-o", str(tmp_path / "copy")]
    wrong = {"must be at least 0 and below 1, got 1.0": ["--task", "seg", "--lesion-share", "1"],
             "applies to --task seg only": ["--task", "brain", "--lesion-share", "0.5"]}  # fmt: skip
    for message, options in wrong.items():
        assert main([*fit, *options]) == 2
        assert message in capsys.readouterr().err
