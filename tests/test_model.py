"""MobileNetV2 + pix2pix model: encoder taps, output size, weights, freezing, checkpoints."""
from __future__ import annotations

import re
import urllib.error

import pytest
import torch
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2, resnet18

from damaged_files import (DAMAGE, LOAD_REASONS, MODEL_REASONS, NOT_A_MODEL, damaged,
                           damaged_model)
from stages.lib.cli import StageError
from stages.lib.model import (SegNet, WeightsError, build_model, checkpoint_payload, load_trained,
                              pooled_latent, resolve_device)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def net(one_torch_thread) -> SegNet:
    torch.manual_seed(0)
    return SegNet(3).eval()


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory):
    """A full torchvision MobileNetV2 state dict (random init, no download) on disk."""
    torch.manual_seed(123)
    state = mobilenet_v2(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.pth"
    torch.save(state, path)
    return path, state


@torch.no_grad()
def test_taps_channels_and_strides(net):
    x = torch.randn(2, 3, 128, 128)
    bottleneck, taps = net.encode(x)
    assert [tuple(t.shape) for t in taps] == [(2, 96, 64, 64), (2, 144, 32, 32),
                                             (2, 192, 16, 16), (2, 576, 8, 8)]
    assert tuple(bottleneck.shape) == (2, 320, 4, 4)
    # taps are ReLU6 activations
    for tap in taps:
        assert tap.min() >= 0 and tap.max() <= 6


@torch.no_grad()
def test_taps_are_the_expansion_activations_of_torchvision_blocks(net):
    """Same tensors as hooks on features[2|4|7|14].conv[0] during a plain encoder pass."""
    seen = {}
    hooks = [net.encoder[i].conv[0].register_forward_hook(
        lambda mod, inp, out, i=i: seen.__setitem__(i, out)) for i in (2, 4, 7, 14)]
    try:
        x = torch.randn(1, 3, 128, 128)
        plain = net.encoder(x)
        bottleneck, taps = net.encode(x)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(net.encoder) == 18
    assert torch.allclose(bottleneck, plain, atol=1e-5)
    for tap, index in zip(taps, (2, 4, 7, 14)):
        assert torch.allclose(tap, seen[index], atol=1e-5)


@pytest.mark.parametrize("size", [(128, 128), (100, 150), (97, 61), (64, 32)])
@torch.no_grad()
def test_output_size_equals_input_size(net, size):
    logits = net(torch.randn(1, 3, *size))
    assert tuple(logits.shape) == (1, 3, *size)


@torch.no_grad()
def test_latents(net):
    logits, features = net.forward_with_latents(torch.randn(2, 3, 100, 150))
    assert [f.shape[1] for f in features] == [320, 512, 256, 128, 64]
    latent = pooled_latent(features)
    assert tuple(latent.shape) == (2, 1280)
    assert torch.allclose(latent[:, :320], features[0].mean(dim=(2, 3)))


def test_decoder_layout():
    model = SegNet(5, dropout=0.25)
    assert [up.deconv.out_channels for up in model.ups] == [512, 256, 128, 64]
    assert [up.deconv.in_channels for up in model.ups] == [320, 512 + 576, 256 + 192, 128 + 144]
    assert all(up.deconv.kernel_size == (3, 3) and up.deconv.stride == (2, 2) for up in model.ups)
    assert all(isinstance(up.dropout, torch.nn.Dropout2d) and up.dropout.p == 0.25
               for up in model.ups)
    assert (model.head.in_channels, model.head.out_channels) == (64 + 96, 5)
    assert isinstance(SegNet(2).ups[0].dropout, torch.nn.Identity)


def _expected_encoder(state: dict) -> dict:
    return {k[len("features."):]: v for k, v in state.items()
            if k.startswith("features.") and int(k.split(".")[1]) < 18}


def test_build_model_with_local_weights_file(mobilenet_file):
    path, state = mobilenet_file
    model = build_model(3, str(path), freeze_encoder=False, dropout=0.0)
    expected = _expected_encoder(state)
    loaded = model.encoder.state_dict()
    assert set(loaded) == set(expected) and len(expected) > 100
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    # and differs from a fresh random init
    assert not torch.equal(SegNet(3).encoder.state_dict()["0.0.weight"], loaded["0.0.weight"])


def test_build_model_with_relative_path_and_features_only_dict(mobilenet_file, tmp_path):
    _, state = mobilenet_file
    torch.save(_expected_encoder(state), tmp_path / "features.pth")
    model = build_model(2, "features.pth", False, 0.0, base_dir=tmp_path)
    assert torch.equal(model.encoder.state_dict()["17.conv.2.weight"],
                       state["features.17.conv.2.weight"])


def test_bad_weights_path_is_weights_error(tmp_path):
    with pytest.raises(WeightsError, match=r"'nope\.pth' is neither imagenet, none, nor an "
                                           r"existing file"):
        build_model(3, "nope.pth", False, 0.0, base_dir=tmp_path)
    assert issubclass(WeightsError, StageError)


def test_incomplete_state_dict_is_weights_error(mobilenet_file, tmp_path):
    _, state = mobilenet_file
    partial = dict(state)
    del partial["features.17.conv.2.weight"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="not a MobileNetV2 state dict"):
        build_model(3, str(tmp_path / "partial.pth"), False, 0.0)


def test_imagenet_without_network_is_weights_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setattr(type(MobileNet_V2_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(WeightsError, match="imagenet.*could not be downloaded"):
        build_model(3, "imagenet", False, 0.0)


def test_other_architecture_is_weights_error(tmp_path):
    torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(WeightsError) as caught:
        build_model(3, str(tmp_path / "resnet.pth"), False, 0.0)
    assert str(caught.value) == (f"model.encoder_weights '{tmp_path / 'resnet.pth'}': not a "
                                 "MobileNetV2 state dict (missing e.g. ['0.0.weight', "
                                 "'0.1.weight', '0.1.bias'])")


def test_corrupt_weights_file_is_weights_error(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError) as caught:
        build_model(3, str(tmp_path / "junk.pth"), False, 0.0)
    # the last parentheses hold torch's own reason (today "IndexError: pop from empty list"),
    # which is torch's to word: only its presence on the one line is checked
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'junk.pth'))}: not a torch state dict of "
                        r"MobileNetV2 weights \(model\.encoder_weights\) "
                        r"\([A-Za-z]+Error: [^\n]+\)",
                        str(caught.value))


