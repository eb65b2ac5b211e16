"""Local image files opened without a window between the check and the use.

A request may name a file under the server's ``--allowed_local_media_path``. Resolving the path, checking that it
lies inside the folder and then opening it by name leaves a window: whoever can write inside the folder can
swap a sub-folder for a symbolic link to the outside between the check and the open. So the file is opened
one name at a time, each relative to the descriptor of the folder opened before it, never following a symbolic
link by the system (``O_NOFOLLOW``):

- a **symbolic link** met on the way is read (``readlink``) and its target walked the same way: a relative
  target from the folder that holds the link, an absolute one only when it names a place under the allowed
  folder, from the allowed folder's own descriptor. ``..`` steps back to the folder opened before; stepping
  above the allowed folder is refused. A link that leads outside is refused, and so is a chain of more than
  40 links (a loop), as the system itself would;
- the **last name** must be a regular file (opened non-blocking, so that a pipe cannot hang the server);
- the readers then read **the opened descriptor only**, through a private path with the file's own name (which
  says its format) that opens the same file: ``/proc/self/fd/N`` on Linux, ``/dev/fd/N`` elsewhere.

A **folder** (a DICOM series sent as a video) is reached the same way and opened for listing only; each file
found in it (and in its sub-folders, never through a symbolic link to a folder) is then opened on its own by
the same walk from the allowed folder (:func:`read_folder_files`), so a link inside the series cannot lead out.

Every refusal is a :class:`LocalPathError` naming the path as the client sent it, what is wrong with it and
the fix.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import tempfile
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath

MAX_LINKS = 40  # symbolic links followed in one path, as Linux allows
NAME_MAX = 255  # bytes in one file name on most file systems

OUTSIDE = "local_media_not_allowed"
NOT_FOUND = "image_not_found"
BAD_PATH = "invalid_image_path"

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# a folder on the way is only searched, never listed or read: O_PATH where the system has it
_FOLDER_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC
_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _NOFOLLOW | _CLOEXEC
# a folder that is listed (a DICOM series): readable, never through a symbolic link
_LISTED_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC


class LocalPathError(Exception):
    """A local path the server will not or cannot read; ``code`` and ``status`` are the API error's."""

    def __init__(self, message: str, code: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.code, self.status = message, code, status


def _descriptor_folder() -> str | None:
    for folder in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(folder):
            return folder
    return None


def _outside(shown: str) -> LocalPathError:
    return LocalPathError(
        f"{shown!r} is outside the folder this server may read (--allowed_local_media_path); name a file inside "
        "it, or send the image as a data: URL",
        OUTSIDE,
    )


def _below(path: PurePath, roots: tuple[PurePath, ...]) -> list[str] | None:
    """The names of ``path`` below the first of ``roots`` it lies under (compared name by name, nothing
    resolved), ``path``'s own names when it is relative, or ``None`` when it is under none of them."""
    if not path.is_absolute():
        return list(path.parts)
    for root in roots:
        if path.parts[: len(root.parts)] == root.parts:
            return list(path.parts[len(root.parts) :])
    return None


def _open_error(err: OSError, name: str, shown: str) -> LocalPathError:
    """What an ``open`` of ``name`` (one name of ``shown``) failing with ``err`` means for the client."""
    if err.errno == errno.ENOENT:
        return LocalPathError(f"no such file under the allowed folder: {shown!r}", NOT_FOUND)
    if err.errno == errno.ENAMETOOLONG:
        size = len(os.fsencode(name))
        return LocalPathError(
            f"{shown!r}: the name {name[:40]!r}... is {size} bytes, over the file system's limit ({NAME_MAX} on "
            "most); rename the file",
            BAD_PATH,
        )
    if err.errno == errno.ENOTDIR:
        return LocalPathError(f"{shown!r}: {name!r} is not a folder, yet the path goes on after it", BAD_PATH)
    if err.errno in (errno.EACCES, errno.EPERM):
        return LocalPathError(f"{shown!r}: the server is not allowed to open {name!r} (permission denied)", OUTSIDE)
    return LocalPathError(f"{shown!r}: {name!r} cannot be opened ({err.strerror or err})", BAD_PATH)


def _link_target(name: str, folder: int) -> str | None:
    """The target of the symbolic link ``name`` in ``folder``, or ``None`` when it is not one."""
    try:
        return os.readlink(name, dir_fd=folder)
    except (OSError, ValueError):
        return None


def _check_regular(fd: int, shown: str) -> None:
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return
    what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, pipe or socket)"
    raise LocalPathError(f"{shown!r} is {what}; name an image file", BAD_PATH)


