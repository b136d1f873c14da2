"""Output folders a stage cannot write, whoever runs the tests: root writes through
chmod 0o555, so either a parent that is a regular file (anywhere, in-process), or a
read-only tmpfs mounted in a mount namespace of the stage's own (the mount ends with it;
needs unshare and mount rights, else the test using it is skipped)."""
from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

# $0 is the folder to mount over, the rest the command to run there.
_MOUNT_AND_RUN = 'mount -t tmpfs -o ro,size=1m segflow-ro "$0" && exec "$@"'


def blocked_folder(root: Path) -> Path:
    """A path whose parent is a regular file: no folder can be created there."""
    (root / "blocker").write_text("a file where the output's folder should be\n")
    return root / "blocker" / "out"


def read_only_command(folder: Path, argv: list[str]) -> list[str]:
    """argv run with `folder` (an existing empty folder) a read-only file system."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _MOUNT_AND_RUN,
            str(folder), *argv]


@functools.cache
def can_mount_read_only() -> bool:
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as folder:
        probe = read_only_command(Path(folder), ["sh", "-c", f"! touch '{folder}/x'"])
        return subprocess.run(probe, capture_output=True).returncode == 0
