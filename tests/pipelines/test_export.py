"""`segnet export --format onnx`: the graph runs in onnxruntime and agrees with PyTorch on CamVid images."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipelines.cli import main
from pipelines.export import camvid_batch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(register_seeded, camvid_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{tmp}/mlflow.db"
    register_seeded(uri, "onnx-test", 4, 0.5, tmp)
    return uri, tmp / "model.onnx"


def test_export_agrees_with_pytorch_on_camvid_test_images(exported, camvid_dir, capsys):
    uri, out = exported
    argv = ["export", "models:/onnx-test@champion", "--format", "onnx", "--out", str(out), "--json"]
    assert main([*argv, "--mlflow-uri", uri, "--source", str(camvid_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["argmax_agreement"] >= 0.999 and report["logits_within_1e-3"] >= 0.95
    assert report["torch_ms_per_image"] > 0 and report["onnxruntime_ms_per_image"] > 0


def test_the_onnx_graph_is_standard_ops_with_a_dynamic_batch_and_metadata(exported, camvid_dir):
    _, out = exported
    proto = onnx.load(str(out))
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["model"] == "models:/onnx-test/1" and meta["image_size"] == [90, 120]
    x = camvid_batch(camvid_dir, 3, (90, 120))
    logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert logits.shape == (3, 11, 90, 120) and np.isfinite(logits).all()