class _Walk:
    """One walk from the allowed folder's descriptor down to a file; ``folders`` holds the descriptors of the
    folders entered so far (the allowed folder first), all closed by :meth:`close`."""

    def __init__(self, root_fd: int, roots: tuple[PurePath, ...], shown: str) -> None:
        self.folders = [root_fd]
        self.roots, self.shown = roots, shown
        self.links = 0

    def close(self) -> None:
        for fd in self.folders:
            os.close(fd)
        self.folders = []

    def _up(self) -> None:
        if len(self.folders) == 1:
            raise _outside(self.shown)
        os.close(self.folders.pop())

    def _follow(self, target: str) -> list[str]:
        """The names to walk in place of a symbolic link to ``target``."""
        self.links += 1
        if self.links > MAX_LINKS:
            raise LocalPathError(
                f"{self.shown!r}: more than {MAX_LINKS} symbolic links on the way (a loop of links?); name the file "
                "itself",
                BAD_PATH,
            )
        if "\0" in target:
            raise LocalPathError(f"{self.shown!r}: a symbolic link on the way is broken", BAD_PATH)
        names = _below(PurePath(target), self.roots)
        if names is None:
            raise _outside(self.shown)
        if PurePath(target).is_absolute():  # from the allowed folder again
            while len(self.folders) > 1:
                os.close(self.folders.pop())
        return names

    def run(self, names: list[str], folder_ok: bool = False) -> tuple[int, str]:
        """The descriptor of the regular file ``names`` leads to, and that file's own name; with ``folder_ok``,
        a folder there is opened for listing instead of refused."""
        pending = deque(names)
        while pending:
            name = pending.popleft()
            if name in ("", ".", "/"):
                continue
            if name == "..":
                self._up()
                continue
            last = not pending
            try:
                fd = os.open(name, _FILE_FLAGS if last else _FOLDER_FLAGS, dir_fd=self.folders[-1])
            except OSError as err:
                target = _link_target(name, self.folders[-1])
                if target is None:
                    raise _open_error(err, name, self.shown) from None
                pending.extendleft(reversed(self._follow(target)))
                continue
            if last:
                try:
                    if not (folder_ok and stat.S_ISDIR(os.fstat(fd).st_mode)):
                        _check_regular(fd, self.shown)
                except BaseException:
                    os.close(fd)
                    raise
                return fd, name
            self.folders.append(fd)
        if folder_ok:  # the path ends at a folder already entered (the allowed folder itself, or "..")
            return os.open(".", _LISTED_FOLDER_FLAGS, dir_fd=self.folders[-1]), "."
        raise LocalPathError(f"{self.shown!r} names a folder, not a file; name an image file", BAD_PATH)


def open_inside(folder: Path, path: Path, shown: str, folder_ok: bool = False) -> tuple[int, str]:
    """A read-only descriptor of the regular file that ``path`` (absolute, or relative to ``folder``) names
    inside ``folder``, and that file's own name; raises :class:`LocalPathError` for anything else (see the
    module docstring). ``shown`` is the path as the client sent it, for the messages. With ``folder_ok`` a
    folder is opened too (for listing: check with :func:`is_folder`)."""
    text = os.fspath(path)
    if "\0" in text:
        raise LocalPathError(f"{shown!r}: the path holds a NUL byte, which no file name can", BAD_PATH)
    if os.open not in os.supports_dir_fd or os.readlink not in os.supports_dir_fd:
        raise LocalPathError(
            "this system cannot open files relative to a folder, so local files are not served; send the image "
            "as a data: URL",
            OUTSIDE,
        )
    roots = (PurePath(folder.absolute()), PurePath(os.path.realpath(folder)))
    names = _below(PurePath(text), roots)
    if names is None:
        raise _outside(shown)
    try:
        root_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except OSError as err:
        raise LocalPathError(
            f"the server's folder for local files cannot be opened ({err.strerror}); send the image as a data: URL",
            "local_media_unavailable",
            503,
        ) from None
    walk = _Walk(root_fd, roots, shown)
    try:
        return walk.run(names, folder_ok)
    finally:
        walk.close()


def is_folder(fd: int) -> bool:
    """Whether the descriptor :func:`open_inside` gave is a folder."""
    return stat.S_ISDIR(os.fstat(fd).st_mode)


@dataclass(frozen=True)
class FolderListing:
    """The files under a folder: their names relative to it (``/``-separated, sorted) and their sizes."""

    names: list[str]
    sizes: list[int]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)


