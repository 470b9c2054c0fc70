"""Checkpoint import from timm and Meta key layouts and from teacher checkpoints; bundle integrity."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from BrainDINOLib.bundle import ENCODER_FILE, add_head, create_random_bundle, load_bundle, verify_bundle
from BrainDINOLib.cli import main
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.heads import HeadSpec, build_head
from BrainDINOLib.importers import import_checkpoint
from testdata import file_hashes

X = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _timm_model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(3)
    model = timm.create_model(name, num_classes=0, **kwargs).eval()
    with torch.no_grad():
        for key, value in model.named_parameters():
            if "gamma" in key:
                value.fill_(0.5)
    return model


def _dinov3_small():
    return _timm_model("vit_small_patch16_dinov3", embed_dim=96, depth=6, num_heads=3)


def _meta_dinov3(state: dict) -> dict:
    """timm Eva keys -> the key layout of Meta's DINOv3 release."""
    out = {}
    for key, value in state.items():
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[key] = value
    out["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    out["rope_embed.periods"] = torch.arange(8.0)
    for block in {k.split(".")[1] for k in state if k.startswith("blocks.")}:
        dim = state[f"blocks.{block}.attn.qkv.weight"].shape[0]
        out[f"blocks.{block}.attn.qkv.bias"] = torch.zeros(dim)
        out[f"blocks.{block}.attn.qkv.bias_mask"] = torch.ones(dim)
    return out


def _meta_dinov2_reg(state: dict) -> dict:
    """timm DINOv2-with-registers keys -> Meta's layout (pos_embed with a CLS slot, register_tokens)."""
    out = dict(state)
    out["register_tokens"] = out.pop("reg_token")
    out["pos_embed"] = torch.cat([torch.zeros_like(state["pos_embed"][:, :1]), state["pos_embed"]], dim=1)
    out["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return out


def _features(bundle_path) -> torch.Tensor:
    with torch.no_grad():
        return load_bundle(bundle_path).load_encoder().forward_features(X)


def _check_same_outputs(model, bundle_path):
    with torch.no_grad():
        expected = model.forward_features(X)
    torch.testing.assert_close(_features(bundle_path), expected, atol=1e-5, rtol=1e-5)


def test_timm_dinov3_state_dict(tmp_path):
    model = _dinov3_small()
    torch.save(model.state_dict(), tmp_path / "dinov3.pth")
    bundle = import_checkpoint(tmp_path / "dinov3.pth", tmp_path / "bundle")
    assert bundle.card.encoder.name == "vit-tiny16-dinov3" and not bundle.card.random_init
    assert bundle.card.training["key_layout"] == "timm"
    _check_same_outputs(model, bundle.path)


def test_meta_dinov3_layout(tmp_path):
    model = _timm_model("vit_small_patch16_dinov3")
    save_file(_meta_dinov3(model.state_dict()), tmp_path / "dinov3_vits16.safetensors")
    bundle = import_checkpoint(tmp_path / "dinov3_vits16.safetensors", tmp_path / "bundle")
    assert bundle.card.encoder.name == "vit-s16-dinov3" and bundle.card.training["key_layout"] == "Meta"
    _check_same_outputs(model, bundle.path)


def test_timm_dinov2_at_518_is_resampled_to_the_canvas(tmp_path):
    """Position embeddings that vary linearly down the rows (channel 0) and across the columns (channel 1) of the
    37 x 37 grid keep doing so on the 16 x 16 grid, sampled at the new patches' centres; the CLS entry is kept."""
    model = _timm_model("vit_small_patch14_dinov2")  # timm default: 518 px, 37x37 position grid
    ramp = torch.arange(37, dtype=torch.float32) / 36
    with torch.no_grad():
        grid = model.pos_embed[0, 1:].view(37, 37, 384)
        grid[..., 0], grid[..., 1] = ramp[:, None], ramp[None, :]
    torch.save(model.state_dict(), tmp_path / "dinov2.pth")
    bundle = import_checkpoint(tmp_path / "dinov2.pth", tmp_path / "bundle")
    encoder = load_bundle(bundle.path).load_encoder()
    assert encoder.model.pos_embed.shape == (1, 1 + 16 * 16, 384)
    torch.testing.assert_close(encoder.model.pos_embed[0, 0], model.pos_embed[0, 0])
    resampled = encoder.model.pos_embed[0, 1:].view(16, 16, 384)
    centres = ((torch.arange(16) + 0.5) * 37 / 16 - 0.5) / 36  # the old grid's coordinate of each new patch
    inner = slice(2, 14)  # away from the border, where resampling pads
    torch.testing.assert_close(resampled[inner, inner, 0], centres[inner, None].expand(12, 12), atol=0.01, rtol=0)
    torch.testing.assert_close(resampled[inner, inner, 1], centres[None, inner].expand(12, 12), atol=0.01, rtol=0)
    for key, value in model.state_dict().items():
        if key != "pos_embed":
            torch.testing.assert_close(encoder.model.state_dict()[key], value)


def test_meta_dinov2_with_registers(tmp_path):
    model = _timm_model("vit_small_patch14_reg4_dinov2", img_size=224)
    torch.save(_meta_dinov2_reg(model.state_dict()), tmp_path / "dinov2_vits14_reg4.pth")
    bundle = import_checkpoint(tmp_path / "dinov2_vits14_reg4.pth", tmp_path / "bundle")
    assert bundle.card.encoder.name == "vit-s14-reg4-dinov2"
    _check_same_outputs(model, bundle.path)


def test_teacher_training_checkpoint_drops_heads(tmp_path):
    model = _dinov3_small()
    teacher = {f"backbone.{k}": v for k, v in _meta_dinov3(model.state_dict()).items()}
    teacher["dino_head.mlp.0.weight"] = torch.randn(2048, 96)
    teacher["ibot_head.last_layer.weight_g"] = torch.ones(4096, 1)
    checkpoint = {"teacher": teacher, "student": {"backbone.cls_token": torch.zeros(1, 1, 96)}, "iteration": 1000}
    torch.save(checkpoint, tmp_path / "training_checkpoint.pth")
    bundle = import_checkpoint(tmp_path / "training_checkpoint.pth", tmp_path / "bundle")
    assert bundle.card.training["container"] == "teacher"
    _check_same_outputs(model, bundle.path)


def test_the_ema_weights_are_taken_over_the_trained_model(tmp_path):
    """A checkpoint holding the trained model and its EMA (timm's training scripts): the EMA is the one to keep."""
    ema, trained = _dinov3_small(), _dinov3_small()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    torch.save({"model": trained.state_dict(), "model_ema": ema.state_dict()}, tmp_path / "run.pth")
    bundle = import_checkpoint(tmp_path / "run.pth", tmp_path / "bundle")
    assert bundle.card.training["container"] == "model_ema"
    _check_same_outputs(ema, bundle.path)


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": _dinov3_small().state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "unsafe.pth")
    with pytest.raises(BrainDINOError, match="refusing to unpickle"):
        import_checkpoint(tmp_path / "unsafe.pth", tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_unknown_architecture_asks_for_encoder(tmp_path):
    model = _timm_model("vit_small_patch16_dinov3", embed_dim=128, depth=2, num_heads=2)
    torch.save(model.state_dict(), tmp_path / "odd.pth")
    with pytest.raises(BrainDINOError, match="name it with --encoder"):
        import_checkpoint(tmp_path / "odd.pth", tmp_path / "bundle")
    with pytest.raises(BrainDINOError, match="weights do not fit vit-tiny16-dinov3"):
        import_checkpoint(tmp_path / "odd.pth", tmp_path / "bundle", encoder_name="vit-tiny16-dinov3")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(BrainDINOError, match="not a readable checkpoint"):
        import_checkpoint(tmp_path / "notes.pth", tmp_path / "bundle")


def test_tampered_bundle_is_refused(tmp_path):
    torch.save(_dinov3_small().state_dict(), tmp_path / "dinov3.pth")
    bundle = import_checkpoint(tmp_path / "dinov3.pth", tmp_path / "bundle")
    assert verify_bundle(bundle.path) == []
    weights = bundle.path / "encoder.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(BrainDINOError, match="sha256 differs"):
        load_bundle(bundle.path)
    (bundle.path / "extra.safetensors").write_bytes(b"")
    assert any("not listed" in problem for problem in verify_bundle(bundle.path))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ([torch.zeros(2)], "holds a list, not a state dict"),
        ({"cls_token": torch.zeros(1, 1, 8), "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}, "no transformer"),
        (None, "not a readable checkpoint"),
    ],
)
def test_malformed_checkpoints_are_one_line_errors(tmp_path, content, problem):
    path = tmp_path / "odd.pth"
    if content is None:
        path.write_bytes(b"")
    else:
        torch.save(content, path)
    with pytest.raises(BrainDINOError, match=problem) as raised:
        import_checkpoint(path, tmp_path / "bundle", encoder_name="vit-tiny16-dinov3")
    assert str(raised.value).startswith(str(path))


@pytest.fixture
def good_card(tmp_path, default_bundle):
    bundle = tmp_path / "copy"
    shutil.copytree(default_bundle, bundle)
    return bundle, json.loads((bundle / "model.json").read_text())


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda card: [card], "not a BrainDINO model card"),
        (lambda card: {**card, "preprocessing": {**card["preprocessing"], "clip_percentiles": [1, 2, 3]}}, "invalid"),
        (lambda card: {**card, "preprocessing": {**card["preprocessing"], "image_size": 200}}, "not a multiple"),
        (lambda card: {**card, "encoder": {**card["encoder"], "timm_name": "nope"}}, "timm has no model 'nope'"),
        (lambda card: {**card, "files": ["encoder.safetensors"]}, "field 'files' must be an object, not a list"),
        (lambda card: {k: v for k, v in card.items() if k != "encoder"}, "invalid model card"),
    ],
)
def test_hand_edited_model_cards_are_one_line_errors(good_card, edit, problem):
    bundle, card = good_card
    (bundle / "model.json").write_text(json.dumps(edit(card)))
    with pytest.raises(BrainDINOError, match=problem) as raised:
        load_bundle(bundle)
    assert str(raised.value).startswith(str(bundle / "model.json"))


