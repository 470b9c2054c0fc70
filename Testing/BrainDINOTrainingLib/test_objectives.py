"""Losses, centering, heads and masks against lightly's implementations and reference properties."""

from __future__ import annotations

import math

import pytest
import torch
from lightly.loss import DINOLoss as LightlyDINOLoss
from lightly.loss import IBOTPatchLoss as LightlyIBOTPatchLoss
from lightly.loss import KoLeoLoss as LightlyKoLeoLoss

from BrainDINOTrainingLib.objectives.centering import EMACenter, sinkhorn_knopp
from BrainDINOTrainingLib.objectives.common import ema_update
from BrainDINOTrainingLib.objectives.dino_loss import DINOLoss
from BrainDINOTrainingLib.objectives.heads import DINOHead
from BrainDINOTrainingLib.objectives.ibot_loss import IBOTPatchLoss
from BrainDINOTrainingLib.objectives.koleo_loss import KoLeoLoss
from BrainDINOTrainingLib.objectives.masking import batch_masks, block_mask

G = torch.Generator().manual_seed(0)


def test_dino_loss_matches_lightly_with_a_zero_center():
    teacher = [torch.randn(8, 64, generator=G) for _ in range(2)]
    student = [torch.randn(8, 64, generator=G) for _ in range(6)]
    reference = LightlyDINOLoss(output_dim=64, warmup_teacher_temp=0.04, teacher_temp=0.04)(teacher, student, epoch=0)
    center = EMACenter(64)
    ours = DINOLoss(0.1)(student, [center.probabilities(t, 0.04) for t in teacher])
    torch.testing.assert_close(ours, reference)


def test_center_updates_only_when_asked_and_follows_the_ema():
    center = EMACenter(4, momentum=0.9)
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
    center.probabilities(logits, 0.1)
    assert torch.count_nonzero(center.center) == 0
    center.update(logits)
    torch.testing.assert_close(center.center, 0.1 * logits.mean(dim=0, keepdim=True))


def test_sinkhorn_knopp_equipartitions():
    logits = torch.rand(32, 16, generator=G) * 2 - 1  # DINOHead logits are cosines in [-1, 1]
    q = sinkhorn_knopp(logits, temperature=0.05, iterations=50)
    assert torch.isfinite(sinkhorn_knopp(logits * 50, temperature=0.04)).all()  # unused prototypes stay finite
    torch.testing.assert_close(q.sum(dim=1), torch.ones(32), atol=1e-4, rtol=0)  # rows are distributions
    torch.testing.assert_close(q.sum(dim=0), torch.full((16,), 2.0), atol=1e-2, rtol=0)  # prototypes used equally
    assert (q.argmax(dim=1) == logits.argmax(dim=1)).float().mean() > 0.5  # still follows the logits


def test_ibot_loss_matches_lightly():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2] = True
    masks[2, 1, 1:3] = True
    m = int(masks.sum())
    teacher, student = torch.randn(m, 32, generator=G), torch.randn(m, 32, generator=G)
    reference = LightlyIBOTPatchLoss(output_dim=32, teacher_temp=0.07)(teacher, student, masks)
    ours = IBOTPatchLoss(0.1)(student, EMACenter(32).probabilities(teacher, 0.07), masks)
    torch.testing.assert_close(ours, reference)


def test_koleo_matches_lightly_and_rewards_spread():
    x = torch.randn(16, 8, generator=G)
    torch.testing.assert_close(KoLeoLoss()(x), LightlyKoLeoLoss()(x))
    clustered = torch.ones(16, 8) + 0.01 * torch.randn(16, 8, generator=G)
    assert KoLeoLoss()(clustered) > KoLeoLoss()(x)
    with pytest.raises(ValueError, match="at least 2"):
        KoLeoLoss()(x[:1])


def test_koleo_stays_fp32_under_bf16_autocast():
    """Nearly collapsed embeddings (as early in training): bf16 similarities would pick wrong neighbours."""
    x = torch.randn(1, 32, generator=G) + 0.01 * torch.randn(64, 32, generator=G)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = KoLeoLoss()(x)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, KoLeoLoss()(x.double()).float())


def test_ema_keeps_the_momentum_share_of_the_target():
    torch.manual_seed(0)
    target, source = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, source, momentum=0.9)
    for updated, old, student in zip(target.parameters(), before, source.parameters(), strict=True):
        torch.testing.assert_close(updated.detach(), 0.9 * old + 0.1 * student.detach())


def test_dino_head_shapes_and_fixed_norm():
    head = DINOHead(96, prototypes=128, hidden_dim=64, bottleneck_dim=32)
    out = head(torch.randn(5, 96, generator=G))
    assert out.shape == (5, 128)
    weight = head.last_layer.weight
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(128))  # weight-normed rows of norm 1
    assert not head.last_layer.parametrizations.weight.original0.requires_grad


def test_block_masks_hit_their_ratio_and_half_the_batch():
    mask = block_mask((14, 14), 0.4, torch.Generator().manual_seed(1))
    assert abs(int(mask.sum()) - round(0.4 * 196)) <= 4
    masks = batch_masks(8, (14, 14), torch.Generator().manual_seed(2))
    masked = masks.flatten(1).any(dim=1)
    assert int(masked.sum()) == 4
    ratios = masks.flatten(1).float().mean(dim=1)[masked]
    assert ratios.min() >= 0.05 and ratios.max() <= 0.55
    assert torch.equal(masks, batch_masks(8, (14, 14), torch.Generator().manual_seed(2)))  # seeded


def test_uniform_collapse_value_is_log_k():
    """A teacher that says nothing (uniform) and a student that agrees give exactly ln(K)."""
    k = 4096
    uniform = [torch.zeros(4, k)] * 2
    loss = DINOLoss(0.1)(uniform * 2, [torch.full((4, k), 1 / k)] * 2)
    assert loss.item() == pytest.approx(math.log(k), rel=1e-6)