def list_folder(fd: int, shown: str, max_files: int) -> FolderListing:
    """The files under the folder ``fd`` (from :func:`open_inside` with ``folder_ok``), sub-folders included
    but never entered through a symbolic link; a symbolic link to a file is listed (:func:`read_folder_files`
    opens it safely). More than ``max_files`` is a 413 naming the limit."""
    found: list[tuple[str, int]] = []
    pending: list[tuple[int, str]] = [(os.dup(fd), "")]
    try:
        while pending:
            folder, prefix = pending.pop()
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            sub = os.open(entry.name, _LISTED_FOLDER_FLAGS, dir_fd=folder)
                            pending.append((sub, f"{prefix}{entry.name}/"))
                            continue
                        found.append((prefix + entry.name, entry.stat(follow_symlinks=False).st_size))
                        if len(found) > max_files:
                            raise LocalPathError(
                                f"{shown!r} holds more than {max_files} files, more than a series within this "
                                "server's frame limit can need; send the series' own folder, or fewer slices",
                                "video_too_large",
                                413,
                            )
            finally:
                os.close(folder)
    except OSError as err:
        raise LocalPathError(f"{shown!r}: the folder cannot be listed ({err.strerror or err})", BAD_PATH) from None
    finally:
        for folder, _prefix in pending:
            os.close(folder)
    found.sort()
    return FolderListing([name for name, _size in found], [size for _name, size in found])


def read_folder_files(
    folder: Path, path: Path, names: list[str], shown: str, max_bytes: int
) -> Iterator[tuple[str, bytes]]:
    """Each of ``names`` (relative to ``path``, the folder as the client named it) opened on its own by the walk
    of :func:`open_inside` and read whole, in order; more than ``max_bytes`` in all is a 413."""
    total = 0
    for name in names:
        fd, _own = open_inside(folder, Path(path) / name, f"{shown.rstrip('/')}/{name}")
        try:
            size = os.fstat(fd).st_size
            total += size
            if total > max_bytes:
                raise LocalPathError(
                    f"the files of {shown!r} hold more than {max_bytes} bytes, more than a series within this "
                    "server's voxel limit can need; send a smaller series",
                    "video_too_large",
                    413,
                )
            with os.fdopen(os.dup(fd), "rb") as handle:
                data = handle.read(max_bytes - total + size + 1)
        finally:
            os.close(fd)
        if len(data) > size:  # grew while it was read
            total += len(data) - size
            if total > max_bytes:
                raise LocalPathError(
                    f"the files of {shown!r} hold more than {max_bytes} bytes; send a smaller series",
                    "video_too_large",
                    413,
                )
        yield name, data


def read_local_file(fd: int, shown: str, max_bytes: int) -> bytes:
    """The whole regular file ``fd`` (from :func:`open_inside`), refused with a 413 when it holds more than
    ``max_bytes``."""
    size = os.fstat(fd).st_size
    if size > max_bytes:
        raise LocalPathError(
            f"{shown!r} is {size} bytes, more than a volume or clip within this server's voxel limit can need "
            f"({max_bytes} bytes); send a smaller file",
            "video_too_large",
            413,
        )
    with os.fdopen(os.dup(fd), "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise LocalPathError(
            f"{shown!r} holds more than {max_bytes} bytes; send a smaller file", "video_too_large", 413
        )
    return data


@contextmanager
def opened_local_file(folder: Path, path: Path, shown: str) -> Iterator[Path]:
    """Open ``path`` inside ``folder`` as :func:`open_inside` does and yield a private path, with the file's own
    name, that opens the same file; reading that path reads the opened file whatever happens to the names in
    the folder meanwhile. The descriptor and the private path are gone afterwards."""
    descriptors = _descriptor_folder()
    if descriptors is None:
        raise LocalPathError(
            "this system has no /proc/self/fd or /dev/fd, so local files are not served; send the image as a data: URL",
            OUTSIDE,
        )
    fd, name = open_inside(folder, path, shown)
    try:
        with tempfile.TemporaryDirectory(prefix="citrus-v-local-") as private:
            alias = Path(private) / name
            os.symlink(f"{descriptors}/{fd}", alias)
            yield alias
    finally:
        os.close(fd)


def map_file(path: Path) -> bytes | memoryview:
    """The bytes of the file at ``path``, mapped into memory rather than read: a reader that checks a header
    first reads little more of a file it refuses. A ``memoryview`` (bytes-like, with no file position of its
    own to move); the map closes when the last reference to it goes."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return b""
        return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
