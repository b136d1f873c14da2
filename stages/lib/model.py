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

import pickle
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from stages.lib.cli import StageError

TAP_BLOCKS = (2, 4, 7, 14)            # blocks whose expansion activation is a skip tap
TAP_CHANNELS = (96, 144, 192, 576)
BOTTLENECK_CHANNELS = 320
UP_FILTERS = (512, 256, 128, 64)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The latent layers of forward_with_latents, in its order: the bottleneck, then the decoder
# blocks from the deepest (decoder1) to the shallowest. infer names latents.npz's column
# ranges with them, explain finds their modules, params.yaml's analyze.heatmaps picks one
# (tests/test_params.py checks the schema's list against this one).
LATENT_LAYERS = ("bottleneck", "decoder1", "decoder2", "decoder3", "decoder4")


TRAINED_ARCH = "mobilenet_v2-pix2pix"
TRAINED_FILE = "a PyTorch state dict saved by segflow's train stage"


class WeightsError(StageError):
    """Weights (encoder weights, a trained model.pt) that cannot be obtained or read, or
    that do not fit the model."""


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
        # By hand rather than torchvision's create_feature_extractor, which gives the same
        # bits: its FX graph would have to live outside the registered modules (model.pt's
        # keys are the encoder's), costs a trace at every model build, and would go on
        # calling the old BatchNorms after convert_sync_batchnorm replaces them (GPU DDP).
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


def full_size_probs(logits: torch.Tensor, size: tuple[int, int],
                    log: bool = False) -> torch.Tensor:
    """(K, H, W) class probabilities (log-probabilities with `log`) of one sample's logits
    (K, h, w) at its image's own size: bilinear resize of the logits, then (log-)softmax.
    Resizing logits, not labels, keeps boundaries smooth; labels are never interpolated."""
    resized = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)
    return resized[0].log_softmax(0) if log else resized[0].softmax(0)


def build_model(num_classes: int, encoder_weights: str, freeze_encoder: bool,
                dropout: float, base_dir: Path = Path(".")) -> SegNet:
    model = SegNet(num_classes, dropout)
    state = _encoder_state(encoder_weights, base_dir)
    if state is not None:
        try:
            model.encoder.load_state_dict(state)
        except RuntimeError as exc:  # right keys and shapes, but e.g. a dtype it cannot take
            raise WeightsError(f"model.encoder_weights {encoder_weights!r}: not MobileNetV2 "
                               f"weights ({load_failure(exc)})") from None
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
        full = load_weights_file(path, "a torch state dict of MobileNetV2 weights "
                                       "(model.encoder_weights)")
    if not isinstance(full, dict):
        raise WeightsError(f"model.encoder_weights: {spec!r} holds a {type(full).__name__}, "
                           "not a state dict")
    return _features_only(full, spec)


def _features_only(state: dict, spec: str) -> dict:
    """Accept a whole torchvision MobileNetV2 state dict or just its `features` part."""
    prefix = "features."
    picked = {k[len(prefix):]: v for k, v in state.items()
              if isinstance(k, str) and k.startswith(prefix)} or dict(state)
    expected = SegNet(2).encoder.state_dict()
    keep = {k: v for k, v in picked.items() if k in expected}
    problem = state_dict_mismatch(expected, keep)
    if problem:
        raise WeightsError(f"model.encoder_weights {spec!r}: not a MobileNetV2 state dict "
                           f"({problem})")
    return keep


