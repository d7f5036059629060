"""The seed-ensemble experiment's parts: logit averaging that keeps the CAM exact, the rule."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engines.efficientnet_lite import load_imagenet_lite0  # noqa: E402
from engines.networks import ClassifierCamNet  # noqa: E402
from engines.training.seed_ensemble import (  # noqa: E402
    SHIPPED_AUGMENT,
    EnsembleCamNet,
    training_inputs,
    verdict,
)


def _net(seed: int) -> ClassifierCamNet:
    torch.manual_seed(seed)
    net = ClassifierCamNet(load_imagenet_lite0())
    torch.nn.init.normal_(net.fc.weight, std=0.05)
    torch.nn.init.normal_(net.fc.bias, std=0.5)
    return net.eval()


@torch.no_grad()
def test_an_ensemble_averages_logits_and_its_cam_is_still_the_score() -> None:
    a, b = _net(1), _net(2)
    x = torch.from_numpy(np.random.default_rng(0).random((2, 1, 64, 64)).astype(np.float32))
    p_one, cam_one, _ = EnsembleCamNet([a])(x)
    p_a, cam_a, pooled_a = a(x)
    torch.testing.assert_close(p_one, p_a)
    torch.testing.assert_close(cam_one, cam_a)
    probabilities, cam, pooled = EnsembleCamNet([a, b])(x)
    _, cam_b, pooled_b = b(x)
    logits = (a.fc(pooled_a) + b.fc(pooled_b)) / 2
    torch.testing.assert_close(probabilities, torch.softmax(logits, dim=1))
    torch.testing.assert_close(cam, (cam_a + cam_b) / 2)
    # GAP + linear: the spatial mean of the CAM plus the mean bias is the logit
    bias = (a.fc.bias + b.fc.bias) / 2
    torch.testing.assert_close(cam.mean(dim=(2, 3)) + bias, logits, rtol=1e-4, atol=1e-4)
    assert pooled.shape[1] == pooled_a.shape[1] * 2
    with pytest.raises(ValueError):
        EnsembleCamNet([])


def _entry(score: float, lung: float, j2k: float, jpeg: float) -> dict[str, object]:
    return {
        "val_score": score,
        "val_covid_map_lung_fraction": lung,
        "copies": {
            "jpeg2000_10to1": {"mean_abs_delta": j2k},
            "jpeg_baseline_q90": {"mean_abs_delta": jpeg},
        },
    }


def test_the_rule_needs_auc_lung_share_and_a_30_percent_gain_on_both_codecs() -> None:
    single = _entry(0.80, 0.9, 0.030, 0.030)
    assert verdict(_entry(0.80, 0.9, 0.020, 0.0205), single)
    assert not verdict(_entry(0.799, 0.9, 0.020, 0.020), single)  # lower AUC mean
    assert not verdict(_entry(0.81, 0.69, 0.020, 0.020), single)  # heatmaps off the lungs
    assert not verdict(_entry(0.81, 0.9, 0.020, 0.022), single)  # JPEG only -27 %
    assert not verdict(_entry(0.81, 0.9, 0.025, 0.010), single)  # JPEG 2000 only -17 %


def test_members_are_trained_as_the_shipped_network_was() -> None:
    """Only the seed differs from the shipped augmented fine-tune (metrics.json)."""
    import json
    from dataclasses import asdict

    from engines.manifest import SHIPPED_WEIGHTS_DIR

    metrics = json.loads((SHIPPED_WEIGHTS_DIR / "metrics.json").read_text())
    shipped = metrics["schemes"]["crop"]["augmented_finetune"]["config"]
    assert asdict(SHIPPED_AUGMENT) == shipped


def test_training_inputs_take_the_reference_copy_of_both_splits() -> None:
    from engines.training.robust import CachedSplit

    rows_t = [{"id": "a", "split": "train"}, {"id": "b", "split": "train"}]
    rows_v = [{"id": "c", "split": "val"}]
    x_t = np.stack([np.full((3, 4, 4), k, np.float16) for k in (1, 2)])
    x_t[:, 1:] = 9  # copies: never trained on
    x_v = np.full((1, 5, 4, 4), 3, np.float16)
    train = CachedSplit(rows_t, x_t, np.full((2, 4, 4), 255, np.uint8), ["reference", "j", "k"])
    val = CachedSplit(rows_v, x_v, np.zeros((1, 4, 4), np.uint8), ["reference", *"abcd"])
    rows, inputs = training_inputs(train, val)
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert inputs.x.shape == (3, 1, 4, 4) and inputs.x.dtype == np.float32
    assert inputs.x[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]
    assert inputs.lung[:, 0, 0, 0].tolist() == [1.0, 1.0, 0.0]
