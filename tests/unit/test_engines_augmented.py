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


# ------------------------------------------------------------------------------------------
# Archive-robust fine-tune (engines.training.robust)


def test_covid_logit_is_the_log_odds_of_the_softmax() -> None:
    from engines.training.robust import covid_logit

    logits = torch.tensor([[2.0, 0.5, -1.0], [-3.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    p = torch.softmax(logits, dim=1)[:, 0]
    torch.testing.assert_close(covid_logit(logits), torch.log(p / (1 - p)))


def _entry(epoch: int, score: float, lung: float, j2k: float, jpeg: float) -> dict[str, object]:
    return {
        "epoch": epoch,
        "val_score": score,
        "val_covid_map_lung_fraction": lung,
        "copies": {
            "jpeg2000_10to1": {"mean_abs_delta": j2k},
            "jpeg_baseline_q90": {"mean_abs_delta": jpeg},
        },
    }


@pytest.mark.parametrize(
    ("score", "lung", "j2k", "jpeg", "expected"),
    [
        (0.790, 0.90, 0.020, 0.020, True),  # both down by 33 %, AUC within 0.01
        (0.780, 0.90, 0.020, 0.020, False),  # AUC mean 0.015 below the start
        (0.795, 0.65, 0.010, 0.010, False),  # heatmaps left the lungs
        (0.800, 0.90, 0.020, 0.0215, False),  # JPEG only 28 % better
        (0.800, 0.90, 0.0215, 0.010, False),  # JPEG 2000 only 28 % better
    ],
)
def test_the_shipping_rule_needs_auc_lungs_and_both_compressions(
    score: float, lung: float, j2k: float, jpeg: float, expected: bool
) -> None:
    from engines.training.robust import ships

    start = _entry(0, 0.795, 0.91, 0.030, 0.030)
    assert ships(_entry(2, score, lung, j2k, jpeg), start) is expected
    assert ships(start, start) is False  # epoch 0 is the network it started from


def test_archive_copies_go_through_the_run_time_path() -> None:
    """Every kind of training copy is a real, decodable DICOM of its kind, and yields a
    classifier input and a lung share like the service's."""
    from engines.training.robust import TRAIN_KINDS, _prepared_inputs, as_received, random_copy
    from engines.training.scoring import frontal_split
    from screener.screening.models import ScreeningModels
    from screener.settings import Settings
    from screener.testing.dicom_factory import corpus_image
    from tests.conftest import CXR_DIR

    if not (CXR_DIR / "manifest.csv").exists():
        pytest.skip(f"corpus not found at {CXR_DIR}")
    row = frontal_split(CXR_DIR, "train")[0]
    pixels = corpus_image(CXR_DIR, row["id"])
    rng = np.random.default_rng(0)
    copies = [random_copy(pixels, row, kind, rng) for kind in TRAIN_KINDS]
    syntaxes = [str(as_received(ds).file_meta.TransferSyntaxUID) for ds, _ in copies]
    assert syntaxes[0] == "1.2.840.10008.1.2.4.91" and syntaxes[1] == "1.2.840.10008.1.2.4.50"
    assert copies[2][1].startswith("rotate")
    settings = Settings()
    from engines.training.robustness import corpus_instance

    reference = corpus_instance(pixels, row, bits_stored=12)
    out = _prepared_inputs(
        [reference, *(ds for ds, _ in copies)], ScreeningModels.from_settings(settings), settings
    )
    assert all(o is not None for o in out)
    x = [o[0] for o in out if o is not None]
    share = [o[1] for o in out if o is not None]
    assert all(a.shape == (224, 224) for a in x + share)
    assert all(0.0 <= float(a.min()) and float(a.max()) <= 1.0 for a in x)
    assert 0.0 < float(share[0].mean()) < 1.0
    assert all(float(np.abs(a - x[0]).mean()) > 0 for a in x[1:])  # each copy differs


def test_robust_finetune_records_validation_copies_and_keeps_the_rule() -> None:
    from engines.training.robust import CachedSplit, RobustConfig, eligible, finetune_robust

    rows = _toy_rows()
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"] * 2  # enough for a calibration fit
    rng = np.random.default_rng(0)

    def split(n: int, copies: list[str]) -> CachedSplit:
        x = rng.random((n, 1, 64, 64)).astype(np.float16)
        noisy = np.clip(x + rng.normal(0, 0.05, (n, len(copies) - 1, 64, 64)), 0, 1)
        lung = np.zeros((n, 64, 64), np.uint8)
        lung[:, 8:56, 8:56] = 255
        return CachedSplit([], np.concatenate([x, noisy.astype(np.float16)], axis=1), lung, copies)

    train = split(len(train_rows), ["reference", "random_jpeg2000", "random_jpeg"])
    train.rows = train_rows
    val = split(
        len(val_rows),
        ["reference", "jpeg2000_10to1", "jpeg_baseline_q90", "rotate_minus_5", "rotate_plus_5"],
    )
    val.rows = val_rows
    net = ClassifierCamNet(load_imagenet_lite0()).eval()
    cfg = RobustConfig(
        start_block=14,
        epochs=1,
        batch=6,
        consistency_weight=2.0,
        teacher_weight=1.0,
        copy_jitter=0.02,
    )
    tuned, history, epoch = finetune_robust(net, train, val, cfg)
    assert [h["epoch"] for h in history] == [0, 1]
    assert set(history[1]["copies"]) == set(val.copies[1:])
    assert all(v["mean_abs_delta"] >= 0 for v in history[1]["copies"].values())
    if epoch == 1:
        assert eligible(history[1], history[0])
        assert history[1]["compression_mean_abs_delta"] < history[0]["compression_mean_abs_delta"]
    fresh = ClassifierCamNet(load_imagenet_lite0()).state_dict()
    state = tuned.state_dict()
    assert torch.equal(
        state["encoder._blocks.13._project_conv.weight"],
        fresh["encoder._blocks.13._project_conv.weight"],
    )
    assert not any(p.requires_grad for p in tuned.parameters())
