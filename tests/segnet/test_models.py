import json

import pytest
import torch
from torch import nn

from segnet import SegNetError, build_model, count_parameters, list_models
from segnet.layers import flat_indices, fold_batch_norm, pool, unpool
from segnet.models import MODELS, SegmentationModel, min_input_size
from segnet.paper import PAPER_TABLE1, SEGNET_PARAMS_M

# Table 1 (decoder variants, SegNet-Basic encoder) and Table 6 (SegNet), in millions, 11 classes.
PAPER_PARAMS = {"segnet": SEGNET_PARAMS_M, **{name: row["params_m"] for name, row in PAPER_TABLE1.items()}}
# Table 1 prints n/a for FCN-Basic-NoAddition: it keeps no encoder map, like the other 0 rows.
PAPER_STORAGE = {"segnet": 1, **{name: row["storage"] or 0 for name, row in PAPER_TABLE1.items()}}


def test_registry_lists_all_nine_models():
    assert sorted(list_models()) == sorted(PAPER_PARAMS)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_keeps_the_segmentation_model_contract(name):
    ctor = MODELS[name]
    num_pools = getattr(ctor, "func", ctor).num_pools  # on the class: read before any model is built
    model = build_model(name, num_classes=5, in_channels=4).eval()
    assert isinstance(model, nn.Module) and isinstance(model, SegmentationModel)
    assert isinstance(num_pools, int) and num_pools == model.num_pools
    assert min_input_size(name) == 2**num_pools
    assert isinstance(model.storage_multiplier, int) and model.storage_multiplier >= 0
    smallest = 2**num_pools
    with torch.no_grad():
        assert model(torch.randn(1, 4, smallest, smallest + 1)).shape == (1, 5, smallest, smallest + 1)
        with pytest.raises(SegNetError, match="too small"):
            model(torch.randn(1, 4, smallest - 1, smallest))


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_parameter_count_within_3_percent_of_paper(name):
    params = count_parameters(build_model(name, num_classes=11)) / 1e6
    assert abs(params - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.03, params


@pytest.mark.parametrize("name", list(PAPER_STORAGE))
def test_storage_multiplier_matches_table1(name):
    assert build_model(name, num_classes=11).storage_multiplier == PAPER_STORAGE[name]


def test_segnet_has_13_encoder_and_13_decoder_convs():
    model = build_model("segnet", num_classes=11)
    enc = [m for m in model.encoders.modules() if isinstance(m, nn.Conv2d)]
    dec = [m for m in model.decoders.modules() if isinstance(m, nn.Conv2d)]
    assert len(enc) == 13 and len(dec) == 13
    assert [c.out_channels for c in enc] == [64, 64, 128, 128, 256, 256, 256] + [512] * 6
    assert all(c.kernel_size == (3, 3) for c in enc + dec)
    assert dec[-1].out_channels == 11


def test_segnet_output_shape_at_camvid_size():
    model = build_model("segnet", num_classes=11).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 360, 480)).shape == (1, 11, 360, 480)


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
@pytest.mark.parametrize("size", [(360, 480), (37, 53), (33, 64)])
def test_output_shape_any_size(name, size):
    model = build_model(name, num_classes=5, in_channels=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 4, *size))
    assert out.shape == (2, 5, *size)


@pytest.mark.parametrize("name", ["segnet", "segnet-basic"])
def test_too_small_input_is_a_clear_error(name):
    with pytest.raises(SegNetError, match="at least"):
        build_model(name, num_classes=11)(torch.randn(1, 3, 8, 8))


def test_unpool_restores_values_at_argmax_positions():
    x = torch.randn(2, 3, 7, 9)
    y, pos, size = pool(x)
    up = unpool(y, pos, size)
    assert up.shape == x.shape
    flat_x, flat_up = x.flatten(2), up.flatten(2)
    idx = flat_indices(pos, size).flatten(2)
    # every pooled max lands where it came from, with its value
    assert torch.equal(flat_up.gather(2, idx), flat_x.gather(2, idx))
    assert torch.equal(flat_up.gather(2, idx), y.flatten(2))
    # and everything else is zero
    mask = torch.zeros_like(flat_up, dtype=torch.bool).scatter_(2, idx, True)
    assert (flat_up[~mask] == 0).all()
    assert mask.sum() == y.numel()


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (45, 60)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compact_pooling_matches_torch_pooling_with_int64_indices(size, channels_last):
    """Outputs and gradients of pool -> unpool equal nn.MaxPool2d/nn.MaxUnpool2d's, with 1-byte indices."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 5, *size).contiguous(memory_format=fmt).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    g = torch.randn(2, 5, *size)
    y, pos, s = pool(x)
    out = unpool(y * 2, pos, s)
    out.backward(g)
    ry, idx = torch.nn.functional.max_pool2d(ref, 2, 2, return_indices=True)
    rout = torch.nn.functional.max_unpool2d(ry * 2, idx, 2, 2, output_size=size)
    rout.backward(g)
    assert pos.dtype == torch.int8 and torch.equal(flat_indices(pos, s), idx)
    assert torch.equal(y, ry) and torch.equal(out, rout)
    assert torch.equal(x.grad, ref.grad)


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_gradients_reach_every_parameter(name):
    model = build_model(name, num_classes=11).train()
    x = torch.randn(2, 3, 48, 64)
    target = torch.randint(0, 11, (2, 48, 64))
    nn.functional.cross_entropy(model(x), target).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_unknown_model_names_the_choices():
    with pytest.raises(SegNetError, match="segnet-basic"):
        build_model("segnet-xl", num_classes=11)


def test_dropout_option_only_active_in_training():
    model = build_model("segnet", num_classes=11, dropout=0.5)
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.equal(a, model(x))


def _vgg16_state(bn: bool) -> dict:
    """A state dict in torchvision's vgg16 / vgg16_bn key layout (random values)."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    state, i, ch = {}, 0, 3
    for v in cfg:
        if v == "M":
            i += 1
            continue
        state[f"features.{i}.weight"] = torch.randn(v, ch, 3, 3)
        state[f"features.{i}.bias"] = torch.randn(v)
        if bn:
            for name in ("weight", "bias", "running_mean", "running_var"):
                state[f"features.{i + 1}.{name}"] = torch.rand(v)
            state[f"features.{i + 1}.num_batches_tracked"] = torch.tensor(0)
            i += 3
        else:
            i += 2
        ch = v
    state["classifier.0.weight"] = torch.randn(10, 10)
    return state


