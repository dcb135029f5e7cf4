"""Files read as inputs: regular files only, and links that stay inside an image folder.

Every file an input spec reads is checked with ``os.stat`` before it is opened (a FIFO blocks its
reader, a device may never end). A path named on the command line is followed wherever it leads;
a folder scan (:func:`scan_folder`) refuses links to directories and reads a link to a file only
when its target lies inside the folder (docs/VIEWS.md, "Image folders").
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from softlabels.errors import DataError

__all__ = ["require_regular", "scan_folder", "special_kind"]

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def special_kind(mode: int) -> str | None:
    """What a non-regular file is ("a FIFO", ...), or None for a regular file (``mode`` from ``os.stat``)."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def _not_regular(path: str, kind: str) -> DataError:
    return DataError(f"'{path}' is {kind}, not a regular file; inputs are read only from regular files (a FIFO "
                     "or a device may block or never end): replace it with a regular file, or remove it")


def require_regular(path: str | os.PathLike[str]) -> None:
    """Raise :class:`DataError` unless ``path`` (links followed) is a regular file; call it before opening.

    A missing path raises ``FileNotFoundError``: callers check existence first, with their own message.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise _not_regular(str(path), "a broken link") from None
        raise
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _not_regular(str(path), "a loop of links") from None
        raise
    kind = special_kind(mode)
    if kind is not None:
        raise _not_regular(str(path), kind)


def _directory_link(root: Path, path: str) -> DataError:
    return DataError(f"imagefolder '{root}' holds a link to a directory, '{path}'; directory links are not followed "
                     "(they can loop, or lead out of the folder): replace the link with the directory it names, "
                     "or remove it")


def _check_link(entry: os.DirEntry, root: Path, real_root: str, keep: Callable[[str], bool]) -> None:
    """Check a link met in a folder scan: to a directory, out of the folder, or to no regular file."""
    try:
        to_directory = entry.is_dir()  # follows the link
    except OSError:  # a loop of links: require_regular names it
        to_directory = False
    if to_directory:
        raise _directory_link(root, entry.path)
    if not keep(entry.name):
        return  # a link to a file that is not read
    target = os.path.realpath(entry.path)
    if os.path.commonpath([target, real_root]) != real_root:
        raise DataError(f"'{entry.path}' in imagefolder '{root}' links to '{target}', outside the folder; links are "
                        "followed only within the folder: copy the file in, or remove the link")
    require_regular(entry.path)


def scan_folder(root: Path, top: Path, keep: Callable[[str], bool]) -> list[str]:
    """Paths of the files under ``top`` (a folder inside ``root``) whose names ``keep`` accepts, in
    ``sorted(os.walk(top))`` order (torchvision ImageFolder's); links as the module says, and every
    kept file regular (files not kept are never opened)."""
    real_root = os.path.realpath(root)
    if os.path.islink(top):
        raise _directory_link(root, str(top))
    found: dict[str, list[str]] = {}
    pending = [str(top)]
    while pending:
        folder = pending.pop()
        names: list[str] = []
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)  # the same file is named first on every run
        for entry in entries:
            if entry.is_symlink():  # refused when to a directory, or (kept) out of the folder
                _check_link(entry, root, real_root, keep)
                if keep(entry.name):
                    names.append(entry.name)
            elif entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            elif keep(entry.name):
                kind = special_kind(entry.stat(follow_symlinks=False).st_mode)
                if kind is not None:
                    raise _not_regular(entry.path, kind)
                names.append(entry.name)
        found[folder] = names
    return [os.path.join(folder, name) for folder in sorted(found) for name in found[folder]]