def test_freeze_encoder():
    frozen = build_model(3, "none", freeze_encoder=True, dropout=0.0)
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    assert all(p.requires_grad for p in frozen.ups.parameters())
    assert all(p.requires_grad for p in frozen.head.parameters())
    free = build_model(3, "none", freeze_encoder=False, dropout=0.0)
    assert all(p.requires_grad for p in free.parameters())


def test_frozen_encoder_weights_do_not_change_in_training():
    torch.manual_seed(0)
    model = build_model(3, "none", freeze_encoder=True, dropout=0.0)
    before = {k: v.clone() for k, v in model.encoder.named_parameters()}
    head_before = model.head.weight.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)),
                                             torch.randint(0, 3, (2, 64, 64)))
    loss.backward()
    optimizer.step()
    for key, value in model.encoder.named_parameters():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(model.head.weight, head_before)


def test_frozen_encoder_batchnorm_statistics_do_not_change_in_training():
    from stages.train import train_epoch
    torch.manual_seed(0)
    model = build_model(3, "none", freeze_encoder=True, dropout=0.0)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = [(torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64)))]
    train_epoch(model, batch, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                torch.device("cpu"))
    changed = [k for k, v in model.encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == []


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    model = SegNet(4, dropout=0.1)
    model.train()
    with torch.no_grad():  # move BatchNorm running statistics away from their init
        model(torch.randn(2, 3, 64, 64))
    model.eval()
    names = ["background", "person", "car", "bus"]
    payload = checkpoint_payload(model, names, 64, {"dropout": 0.1, "freeze_encoder": False,
                                                    "encoder_weights": "none"})
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    raw = torch.load(path, weights_only=True)
    assert raw["class_names"] == names and raw["image_size"] == 64
    assert raw["dropout"] == pytest.approx(0.1) and raw["arch"] == "mobilenet_v2-pix2pix"
    assert raw["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert raw["std"] == pytest.approx([0.229, 0.224, 0.225])
    loaded, meta = load_trained(path, torch.device("cpu"))
    assert meta["class_names"] == names
    assert not loaded.training
    assert loaded.ups[0].dropout.p == pytest.approx(0.1)
    x = torch.randn(2, 3, 80, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(StageError, match="cuda requested"):
            resolve_device("cuda")


# ---------------------------------------------------------------- damaged files

@pytest.mark.parametrize("kind", DAMAGE + NOT_A_MODEL)
def test_damaged_or_foreign_model_file_is_one_weights_error_naming_it(tmp_path, kind):
    path = tmp_path / "model.pt"
    bad = damaged_model(kind, tmp_path / "pwned")
    path.write_bytes(bad)
    with pytest.raises(WeightsError) as caught:
        load_trained(path, torch.device("cpu"))
    assert re.fullmatch(rf"{re.escape(str(path))}: not a PyTorch state dict saved by segflow's "
                        rf"train stage \({MODEL_REASONS[kind]}\)", str(caught.value))
    assert path.read_bytes() == bad and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["random_bytes", "os_system_pickle"])
def test_encoder_weights_the_safe_loader_refuses_are_one_line_naming_the_file(tmp_path, kind):
    """torch's own message is several lines long and advises weights_only=False."""
    path = tmp_path / "weights.pth"
    path.write_bytes(damaged(kind, b"", tmp_path / "pwned"))
    with pytest.raises(WeightsError) as caught:
        build_model(3, str(path), False, 0.0)
    assert re.fullmatch(rf"{re.escape(str(path))}: not a torch state dict of MobileNetV2 weights "
                        rf"\(model\.encoder_weights\) \({LOAD_REASONS[kind]}\)", str(caught.value))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind, wrong", [
    ("half_width", r"'0\.0\.weight float32 \(16, 3, 3, 3\) instead of float32 \(32, 3, 3, 3\)'"),
    ("complex", r"'0\.0\.weight complex64 \(32, 3, 3, 3\) instead of float32 \(32, 3, 3, 3\)'"),
])
def test_encoder_weights_of_other_shapes_or_dtypes_are_weights_error(tmp_path, kind, wrong):
    """Same keys as MobileNetV2: load_state_dict raised a bare size-mismatch RuntimeError for
    a narrower network, and silently dropped the imaginary part of complex weights."""
    state = mobilenet_v2(weights=None, width_mult=0.5 if kind == "half_width" else 1.0).state_dict()
    if kind == "complex":
        state = {k: v.to(torch.complex64) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, tmp_path / "weights.pth")
    with pytest.raises(WeightsError, match=rf"^model\.encoder_weights '{re.escape(str(tmp_path))}/"
                                           rf"weights\.pth': not a MobileNetV2 state dict \(wrong "
                                           rf"e\.g\. \[{wrong}, "):
        build_model(3, str(tmp_path / "weights.pth"), False, 0.0)


