"""The encoder wrapper against timm's own forward paths."""

from __future__ import annotations

import pytest
import timm
import torch

from BrainDINOLib.encoder import ENCODERS, BrainEncoder, encoder_config
from BrainDINOLib.errors import BrainDINOError


def _trained_like(name: str, seed: int = 0) -> BrainEncoder:
    """A random encoder whose LayerScale is 1 so every block (the last one included) matters."""
    torch.manual_seed(seed)
    encoder = BrainEncoder(ENCODERS[name]).eval()
    with torch.no_grad():
        for key, value in encoder.model.named_parameters():
            if "gamma" in key:
                value.fill_(1.0)
    return encoder


def _fused_reference(encoder: BrainEncoder) -> torch.nn.Module:
    config = encoder.config
    reference = timm.create_model(
        config.timm_name,
        num_classes=0,
        img_size=224,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
    ).eval()
    reference.load_state_dict(encoder.model.state_dict())
    assert all(block.attn.fused_attn for block in reference.blocks)
    return reference


@pytest.mark.parametrize("name", ["vit-tiny16-dinov3", "vit-s14-reg4-dinov2"])
def test_explicit_attention_path_matches_fused_forward(name):
    encoder = _trained_like(name)
    reference = _fused_reference(encoder)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = encoder(x, layers=(1, 3))
        tokens, intermediates = reference.forward_intermediates(x, indices=[1, 3], output_fmt="NLC")
    prefix = encoder.num_prefix_tokens
    grid = 224 // encoder.config.patch_size
    torch.testing.assert_close(output.cls, tokens[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(output.patch_tokens, tokens[:, prefix:].reshape(3, grid, grid, -1), atol=1e-4, rtol=1e-4)
    for block, expected in zip((1, 3), intermediates, strict=True):
        torch.testing.assert_close(output.layers[block], expected.reshape(3, grid, grid, -1), atol=1e-4, rtol=1e-4)
    assert output.attention.shape == (3, encoder.config.num_heads, grid, grid)
    mass = output.attention.sum(dim=(-1, -2))
    assert torch.all(mass > 0) and torch.all(mass <= 1 + 1e-5)  # the rest goes to CLS and registers


def test_attention_equals_softmax_of_last_block_queries_and_keys():
    """DINOv2 has no RoPE, so the CLS attention can be recomputed by hand from the last block's qkv."""
    encoder = _trained_like("vit-s14-reg4-dinov2")
    block = encoder.model.blocks[-1]
    seen = {}
    block.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0]))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        output = encoder(x)
        tokens = block.norm1(seen["x"])
        qkv = block.attn.qkv(tokens).reshape(2, tokens.shape[1], 3, 6, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        attention = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)
    expected = attention[:, :, 0, encoder.num_prefix_tokens :].reshape(2, 6, 16, 16)
    torch.testing.assert_close(output.attention, expected, atol=1e-5, rtol=1e-4)


def test_dinov3_attention_is_the_softmax_of_rope_rotated_queries_and_keys():
    """DINOv3 rotates the patch tokens' queries and keys (RoPE, halves) before the softmax; recomputed by hand from
    the last block's input and rotary embedding, the CLS -> patch attention matches, and without RoPE it does not."""
    encoder = _trained_like("vit-tiny16-dinov3")
    block, heads = encoder.model.blocks[-1], encoder.config.num_heads
    assert block.attn.rotate_half and block.attn.q_bias is None  # the layout computed below
    seen = {}
    block.register_forward_pre_hook(lambda module, args, kwargs: seen.update(x=args[0], **kwargs), with_kwargs=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    prefix = encoder.num_prefix_tokens
    with torch.no_grad():
        output = encoder(x)
        tokens = block.norm1(seen["x"])
        q, k, _ = block.attn.qkv(tokens).reshape(2, tokens.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        sin, cos = seen["rope"].chunk(2, dim=-1)

        def rotated(t: torch.Tensor) -> torch.Tensor:
            half = t.shape[-1] // 2
            return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin

        def cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            attention = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)
            return attention[:, :, 0, prefix:].reshape(2, heads, 14, 14)

        q_rope = torch.cat([q[:, :, :prefix], rotated(q[:, :, prefix:])], dim=2)
        k_rope = torch.cat([k[:, :, :prefix], rotated(k[:, :, prefix:])], dim=2)
    torch.testing.assert_close(output.attention, cls_attention(q_rope, k_rope), atol=1e-5, rtol=1e-4)
    without_rope = cls_attention(q, k)
    assert ((output.attention - without_rope).abs() / output.attention).max() > 0.02


def test_registry_builds_and_rejects_unknown():
    for name in ("vit-tiny16-dinov3", "vit-s16-dinov3", "vit-s14-dinov2"):
        encoder = BrainEncoder(encoder_config(name))
        assert encoder.num_prefix_tokens == 1 + encoder.config.num_reg_tokens
    with pytest.raises(BrainDINOError, match="unknown encoder 'vit-h99'"):
        encoder_config("vit-h99")
    with pytest.raises(BrainDINOError, match="out of range"):
        BrainEncoder(encoder_config("vit-tiny16-dinov3"))(torch.zeros(1, 3, 224, 224), layers=(6,))


def test_rope_encoder_reads_a_larger_canvas_as_one_built_for_it():
    """RoPE angles are computed for the grid at hand: the 224-px encoder at 448 px is the 448-px encoder."""
    encoder = _trained_like("vit-tiny16-dinov3")
    built_for_448 = BrainEncoder(encoder.config, img_size=448).eval()
    built_for_448.model.load_state_dict(encoder.model.state_dict())
    x = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        output, expected = encoder(x, layers=(2,)), built_for_448(x, layers=(2,))
    assert output.patch_tokens.shape == (1, 28, 28, 96) and output.attention.shape == (1, 3, 28, 28)
    torch.testing.assert_close(output.patch_tokens, expected.patch_tokens)
    torch.testing.assert_close(output.layers[2], expected.layers[2])
    torch.testing.assert_close(output.attention, expected.attention)
    assert encoder.config.any_canvas and not encoder_config("vit-s14-dinov2").any_canvas
