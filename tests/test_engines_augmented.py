"""Augmented fine-tuning building blocks: paired augmentation, centred classes, a real run."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engines.efficientnet_lite import load_imagenet_lite0  # noqa: E402
from engines.networks import ClassifierCamNet  # noqa: E402
from engines.training.augmented import (  # noqa: E402
    AugmentConfig,
    SchemeInputs,
    augment,
    centre_classes,
    finetune_augmented,
    predict,
)


def test_augment_warps_image_and_lung_share_alike() -> None:
    # The lung share is the image itself: whatever affine is drawn, both must come out
    # the same (up to the photometric jitter, switched off here).
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((6, 1, 32, 32)).astype(np.float32))
    cfg = AugmentConfig(rotation_deg=15.0, scale=0.2, shift=0.1, gamma=0.0, contrast=0.0)
    xa, la = augment(image, image.clone(), cfg, torch.Generator().manual_seed(1))
    assert xa.shape == image.shape and la.shape == image.shape
    torch.testing.assert_close(xa, la.clamp(0, 1))
    assert not torch.allclose(xa, image)  # something did move
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0


def test_augment_photometric_jitter_keeps_range_and_order() -> None:
    ramp = torch.linspace(0, 1, 64).view(1, 1, 8, 8).repeat(4, 1, 1, 1)
    cfg = AugmentConfig(rotation_deg=0.0, scale=0.0, shift=0.0, gamma=0.3, contrast=0.2)
    xa, _ = augment(ramp, torch.ones_like(ramp), cfg, torch.Generator().manual_seed(0))
    for img in xa:
        flat = img.flatten()
        # A mirror may reverse each row; brightness stays monotone along the columns.
        assert float(flat.min()) >= 0.0 and float(flat.max()) <= 1.0
        assert bool((img[0, 1:, 0] >= img[0, :-1, 0]).all())


def test_centring_the_classes_changes_no_probability() -> None:
    net = ClassifierCamNet(load_imagenet_lite0()).eval()
    with torch.no_grad():
        net.fc.weight.normal_(0, 0.05)
        net.fc.bias.normal_(0, 1.0)
    x = torch.rand(2, 1, 64, 64)
    before = net(x)[0]
    centre_classes(net)
    after, cam, _ = net(x)
    torch.testing.assert_close(before, after, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cam.sum(dim=1), torch.zeros_like(cam[:, 0]), atol=1e-4, rtol=0)


def _toy_rows() -> list[dict[str, str]]:
    rows = []
    for split, n in (("train", 12), ("val", 6)):
        for i in range(n):
            source = "nih" if i % 2 else "ieee8023"
            label = (
                ("pneumonia", "normal")[i // 2 % 2]
                if source == "nih"
                else ("covid", "pneumonia")[i // 2 % 2]
            )
            rows.append(
                {"split": split, "label": label, "patient_id": f"{source}:{split}{i}", "id": ""}
            )
    return rows


def test_finetune_runs_keeps_the_best_validation_epoch_and_moves_only_the_tail() -> None:
    rows = _toy_rows()
    rng = np.random.default_rng(0)
    x = rng.random((len(rows), 1, 64, 64)).astype(np.float32)
    lung = np.zeros_like(x)
    lung[..., 8:56, 8:28] = 1.0
    lung[..., 8:56, 36:56] = 1.0
    net = ClassifierCamNet(load_imagenet_lite0()).eval()
    cfg = AugmentConfig(start_block=14, epochs=2, batch=8, lung_weight=0.5)
    tuned, history, epoch = finetune_augmented(net, rows, SchemeInputs(x, lung), cfg)
    assert [h["epoch"] for h in history] == [0.0, 1.0, 2.0]
    best = max(history, key=lambda h: h["val_score"])
    assert history[epoch]["val_score"] == best["val_score"]  # min_lung_fraction 0: all eligible
    probs, pooled, fraction = predict(tuned, x[12:], lung[12:])
    assert probs.shape == (6, 3) and pooled.shape == (6, 1280)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.all((fraction >= 0) & (fraction <= 1))
    fresh = ClassifierCamNet(load_imagenet_lite0()).state_dict()
    state = tuned.state_dict()
    assert torch.equal(
        state["encoder._blocks.13._project_conv.weight"],
        fresh["encoder._blocks.13._project_conv.weight"],
    )  # frozen trunk
    assert torch.equal(state["encoder._bn1.running_mean"], fresh["encoder._bn1.running_mean"])
    if epoch > 0:  # a later epoch was kept: the tail really moved
        assert not torch.equal(
            state["encoder._blocks.15._project_conv.weight"],
            fresh["encoder._blocks.15._project_conv.weight"],
        )
    assert not any(p.requires_grad for p in tuned.parameters())
