"""torch backend: the reference implementation (and what the ONNX parity test compares to).

Built from the network definitions in :mod:`engines.networks`, the packaged ImageNet
backbone and the small ``<model>.torch.pt`` sidecar saved beside each ONNX file (only the
tensors that differ from ImageNet, so the shipped weights stay small).

The engine reports the ONNX file's SHA-256 as its ``model_hash`` (the manifest checks that
one), but runs the sidecar's weights: so the sidecar is checked at load against the SHA-256
the folder's ``model.json`` records for it (:func:`check_sidecar`), and a stale or swapped
sidecar is refused instead of running other weights under the manifest's name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from engines.efficientnet_lite import load_imagenet_lite0
from engines.manifest import MANIFEST_NAME, read_manifest_json, sidecar_name
from engines.networks import (
    CLASSIFIER_OUTPUTS,
    SEGMENTER_OUTPUTS,
    ClassifierCamNet,
    SegmenterViewNet,
)
from engines.runtime.base import InputSpec, check_batch, file_sha256
from screener import atomic_files

log = logging.getLogger(__name__)

KINDS = ("segmenter", "classifier")


def sidecar_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(sidecar_name(onnx_path.name))


def check_sidecar(sidecar: Path) -> None:
    """Refuse, with a ValueError naming the file, a sidecar whose SHA-256 is not the one the
    ``model.json`` beside it records for it. A folder without a manifest (e.g. a training
    work dir) has nothing to check against; a manifest written before sidecars were
    recorded is read as before, with a warning that the sidecar is not checked."""
    folder = Path(sidecar).parent
    if not (folder / MANIFEST_NAME).exists():
        return
    data = read_manifest_json(folder)
    digests = data.get("sha256") if isinstance(data, dict) else None
    expected = digests.get(sidecar.name) if isinstance(digests, dict) else None
    if not expected:
        log.warning(
            "%s records no SHA-256 for %s (written before sidecars were recorded): the torch "
            "engine's weights are not checked against it; export the weights again with "
            "`screener export`",
            folder / MANIFEST_NAME,
            sidecar,
        )
        return
    actual = file_sha256(sidecar)
    if actual != expected:
        raise ValueError(
            f"{sidecar} is not the torch sidecar {folder / MANIFEST_NAME} records: its SHA-256 "
            f"is {actual[:12]}..., the manifest's {expected[:12]}... (a stale or swapped copy; "
            "export the weights, their sidecars and model.json together)"
        )


def build_network(kind: str) -> nn.Module:
    """A fresh network of ``kind`` on the packaged ImageNet backbone."""
    encoder = load_imagenet_lite0()
    if kind == "segmenter":
        return SegmenterViewNet(encoder)
    if kind == "classifier":
        return ClassifierCamNet(encoder)
    raise ValueError(f"unknown network kind {kind!r}")


def save_sidecar(model: nn.Module, kind: str, path: Path, input_shape: tuple[int, ...]) -> None:
    """Save the tensors of ``model`` that differ from a fresh ImageNet-backed network."""
    reference = build_network(kind).state_dict()
    state = {
        key: value.detach().clone()
        for key, value in model.state_dict().items()
        if key not in reference
        or reference[key].shape != value.shape
        or not torch.equal(reference[key], value)
    }
    payload = {"kind": kind, "input_shape": list(input_shape), "state_dict": state}

    def write(fh: BinaryIO) -> None:
        torch.save(payload, fh)

    atomic_files.write_with(path, write)  # never a torn sidecar beside a whole ONNX file


def load_sidecar(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network: ImageNet backbone + the sidecar's tensors, all keys accounted for
    (once :func:`check_sidecar` accepts the file)."""
    check_sidecar(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = build_network(payload["kind"])
    result = model.load_state_dict(payload["state_dict"], strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: unexpected tensors {result.unexpected_keys[:5]}")
    return model.eval(), payload


class TorchEngine:
    """Runs the torch network in eval mode; outputs named like the ONNX export."""

    def __init__(
        self, model: nn.Module, kind: str, input_shape: tuple[int, ...], model_hash: str = ""
    ) -> None:
        self.model = model.eval()
        self.input_spec = InputSpec(name="image", shape=input_shape)
        self.output_names: tuple[str, ...] = (
            SEGMENTER_OUTPUTS if kind == "segmenter" else CLASSIFIER_OUTPUTS
        )
        self.version = f"torch-{torch.__version__}"
        self.model_hash = model_hash

    @classmethod
    def from_onnx_sidecar(cls, onnx_path: Path, *, intra_op_threads: int = 1) -> TorchEngine:
        """The engine of ``onnx_path``'s sidecar (checked by :func:`load_sidecar`)."""
        if intra_op_threads > 0:
            torch.set_num_threads(intra_op_threads)
        model, payload = load_sidecar(sidecar_path(onnx_path))
        return cls(
            model, payload["kind"], tuple(payload["input_shape"]), file_sha256(Path(onnx_path))
        )

    @torch.no_grad()
    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = check_batch(self.input_spec, batch)
        outputs = self.model(torch.from_numpy(batch))
        return {name: out.numpy() for name, out in zip(self.output_names, outputs, strict=True)}
