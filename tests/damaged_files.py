"""Damaged and hostile files where segflow expects its own torch files (checkpoints,
model.pt, encoder weights), built by the tests themselves: what a full disk, a bad copy, a
stray file or an attacker can leave there."""
from __future__ import annotations

import io
import os
import random
from pathlib import Path

import torch

# Kinds of damage any torch file can suffer, whatever it held.
DAMAGE = ("empty", "truncated", "random_bytes", "text", "os_system_pickle")


class RunsCommand:
    """Unpickling this would run a shell command: the weights-only unpickler must refuse it."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def damaged(kind: str, real: bytes, marker: Path) -> bytes:
    """`real` (the bytes of a good file) damaged the `kind` way; the pickle would create
    `marker` if anything ever unpickled it unsafely."""
    if kind == "empty":
        return b""
    if kind == "truncated":
        return real[: len(real) // 2]
    if kind == "random_bytes":
        return random.Random(13).randbytes(4096)
    if kind == "text":  # the legacy-pickle path: torch raised IndexError: pop from empty list
        return b"this is not a checkpoint\n"
    if kind == "os_system_pickle":
        return torch_bytes({"state_dict": RunsCommand(f"touch {marker}")})
    raise ValueError(kind)


# Kinds of model.pt that are whole torch files, but not the model train writes.
NOT_A_MODEL = ("bare_state_dict", "other_architecture", "other_class_count", "not_a_dict",
               "bad_image_size")
CLASS_NAMES = ["background", "person", "car"]


def model_payload(num_classes: int = 3) -> dict:
    """What train writes to model.pt (random weights: no training needed)."""
    from stages.lib.model import SegNet, checkpoint_payload

    torch.manual_seed(5)
    return checkpoint_payload(SegNet(num_classes), CLASS_NAMES[:num_classes], 32,
                              {"dropout": 0.0, "freeze_encoder": False, "encoder_weights": "none"})


def damaged_model(kind: str, marker: Path) -> bytes:
    """A model.pt damaged or replaced the `kind` way (DAMAGE + NOT_A_MODEL)."""
    from torchvision.models import resnet18

    payload = model_payload()
    if kind == "bare_state_dict":
        return torch_bytes(payload["state_dict"])
    if kind == "other_architecture":
        return torch_bytes({**payload, "state_dict": resnet18(weights=None).state_dict()})
    if kind == "other_class_count":
        return torch_bytes({**payload, "class_names": CLASS_NAMES + ["bus"]})
    if kind == "not_a_dict":
        return torch_bytes([payload["state_dict"]])
    if kind == "bad_image_size":
        return torch_bytes({**payload, "image_size": -1})
    return damaged(kind, torch_bytes(payload), marker)


# The reason in the error line, for each kind of damaged file (torch 2.x's wording).
LOAD_REASONS = {
    "empty": r"empty file",
    "truncated": r"RuntimeError: PytorchStreamReader failed reading zip archive: failed "
                 r"finding central directory",
    "random_bytes": r"UnpicklingError: Unsupported operand \d+",
    "text": r"IndexError: pop from empty list",
    "os_system_pickle": r"UnpicklingError: Trying to load unsupported GLOBAL posix\.system "
                        r"whose module posix is blocked",
}
MODEL_REASONS = {
    **LOAD_REASONS,
    "bare_state_dict": r"missing keys \['arch', 'state_dict', 'class_names', 'image_size', "
                       r"'dropout', 'mean', 'std'\]",
    "other_architecture": r"missing e\.g\. \['encoder\.0\.0\.weight', 'encoder\.0\.1\.weight', "
                          r"'encoder\.0\.1\.bias'\]; unexpected e\.g\. \['conv1\.weight', "
                          r"'bn1\.weight', 'bn1\.bias'\]",
    "other_class_count": r"wrong e\.g\. \['head\.weight float32 \(160, 3, 3, 3\) instead of "
                         r"float32 \(160, 4, 3, 3\)', 'head\.bias float32 \(3,\) instead of "
                         r"float32 \(4,\)'\]",
    "not_a_dict": r"holds a list, not a dict",
    "bad_image_size": r"image_size -1 is not a positive integer",
}
