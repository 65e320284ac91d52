"""A folder one command owns (a run): made by it, marked as its own, written only inside.

    run = RunFolder(Path(args.out), "evaluate", own_names=("verdicts.jsonl", "images"))
    run.inspect()                      # before any slow work: ValueError if it is not ours
    resumed = run.claim()              # missing or empty: made and marked; marked: resumed
    path = run.path("images", "base", "00000_00.png")     # never through a link
    run.append_line("verdicts.jsonl", b'{"key": ...}\\n')  # whole line, fsynced, or nothing
    text = run.read_bytes("verdicts.jsonl", limit)          # regular files only, bounded
    data = read_regular_file(path, limit)                   # the same for any input file

A run folder names itself with a marker file (MARKER_NAME, {"format": "vare-run/1", "command":
...}) written before anything else. A folder that exists, is not empty and has no marker holds
someone else's files: it is refused with a message, never written into (a user's results.md
would otherwise be replaced without a word). A marked folder is resumed.

Only what is inside the folder is ever written: the folder itself is resolved once (a link given
as --out is the user's choice), and a symbolic link at any file or sub-folder the run writes or
reads (the marker, verdicts.jsonl, images/base, one PNG) is refused by name, since following it
would write elsewhere. Files the run reads are opened without following links and without
blocking (a FIFO in their place is refused, not waited on).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..paths import describe_mode, write_bytes_atomic

MARKER_NAME = "vare_run.json"
MARKER_FORMAT = "vare-run/1"
MARKER_LIMIT = 4096


class TooLarge(ValueError):
    """A file larger than the reader's limit; `size` is its size in bytes (at least limit + 1)."""

    def __init__(self, path, size: int, limit: int):
        self.size = size
        super().__init__(f"{path} is {size} bytes, more than the {limit} bytes read")


