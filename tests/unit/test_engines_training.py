"""Training building blocks (small and fast): heads, weights, sidecars, export, model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engines.training.classifier import (  # noqa: E402
    balanced_weights,
    fit_linear,
    source_class_weights,
    within_source_aucs,
)


def test_fit_linear_folds_standardisation_into_the_weights() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, size=(200, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 7.5).astype(np.int64)
    head = fit_linear(x, y, 2, weight_decay=1e-3, steps=300)
    accuracy = float(((head.probabilities(x)[:, 1] >= 0.5) == (y == 1)).mean())
    assert accuracy > 0.95  # raw, unstandardised features work directly
    np.testing.assert_allclose(head.probabilities(x).sum(axis=1), 1.0, atol=1e-6)


def _outside_share(weight: np.ndarray, maps: np.ndarray, lung: np.ndarray) -> float:
    magnitude = np.abs(np.einsum("k,nkhw->nhw", weight, maps))
    return float(((magnitude * (1 - lung)).sum((1, 2)) / magnitude.sum((1, 2))).mean())


def test_lung_prior_moves_cam_magnitude_into_the_lungs() -> None:
    # Two equally informative channels: one lives outside the lungs (a shortcut, e.g. a
    # label or a border), one inside. The penalty must shift the CAM to the inside one.
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    lung = np.zeros((n, 2, 2), np.float32)
    lung[:, :, 0] = 1.0  # left map column is lung
    signal = y[:, None] + 0.6 * rng.normal(size=(n, 2)) + 2.0
    maps = np.zeros((n, 2, 2, 2), np.float32)
    maps[:, 0, :, 1] = signal[:, :1]  # channel 0 outside the lungs
    maps[:, 1, :, 0] = signal[:, 1:]  # channel 1 inside
    x = maps.mean(axis=(2, 3))
    plain = fit_linear(x, y, 2, weight_decay=1e-3)
    guided = fit_linear(
        x,
        y,
        2,
        weight_decay=1e-3,
        lung_prior=3.0,
        prior_maps=(maps.astype(np.float16), lung),
        prior_class=1,
    )
    assert _outside_share(plain.weight[1], maps, lung) > 0.35
    assert _outside_share(guided.weight[1], maps, lung) < 0.2
    np.testing.assert_allclose(guided.weight.sum(axis=0), 0.0, atol=1e-5)  # centred gauge
    accuracy = float(((guided.probabilities(x)[:, 1] >= 0.5) == (y == 1)).mean())
    assert accuracy > 0.75  # still uses the inside channel


def test_weightings_balance_classes_and_source_cells() -> None:
    y = np.array([0, 0, 0, 1])
    w = balanced_weights(y, 2)
    assert w[0] * 3 == pytest.approx(w[1] * 1)
    rows = [
        {"patient_id": "nih:1"},
        {"patient_id": "nih:2"},
        {"patient_id": "nih:3"},
        {"patient_id": "ieee8023:1"},
    ]
    sw = source_class_weights(rows, y)
    assert sw[:3].sum() == pytest.approx(sw[3])  # each (source, label) cell weighs the same
    assert sw.sum() == pytest.approx(len(sw))


def test_within_source_aucs_use_only_that_source() -> None:
    rows = [
        {"patient_id": "ieee8023:a", "label": "covid"},
        {"patient_id": "ieee8023:b", "label": "pneumonia"},
        {"patient_id": "nih:c", "label": "pneumonia"},
        {"patient_id": "nih:d", "label": "normal"},
        {"patient_id": "hannover:e", "label": "covid"},
    ]
    probs = np.array(
        [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.0, 0.5, 0.5]]
    )
    aucs = within_source_aucs(rows, probs)
    assert aucs["ieee8023_covid_vs_other_auc"] == 1.0
    assert aucs["nih_pneumonia_vs_normal_auc"] == 1.0
    assert aucs["n_ieee8023"] == 2 and aucs["n_nih"] == 2


def test_export_and_sidecar_round_trip(tmp_path: Path) -> None:
    from engines.efficientnet_lite import load_imagenet_lite0
    from engines.export import export_onnx
    from engines.networks import ClassifierCamNet
    from engines.runtime.base import load_engine

    torch.manual_seed(0)
    net = ClassifierCamNet(load_imagenet_lite0())
    with torch.no_grad():
        net.fc.weight.normal_(0, 0.01)
        net.encoder._blocks[15]._project_conv.weight.mul_(1.01)  # a "fine-tuned" tensor
    path = export_onnx(net, "classifier", tmp_path / "c.onnx", (1, 224, 224))
    payload = torch.load(tmp_path / "c.torch.pt", weights_only=True)
    keys = set(payload["state_dict"])
    assert "fc.weight" in keys and "encoder._blocks.15._project_conv.weight" in keys
    assert "encoder._blocks.0._depthwise_conv.weight" not in keys  # ImageNet tensors not stored
    x = np.random.default_rng(0).random((2, 1, 224, 224), dtype=np.float32)
    a = load_engine("onnxruntime", path).infer(x)
    b = load_engine("torch", path).infer(x)
    assert np.max(np.abs(a["probabilities"] - b["probabilities"])) < 1e-4


def test_an_export_that_fails_keeps_the_previous_onnx_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-export killed half-way must not leave a torn ONNX file under the shipped name."""
    from engines import export
    from engines.efficientnet_lite import load_imagenet_lite0
    from engines.networks import ClassifierCamNet

    target = tmp_path / "c.onnx"
    target.write_bytes(b"previous export")
    real = torch.onnx.export

    def dies_half_way(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        Path(str(args[2])).write_bytes(b"torn")
        raise RuntimeError("killed")

    monkeypatch.setattr(export.torch.onnx, "export", dies_half_way)
    with pytest.raises(RuntimeError, match="killed"):
        export.export_onnx(
            ClassifierCamNet(load_imagenet_lite0()), "classifier", target, (1, 224, 224)
        )
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx"]


def test_model_card_renders_measured_numbers() -> None:
    from engines.model_card import render_model_card

    scheme = {
        "weight_decay": 0.1,
        "weighting": "class",
        "threshold": 0.1234,
        "val_sensitivity": "0.95",
        "test_sensitivity": "0.9 [..]",
        "test_specificity": "0.8 [..]",
        "leakage_probe_auc_nih_vs_rest": 0.91,
        "val": {
            "ieee8023_covid_vs_other_auc": 0.7,
            "nih_pneumonia_vs_normal_auc": 0.8,
            "covid_vs_rest_auc": 0.9,
        },
        "test": {
            "ieee8023_covid_vs_other_auc": 0.77,
            "nih_pneumonia_vs_normal_auc": 0.88,
            "covid_vs_rest_auc": 0.93,
            "covid_vs_rest_ap": 0.9,
            "n_ieee8023": 66,
            "n_nih": 109,
        },
        "heatmap_lung_fraction_covid_test": {"n": 68, "mean_vs_predicted_mask": 0.61},
        "heatmap_lung_fraction_covid_val": {"n": 104, "mean_vs_predicted_mask": 0.587},
        "subgroups": [
            {
                "group": "view",
                "value": "AP",
                "n": 3,
                "n_covid": 1,
                "auc": None,
                "sensitivity": "s",
                "specificity": "p",
            }
        ],
    }
    metrics = {
        "name": "m",
        "version": "9.9.9",
        "production_scheme": "segment",
        "target_sensitivity": 0.95,
        "segmenter": {
            "epochs": 1,
            "dice_test_mean": 0.951,
            "dice_test_median": 0.96,
            "n_test": 45,
            "dice_val_mean": 0.93,
            "n_val": 66,
        },
        "view": {
            "test_accuracy": 1.0,
            "test_accuracy_low": 0.98,
            "test_n": 202,
            "test_n_lateral": 7,
            "val_accuracy": 0.99,
            "val_n": 249,
        },
        "schemes": {"segment": scheme},
    }
    card = render_model_card(json.loads(json.dumps(metrics)), ["segment"])
    assert "m@9.9.9" in card and "NOT FOR DIAGNOSTIC USE" in card
    assert "0.1234" in card and "0.770" in card and "0.951" in card and "Wilson" in card
    assert "0.587 (n=104)" in card  # validation heatmap lung fraction
    assert "Augmented fine-tuning of the" not in card  # no section for a step that did not run

    from dataclasses import asdict

    from engines.training.augmented import AugmentConfig

    history = [
        {
            "epoch": float(e),
            "train_loss": None if e == 0 else 0.5,
            "val_score": 0.78 + e / 100,
            "ieee8023_covid_vs_other_auc": 0.75,
            "nih_pneumonia_vs_normal_auc": 0.81 + e / 50,
            "val_covid_map_lung_fraction": 0.5 + e / 10,
        }
        for e in range(3)
    ]
    scheme["augmented_finetune"] = {
        "config": asdict(AugmentConfig(start_block=8, lung_weight=1.0, min_lung_fraction=0.7)),
        "history": history,
        "chosen_epoch": 2.0,
        "kept": True,
    }
    card = render_model_card(json.loads(json.dumps(metrics)), ["segment"])
    assert "Lite0 blocks 8-15" in card and "lung-attention price 1" in card
    assert "(chosen: epoch\n  2); kept only if within 0.01" in card and "(kept: yes)" in card
    assert "Augmented fine-tuning of the segment scheme" in card
    assert "| 2 | 0.500 | 0.750 | 0.850 | 0.800 | 0.700 |" in card  # per-epoch history row
    assert "| 0 | n/a |" in card  # epoch 0 = the starting head, no training loss