@pytest.mark.parametrize("bn", [False, True])
def test_vgg16_encoder_init_from_local_file(tmp_path, bn):
    state = _vgg16_state(bn)
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    model = build_model("segnet", num_classes=11, vgg16_weights=path)
    convs = [k for k in state if k.endswith(".weight") and state[k].ndim == 4]
    assert torch.equal(model.encoders[0][0][0].weight, state[convs[0]])
    assert torch.equal(model.encoders[4][2][0].weight, state[convs[-1]])
    if bn:  # the batch norm right after the last conv: features.40 -> features.41
        assert torch.equal(model.encoders[4][2][1].running_var, state["features.41.running_var"])


def test_vgg16_encoder_init_works_for_any_class_count(tmp_path):
    state = _vgg16_state(True)
    torch.save(state, tmp_path / "vgg.pth")
    model = build_model("segnet", num_classes=3, vgg16_weights=tmp_path / "vgg.pth")
    assert torch.equal(model.encoders[0][0][0].weight, state["features.0.weight"])
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_vgg16_file_with_wrong_shapes_is_refused(tmp_path):
    state = _vgg16_state(False)
    state["features.0.weight"] = torch.randn(64, 1, 3, 3)
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    with pytest.raises(SegNetError, match=r"features\.0\.weight has shape \(64, 1, 3, 3\)"):
        build_model("segnet", num_classes=11, vgg16_weights=path)


def test_vgg16_file_with_wrong_keys_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.randn(64, 3, 7, 7)}, path)
    with pytest.raises(SegNetError, match="expected the 13 of VGG16"):
        build_model("segnet", num_classes=11, vgg16_weights=path)


def test_vgg16_file_that_pickles_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": nn.Linear(2, 2)}, path)  # a pickled module, not tensors
    with pytest.raises(SegNetError, match="not a file of plain tensors .it asks to import torch.nn"):
        build_model("segnet", num_classes=11, vgg16_weights=path)


def test_segnet_models_json_cli(segnet_cli):
    out = segnet_cli("models", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert set(rows) == set(PAPER_PARAMS)
    for name, row in rows.items():
        assert abs(row["parameters"] / 1e6 - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.03
        assert row["storage_multiplier"] == PAPER_STORAGE[name]


def test_recomputed_segnet_trains_exactly_like_the_stored_one():
    """Recomputing the two largest resolutions' blocks in backward saves memory and changes nothing else: same
    outputs, gradients and batch-norm running statistics (which must not count the batch twice)."""
    torch.manual_seed(0)
    plain = build_model("segnet", num_classes=11)
    recomputing = build_model("segnet", num_classes=11, recompute=2)
    recomputing.load_state_dict(plain.state_dict())
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 11, (2, 64, 64))
    for model in (plain, recomputing):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    for (n, p), q in zip(plain.named_parameters(), recomputing.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n
    for (n, a), b in zip(plain.state_dict().items(), recomputing.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", ["segnet", "segnet-basic", "fcn-basic"])
def test_folded_batch_norm_infers_like_the_model(name):
    """Compared in float64: in float32 the two differ by rounding, and where two values of a pooling window
    are nearly equal that flips max pooling's choice and moves what unpooling puts back (SegNet's 26 layers
    at 64x64: 272 of 45056 outputs off by up to 3e-3 on an AMD EPYC, none on an Intel Xeon)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=11)
    with torch.no_grad():  # give batch norm statistics that are not the identity
        model.train()(torch.randn(2, 3, 64, 64))
    model = model.double().eval()
    folded = fold_batch_norm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=1e-9, atol=1e-9)


def test_recompute_beyond_the_resolution_levels_is_refused():
    with pytest.raises(SegNetError, match="recompute=6"):
        build_model("segnet", num_classes=11, recompute=6)
