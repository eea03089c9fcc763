"""Write a whole folder so that a failure never destroys what was there.

``save_pretrained`` over an existing model folder used to write file by file into it: a disk that
filled mid-write left the new ``config.json`` beside the old weights' deleted shards, a folder that
no longer loads. Here everything is written into a temporary folder beside the target (same file
system, so the final moves are renames) and swapped in only when complete; any failure of the write
removes the temporary folder, leaves the target exactly as it was and is raised as an ``OSError``
naming the target.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]
_TMP_TAG = ".jaxsft-writing-"
_OLD_TAG = ".jaxsft-replaced-"


def write_folder(target: PathLike, write: Callable[[Path], None], *, what: str, replaces: Callable[[str], bool]) -> Path:
    """Run ``write(tmp)`` on an empty folder beside ``target``, then make it ``target``; returns ``target``.

    ``replaces(name)`` says which entries of an existing ``target`` the new folder supersedes even when
    the new write does not produce them (stale weight shards); every other entry of the old folder (a
    README, checkpoints, another tool's files) is carried into the new one by rename. ``what`` names the
    operation in errors. A failure inside ``write`` leaves ``target`` untouched and raises ``OSError``.
    """
    target = Path(target).absolute()
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{what}: {target} exists and is not a folder; pass a folder path")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_TAG}", dir=parent))
    except OSError as err:
        raise _as_os_error(err, what, target) from err
    try:
        write(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise _as_os_error(err, what, target) from err
    _swap_in(tmp, target, replaces)
    return target


def _swap_in(new: Path, target: Path, replaces: Callable[[str], bool]) -> None:
    """``new`` becomes ``target`` by renames only; the old folder's other entries move into it."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}{_OLD_TAG}", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)  # from here to the next rename the model lives at ``old`` (one rename away)
    os.replace(new, target)
    for entry in os.listdir(old):
        if not (target / entry).exists() and not replaces(entry):
            os.replace(old / entry, target / entry)
    shutil.rmtree(old, ignore_errors=True)


def _as_os_error(err: BaseException, what: str, target: Path) -> OSError:
    """Any write failure (safetensors and tokenizers raise their own types) as an OSError naming ``target``."""
    text = str(err)
    code = getattr(err, "errno", None)
    if code is None:
        code = errno.ENOSPC if ("No space left" in text or "ENOSPC" in text) else errno.EIO
    return OSError(
        code,
        f"{what}: writing {target} failed ({type(err).__name__}: {text[:300]}); the folder was left exactly as it was "
        "(nothing of this save was kept). Free space or fix permissions and save again",
    )

