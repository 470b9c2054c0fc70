"""Batched encoding: determinism, batch-size invariance, progress and cancellation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from BrainDINOLib.bundle import load_bundle
from BrainDINOLib.engine import Cancelled, encode_volume, resolve_device
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.preprocess import prepare
from BrainDINOLib.volume import load_volume
from testdata import save


@pytest.fixture(scope="module")
def prepared_and_encoder(tmp_path_factory, mni_2mm, default_bundle):
    bundle = load_bundle(default_bundle)
    volume = load_volume(save(mni_2mm, tmp_path_factory.mktemp("engine") / "mni2.nii.gz"))
    return prepare(volume, bundle.card.preprocessing), bundle.load_encoder()


def test_same_input_same_output_and_batch_size_invariance(prepared_and_encoder):
    prepared, encoder = prepared_and_encoder
    first = encode_volume(prepared, encoder, device="cpu", batch_size=16, layers=(2,))
    again = encode_volume(prepared, encoder, device="cpu", batch_size=16, layers=(2,))
    for a, b in (
        (first.cls, again.cls),
        (first.patch_tokens, again.patch_tokens),
        (first.attention, again.attention),
        (first.layers[2], again.layers[2]),
    ):
        np.testing.assert_array_equal(a, b)
    other = encode_volume(prepared, encoder, device="cpu", batch_size=5)
    np.testing.assert_allclose(other.cls, first.cls, atol=1e-4)
    np.testing.assert_array_equal(first.slices, prepared.slices)
    assert first.patch_tokens.dtype == np.float16 and first.patch_tokens.shape == (len(prepared.slices), 14, 14, 96)
    assert first.attention.shape == (len(prepared.slices), 3, 14, 14)


def test_progress_and_cancellation_within_one_batch(prepared_and_encoder):
    prepared, encoder = prepared_and_encoder
    reports, calls = [], []
    forward = encoder.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    encoder.forward = counting_forward
    try:
        with pytest.raises(Cancelled):
            encode_volume(
                prepared,
                encoder,
                device="cpu",
                batch_size=8,
                progress=lambda done, total: reports.append(done),
                cancel=lambda: len(reports) > 0,
            )
    finally:
        del encoder.forward
    # The request came with the first progress report (batch 0 stored, batch 1 prepared on the host while batch 0
    # computed): no forward pass after it.
    assert reports == [8] and len(calls) == 1
    complete = []
    encode_volume(
        prepared, encoder, device="cpu", batch_size=8, progress=lambda done, total: complete.append((done, total))
    )
    total = len(prepared.slices)
    assert complete[-1] == (total, total) and len(complete) == -(-total // 8)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(BrainDINOError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(BrainDINOError, match="unknown device"):
        resolve_device("tpu7")