def load_weights_file(path: Path, expected: str, map_location: str | torch.device = "cpu",
                      error: type[StageError] = WeightsError) -> object:
    """torch.load(weights_only=True) of a file that may hold anything: every way it can fail
    (empty, cut short, random bytes, a pickle the weights-only unpickler refuses, unreadable)
    becomes one `error` line naming the file and what it should have been."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise error(f"{path}: not {expected} (empty file)")
        with warnings.catch_warnings():  # e.g. pickle-protocol notes: the error says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except StageError:
        raise
    except Exception as exc:  # zip, unpickling, EOF, index errors... all mean "not weights"
        raise error(f"{path}: not {expected} ({load_failure(exc)})") from None


def load_failure(exc: Exception) -> str:
    """The informative line of a torch.load error, without torch's advice to retry with
    weights_only=False (never right for a file that failed the safe load)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, pickle.UnpicklingError) and lines and "Weights only" in lines[0]:
        lines = [line for line in lines[1:]
                 if not line.startswith(("Please file an issue", "Check the documentation"))]
        lines = lines or ["refused by the weights-only unpickler"]
    first = lines[0].split(". ")[0].rstrip(".") if lines else "file ends early"
    first = first if len(first) <= 200 else first[:197] + "..."
    return f"{type(exc).__name__}: {first}"


def state_dict_mismatch(expected: dict, given: dict) -> str | None:
    """None when `given` has exactly `expected`'s keys with tensors of the same shapes and
    kinds of dtype, else what differs (a few examples of each kind). load_state_dict would
    raise on some of these and silently cast others (complex to real, say)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [f"{k} {_tensor_kind(given[k])} instead of {_tensor_kind(v)}"
             for k, v in expected.items() if k in given and not _fits(given[k], v)]
    parts = [f"{label} e.g. {items[:3]}" for label, items in
             (("missing", missing), ("unexpected", unexpected), ("wrong", wrong)) if items]
    return "; ".join(parts) or None


def _fits(given: object, expected: torch.Tensor) -> bool:
    return (isinstance(given, torch.Tensor) and given.shape == expected.shape
            and (given.dtype == expected.dtype
                 or given.is_floating_point() and expected.is_floating_point()))


def _tensor_kind(value: object) -> str:
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    return f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"


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
    """The model train wrote to `path` and its payload; anything else (a damaged file, a
    pickle, another model's weights) is one WeightsError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: no trained model (run the train stage first)")
    payload = load_weights_file(path, TRAINED_FILE, map_location=device)
    problem = trained_payload_problem(payload)
    if problem is None:
        model = SegNet(len(payload["class_names"]), payload["dropout"])
        problem = state_dict_mismatch(model.state_dict(), payload["state_dict"])
    if problem is not None:
        raise WeightsError(f"{path}: not {TRAINED_FILE} ({problem})")
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:  # e.g. a dtype torch cannot copy into the parameters
        raise WeightsError(f"{path}: not {TRAINED_FILE} ({load_failure(exc)})") from None
    return model.to(device).eval(), payload


def trained_payload_problem(payload: object) -> str | None:
    """What makes `payload` not what checkpoint_payload() writes, or None."""
    if not isinstance(payload, dict):
        return f"holds a {type(payload).__name__}, not a dict"
    missing = [k for k in ("arch", "state_dict", "class_names", "image_size", "dropout", "mean",
                           "std") if k not in payload]
    if missing:
        return f"missing keys {missing}"
    names, size, dropout = payload["class_names"], payload["image_size"], payload["dropout"]
    checks = [
        (payload["arch"] == TRAINED_ARCH, f"arch {payload['arch']!r} is not {TRAINED_ARCH!r}"),
        (isinstance(payload["state_dict"], dict), "state_dict is not a dict"),
        (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names),
         "class_names is not a list of at least 2 names"),
        (isinstance(size, int) and not isinstance(size, bool) and size > 0,
         f"image_size {size!r} is not a positive integer"),
        (isinstance(dropout, (int, float)) and 0 <= dropout < 1,
         f"dropout {dropout!r} is not in [0, 1)"),
        (all(_three_numbers(payload[k]) for k in ("mean", "std")),
         "mean and std are not 3 numbers each"),
    ]
    return next((message for ok, message in checks if not ok), None)


def _three_numbers(value: object) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def resolve_device(spec: str) -> torch.device:
    if spec == "cuda" and not torch.cuda.is_available():
        raise StageError("device: cuda requested but torch sees no CUDA device")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)
