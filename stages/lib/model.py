"""MobileNetV2 encoder + pix2pix decoder, as in the TensorFlow segmentation tutorial the
study used, rebuilt on torchvision's MobileNetV2.

Encoder taps (Keras layer name -> torchvision module, channels, stride):
  block_1_expand_relu  -> features[2].conv[0]   96  /2
  block_3_expand_relu  -> features[4].conv[0]  144  /4
  block_6_expand_relu  -> features[7].conv[0]  192  /8
  block_13_expand_relu -> features[14].conv[0] 576 /16
  block_16_project     -> features[17]         320 /32
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from stages.lib.cli import StageError

TAP_BLOCKS = (2, 4, 7, 14)            # blocks whose expansion activation is a skip tap
TAP_CHANNELS = (96, 144, 192, 576)
BOTTLENECK_CHANNELS = 320
UP_FILTERS = (512, 256, 128, 64)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(StageError):
    """Encoder weights that cannot be obtained or do not fit MobileNetV2."""


class UpBlock(nn.Module):
    """pix2pix `upsample`: ConvTranspose2d k3 s2 + BatchNorm + (Dropout) + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1,
                                         bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        # output_size makes the result match the skip tap even for odd encoder sizes.
        return self.act(self.dropout(self.norm(self.deconv(x, output_size=size))))


class SegNet(nn.Module):
    """Returns logits at input resolution; `forward_with_latents` also returns pooled features."""

    def __init__(self, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.encoder = mobilenet_v2(weights=None).features[:18]
        in_channels = BOTTLENECK_CHANNELS
        ups = []
        for filters, skip in zip(UP_FILTERS, reversed(TAP_CHANNELS)):
            ups.append(UpBlock(in_channels, filters, dropout))
            in_channels = filters + skip
        self.ups = nn.ModuleList(ups)
        self.head = nn.ConvTranspose2d(in_channels, num_classes, 3, stride=2, padding=1)
        self.num_classes = num_classes
        self.encoder_frozen = False

    def freeze_encoder(self) -> None:
        """No gradients and fixed BatchNorm statistics in the encoder, like Keras'
        `trainable = False` in the study (requires_grad alone would still update them)."""
        self.encoder.requires_grad_(False)
        self.encoder_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> "SegNet":
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        taps = []
        for index, block in enumerate(self.encoder):
            if index in TAP_BLOCKS:
                tap = block.conv[0](x)           # the expansion Conv-BN-ReLU6
                out = block.conv[1:](tap)
                x = x + out if block.use_res_connect else out
                taps.append(tap)
            else:
                x = block(x)
        return x, taps

    def forward_with_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        size = x.shape[-2:]
        h, taps = self.encode(x)
        features = [h]
        for up, skip in zip(self.ups, reversed(taps)):
            h = torch.cat([up(h, skip.shape[-2:]), skip], dim=1)
            features.append(h[:, : up.deconv.out_channels])
        logits = self.head(h, output_size=size)
        return logits, features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_latents(x)[0]


def pooled_latent(features: list[torch.Tensor]) -> torch.Tensor:
    """Global-average-pooled bottleneck and decoder activations, concatenated per sample."""
    return torch.cat([f.float().mean(dim=(2, 3)) for f in features], dim=1)


def build_model(num_classes: int, encoder_weights: str, freeze_encoder: bool,
                dropout: float, base_dir: Path = Path(".")) -> SegNet:
    model = SegNet(num_classes, dropout)
    state = _encoder_state(encoder_weights, base_dir)
    if state is not None:
        model.encoder.load_state_dict(state)
    if freeze_encoder:
        model.freeze_encoder()
    return model


def _encoder_state(spec: str, base_dir: Path) -> dict | None:
    if spec == "none":
        return None
    if spec == "imagenet":
        try:
            full = MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as exc:  # URLError, HTTPError, hash mismatch...
            raise WeightsError(
                "model.encoder_weights: imagenet needs torchvision's MobileNetV2 weights, "
                f"which could not be downloaded ({exc}); use a local file path or none") from None
    else:
        path = (base_dir / spec)
        if not path.is_file():
            raise WeightsError(f"model.encoder_weights: {spec!r} is neither imagenet, none, "
                               "nor an existing file")
        try:
            full = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling, zip and format errors all mean "not weights"
            raise WeightsError(f"model.encoder_weights: {spec!r} is not a torch state dict "
                               f"file: {exc}") from None
    if not isinstance(full, dict):
        raise WeightsError(f"model.encoder_weights: {spec!r} holds a {type(full).__name__}, "
                           "not a state dict")
    return _features_only(full, spec)


def _features_only(state: dict, spec: str) -> dict:
    """Accept a whole torchvision MobileNetV2 state dict or just its `features` part."""
    prefix = "features."
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} or dict(state)
    expected = set(SegNet(2).encoder.state_dict())
    keep = {k: v for k, v in picked.items() if k in expected}
    if set(keep) != expected:
        missing = sorted(expected - set(keep))[:3]
        raise WeightsError(f"model.encoder_weights {spec!r}: not a MobileNetV2 state dict "
                           f"(missing e.g. {missing})")
    return keep


def checkpoint_payload(model: SegNet, class_names: list[str], image_size: int,
                       model_params: dict) -> dict:
    """Everything needed to rebuild the model, in types torch.load(weights_only=True) accepts."""
    return {
        "state_dict": model.state_dict(),
        "class_names": list(class_names),
        "image_size": int(image_size),
        "dropout": float(model_params["dropout"]),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "arch": "mobilenet_v2-pix2pix",
    }


def load_trained(path: str | Path, device: torch.device) -> tuple[SegNet, dict]:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: no trained model (run the train stage first)")
    payload = torch.load(path, map_location=device, weights_only=True)
    model = SegNet(len(payload["class_names"]), payload["dropout"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), payload


def resolve_device(spec: str) -> torch.device:
    if spec == "cuda" and not torch.cuda.is_available():
        raise StageError("device: cuda requested but torch sees no CUDA device")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)