def test_a_reference_from_the_earlier_linear_classifier_asks_to_be_recalibrated(good_card):
    """The bundle still loads (its encoder and heads are unchanged); only its out-of-distribution check asks for
    ``braindino calibrate``."""
    bundle, card = good_card
    stored = load_file(bundle / "ood.safetensors")
    linear = {name: tensor for name, tensor in stored.items() if not name.startswith("outlier_")}
    linear["outlier_weights"], linear["outlier_bias"] = (
        stored["outlier_weights_0"][:, 0].clone(),
        stored["outlier_bias_0"][:1],
    )
    save_file(linear, bundle / "ood.safetensors")
    card["files"]["ood.safetensors"] = file_hashes(bundle)["ood.safetensors"]
    (bundle / "model.json").write_text(json.dumps(card))
    loaded = load_bundle(bundle)
    with pytest.raises(BrainDINOError, match="predates the current outlier classifier; run braindino calibrate"):
        loaded.load_typicality()


def test_force_replaces_only_bundles(tmp_path, capsys):
    torch.save(_dinov3_small().state_dict(), tmp_path / "tiny.v2.pth")
    keep = tmp_path / "models" / "keep"
    keep.mkdir(parents=True)
    (keep / "notes.txt").write_text("precious")
    assert main(["models", "import", str(tmp_path / "tiny.v2.pth"), "--models-dir", str(tmp_path / "models")]) == 0
    assert (tmp_path / "models" / "tiny.v2" / "model.json").is_file()  # name keeps inner dots
    args = ["models", "import", str(tmp_path / "tiny.v2.pth"), "-o", str(keep), "--force"]
    assert main(args) == 2
    assert "not a model bundle; refusing to replace it" in capsys.readouterr().err
    assert (keep / "notes.txt").read_text() == "precious"
    assert main(["models", "import", str(tmp_path / "tiny.v2.pth"), "--name", ".", "--models-dir", str(keep)]) == 2
    assert "not a usable bundle name" in capsys.readouterr().err


def test_a_head_whose_card_cannot_be_written_leaves_the_bundle_as_it_was(tmp_path):
    """Head weights and the card that lists their hash are written as a pair: when the card fails (metrics a JSON
    encoder refuses), the earlier head's weights and card stay, the bundle still verifies, no temporary is left."""
    bundle = create_random_bundle(tmp_path / "bundle", "vit-tiny16-dinov3")
    spec = HeadSpec("age", "reg", "age", encoder_sha256=bundle.card.files[ENCODER_FILE])
    torch.manual_seed(0)
    add_head(bundle.path, spec, build_head(spec, bundle.card.encoder.embed_dim, 16))
    before = file_hashes(bundle.path)
    broken = dataclasses.replace(spec, metrics={"mae": np.float32(3.5)})
    with pytest.raises(TypeError, match="float32"):
        add_head(bundle.path, broken, build_head(spec, bundle.card.encoder.embed_dim, 16))
    assert file_hashes(bundle.path) == before and not verify_bundle(bundle.path)
    assert load_bundle(bundle.path).card.heads == (spec,)
