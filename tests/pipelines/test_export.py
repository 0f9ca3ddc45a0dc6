"""`segnet export --format onnx`: the graph runs in onnxruntime and agrees with PyTorch on CamVid images."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pipelines.cli import main
from pipelines.export import camvid_batch
from segnet import build_model
from tests.helpers import mlflow_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(register_seeded, camvid_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    uri = mlflow_store(tmp / "mlflow.db")
    register_seeded(uri, "onnx-test", 4, 0.5, tmp)
    return uri, tmp / "model.onnx"


def test_export_agrees_with_pytorch_on_camvid_test_images(exported, camvid_dir, capsys):
    """The figures are the test's own: the ONNX file run in onnxruntime against the registered checkpoint's
    weights in a model the test builds (not the folded model the exporter compared with)."""
    uri, out = exported
    argv = ["export", "models:/onnx-test@champion", "--format", "onnx", "--out", str(out), "--json"]
    assert main([*argv, "--mlflow-uri", uri, "--source", str(camvid_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch_ms_per_image"] > 0 and report["onnxruntime_ms_per_image"] > 0
    model = build_model("segnet-basic", num_classes=11).eval()
    model.load_state_dict(torch.load(out.parent / "onnx-test-4" / "model.pt", weights_only=True))
    x = camvid_batch(camvid_dir, 8, (90, 120))
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).numpy()
    theirs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.999
    assert (np.abs(ours - theirs) <= 1e-3).mean() >= 0.95


def test_the_onnx_graph_is_standard_ops_with_a_dynamic_batch_and_metadata(exported, camvid_dir):
    _, out = exported
    proto = onnx.load(str(out))
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["model"] == "models:/onnx-test/1" and meta["image_size"] == [90, 120]
    x = camvid_batch(camvid_dir, 3, (90, 120))
    logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert logits.shape == (3, 11, 90, 120) and np.isfinite(logits).all()


@pytest.mark.parametrize("size", [(8, 12), (45, 60)])
def test_pooling_then_unpooling_exports_exactly_with_ties_and_odd_sizes(size, tmp_path):
    import torch

    from segnet.layers import pool, unpool

    class PoolUnpool(torch.nn.Module):
        def forward(self, x):
            y, pos, shape = pool(x)
            return unpool(2 * y, pos, shape)

    x = torch.randn(2, 4, *size)
    x[:, :, ::3] = 0  # whole rows of ties
    torch.onnx.export(PoolUnpool(), (x,), str(tmp_path / "pool.onnx"), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(tmp_path / "pool.onnx"), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.array_equal(theirs, PoolUnpool()(x).numpy())