# ---------------------------------------------------------------- full-size probabilities

def test_full_size_probs_resize_logits_half_pixel_then_softmax():
    from stages.lib.model import full_size_probs

    # class 0's logit goes 0 -> 4 across two pixels, class 1's stays 0; at four pixels the
    # half-pixel bilinear weights give 0, 1, 3, 4 (edges clamped), softmax by hand.
    logits = torch.tensor([[[0.0, 4.0]], [[0.0, 0.0]]])
    probs = full_size_probs(logits, (1, 4))
    expected = [1 / (1 + torch.exp(-torch.tensor(v))).item() for v in (0.0, 1.0, 3.0, 4.0)]
    assert probs.shape == (2, 1, 4) and probs.dtype == torch.float32
    torch.testing.assert_close(probs[0, 0], torch.tensor(expected))
    torch.testing.assert_close(probs[1, 0], 1 - torch.tensor(expected))
    log_probs = full_size_probs(logits, (1, 4), log=True)
    torch.testing.assert_close(log_probs, torch.log(torch.tensor([expected, [1 - e for e in
                                                                            expected]]))[:, None])


def test_full_size_probs_takes_half_precision_logits():
    from stages.lib.model import full_size_probs

    logits = torch.randn(3, 4, 5, dtype=torch.float16)
    probs = full_size_probs(logits, (8, 10))
    assert probs.dtype == torch.float32 and probs.shape == (3, 8, 10)
    torch.testing.assert_close(probs.sum(0), torch.ones(8, 10))