def read_regular_file(path: Path, limit: int, follow_links: bool = True) -> bytes:
    """A regular file's bytes, opened without blocking (a FIFO put in its place is refused, not
    waited on) and, with follow_links False, without following a link. ValueError when it is not
    a regular file, TooLarge when it holds more than `limit` bytes (checked before reading and
    while reading: a file that grows is not read past the limit); OSError when it cannot be read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow_links else getattr(os, "O_NOFOLLOW", 0))
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is {describe_mode(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise TooLarge(path, info.st_size, limit)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise TooLarge(path, size, limit)
        return b"".join(chunks)
    finally:
        os.close(fd)


class RunFolder:
    def __init__(self, root: Path, command: str, what: str = "--out", own_names: tuple[str, ...] = ()):
        self.given = Path(root)
        self.root = Path(root)
        self.command = command
        self.what = what
        # what the command writes at the top: an unmarked folder holding only these, the first
        # among them, is named as an older run in the message (it is refused all the same)
        self.own_names = own_names

    # -------------------------------------------------------------- is it ours?

    def _problem(self, text: str) -> ValueError:
        return ValueError(f"{self.what} {self.given}: {text}")

    def _link(self, path: Path) -> ValueError:
        return self._problem(f"{path} is a symbolic link (to {os.readlink(path)}); {self.command} writes "
                             "only inside its run folder, never through a link: remove the link, or pick "
                             "an empty or new folder")

    def _marker(self) -> dict:
        return {"format": MARKER_FORMAT, "command": self.command}

    def inspect(self) -> str:
        """'new' (missing or empty: a run may start there) or 'run' (marked by this command:
        resume); ValueError for anything else. Writes nothing."""
        root = self.given
        try:
            mode = os.stat(root).st_mode
        except (FileNotFoundError, NotADirectoryError):
            self._check_missing_parent(root)
            return "new"
        except (OSError, ValueError) as err:
            raise self._problem(f"cannot be checked ({getattr(err, 'strerror', None) or err})") from None
        if not stat.S_ISDIR(mode):
            raise self._problem(f"is {describe_mode(mode)}, not a folder; give a folder (a new one, or an empty one)")
        try:
            names = sorted(os.listdir(root))
        except OSError as err:
            raise self._problem(f"cannot be listed ({err.strerror or err})") from None
        if not names:
            return "new"
        if MARKER_NAME not in names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            if self.own_names and self.own_names[0] in names and set(names) <= set(self.own_names):
                raise self._problem(
                    f"looks like a `{self.command}` run of an older VARE, which did not mark its folders "
                    f"({MARKER_NAME}); it cannot be resumed: pick an empty or new folder (or delete this one)")
            raise self._problem(
                f"holds files {self.command} did not write ({shown}); it writes only into an empty or "
                f"new folder, or resumes its own run (marked by {MARKER_NAME}): pick an empty or new folder")
        self._check_marker(root / MARKER_NAME)
        self.root = root.resolve()
        return "run"

    def _check_missing_parent(self, root: Path) -> None:
        """A folder to be made: the nearest existing ancestor must be a folder."""
        for parent in root.parents:
            try:
                mode = os.stat(parent).st_mode
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as err:
                raise self._problem(f"{parent} cannot be checked ({err.strerror or err})") from None
            if not stat.S_ISDIR(mode):
                raise self._problem(f"{parent} is {describe_mode(mode)}, not a folder; choose a path in a folder")
            return

    def _check_marker(self, path: Path) -> None:
        if os.path.islink(path):
            raise self._link(path)
        try:
            data = read_regular_file(path, MARKER_LIMIT, follow_links=False)
            marker = json.loads(data.decode("utf-8"))
        except (OSError, ValueError, RecursionError) as err:
            raise self._problem(f"{MARKER_NAME} is not a run marker ({err}); pick an empty or new folder") from None
        if marker != self._marker():
            other = marker.get("command") if isinstance(marker, dict) else None
            if isinstance(other, str) and other != self.command:
                raise self._problem(f"{MARKER_NAME} marks a `{other[:40]}` run, not a `{self.command}` one; "
                                    "pick an empty or new folder")
            raise self._problem(f"{MARKER_NAME} is not a run marker of `{self.command}`; pick an empty or new folder")

    def claim(self) -> bool:
        """Make and mark a new run folder, or take up a marked one: -> True when resuming.
        ValueError (nothing written) for a folder that is not this command's run."""
        resumed = self.inspect() == "run"
        if not resumed:
            try:
                self.given.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise self._problem(f"cannot be made ({err.strerror or err})") from None
        self.root = self.given.resolve()
        if not resumed:
            if os.listdir(self.root):          # filled between the check and now
                raise self._problem("was filled by something else while starting; pick an empty or new folder")
            write_bytes_atomic(self.root / MARKER_NAME, (json.dumps(self._marker()) + "\n").encode())
        return resumed

    # -------------------------------------------------------------- inside only

    def path(self, *parts: str) -> Path:
        """root / parts, refusing a symbolic link (or a non-folder where a folder must be) at
        any of them: the run writes only inside its folder."""
        path = self.root
        for depth, part in enumerate(parts):
            path = path / part
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(mode):
                raise self._link(path)
            if depth < len(parts) - 1 and not stat.S_ISDIR(mode):
                raise self._problem(f"{path} is {describe_mode(mode)} where the run keeps a folder; remove it, "
                                    "or pick an empty or new folder")
        return path

    def folder(self, *parts: str) -> Path:
        """A sub-folder of the run (made if missing), never through a link."""
        path = self.path(*parts)
        try:
            path.mkdir(exist_ok=True)
        except FileExistsError:
            pass
        mode = os.lstat(path).st_mode
        if not stat.S_ISDIR(mode):
            raise self._problem(f"{path} is {describe_mode(mode)} where the run keeps a folder; remove it, "
                                "or pick an empty or new folder")
        return path

    def check_tree(self, files: tuple[str, ...], folders: tuple[str, ...]) -> None:
        """Refuse, before any write, a link or a wrong kind at the run's own files and folders
        and at anything inside those folders."""
        for name in files:
            path = self.path(*name.split("/"))
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(mode):
                raise self._problem(f"{path} is {describe_mode(mode)} where the run keeps a file; remove it, "
                                    "or pick an empty or new folder")
        for name in folders:
            path = self.path(*name.split("/"))
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(mode):
                raise self._problem(f"{path} is {describe_mode(mode)} where the run keeps a folder; remove it, "
                                    "or pick an empty or new folder")
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        self.path(*name.split("/"), entry.name)        # raises, naming it

    # -------------------------------------------------------------- reading and appending

    def read_bytes(self, name: str, limit: int) -> bytes:
        """A run file's bytes (read_regular_file, links not followed); the message names the file
        and the fix."""
        path = self.path(*name.split("/"))
        try:
            return read_regular_file(path, limit, follow_links=False)
        except TooLarge as err:
            raise self._problem(f"{name} is {err.size} bytes, more than this run can hold ({limit}); "
                                "delete it to start over") from None
        except (OSError, ValueError) as err:
            text = getattr(err, "strerror", None) or str(err)
            raise self._problem(f"{name} cannot be read ({text}); delete it to start over") from None

    def append_line(self, name: str, data: bytes) -> None:
        """Append `data` (one line) to a run file that exists, fsynced before returning; on a
        failure (a full disk) the file is cut back to where it was, so no partial line stays."""
        path = self.path(*name.split("/"))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as err:
                try:
                    os.ftruncate(fd, start)
                    os.fsync(fd)
                except OSError:
                    pass
                raise OSError(err.errno, f"could not append to {path}: {err.strerror or err}; "
                              "the file is as it was before") from err
        finally:
            os.close(fd)
