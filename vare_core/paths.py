"""Output paths that cannot escape their folder, clobber what is not ours, or fail late.

    name = fill_template("erase_{concepts}", {"concepts": "../../x"})   # 'erase_x'
    path = resolve_inside(root, name + ".safetensors", "filename")        # inside root or ValueError
    check_output_file(Path(args.out), "--out")                             # before any work starts

Every value that reaches a file name from outside (adapter metadata, node inputs, concept
words) is untrusted: a shared workflow or adapter must never write outside the folder the user
chose. Values are sanitised AFTER substitution, and the final path is resolved (symlinks
included) and checked against the resolved folder.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path

# Linux NAME_MAX is 255 bytes; generated names stay well below it so a counter or a suffix
# (".loss.json", "_003") still fits.
NAME_LIMIT = 120
PART_LIMIT = 60          # one filled-in template value
MAX_SUBFOLDERS = 8       # "sub/folder/name": deeper names are refused
PATH_LIMIT = 4096        # PATH_MAX
_UNSAFE = re.compile(r"[^\w.\-]+")


def shorten(name: str, limit: int = NAME_LIMIT) -> str:
    """`name` if it fits in `limit` bytes (UTF-8), else its start plus a short hash of the whole,
    so two long names stay different."""
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    head = name.encode()[: limit - 9].decode(errors="ignore")
    return f"{head}-{digest}"


def safe_part(value, fallback: str = "x", limit: int = PART_LIMIT) -> str:
    """A value made safe as PART of one file name: anything but letters, digits, '-', '_' and
    '.' becomes '-' (so '/', '\\' and '..' cannot survive as path syntax), leading dots and
    dashes are dropped, long values shortened."""
    text = _UNSAFE.sub("-", str(value)).replace("..", "-")
    text = re.sub(r"-{2,}", "-", text).lstrip(".-").rstrip("-")
    return shorten(text, limit) if text else fallback


def fill_template(template: str, values: dict[str, object]) -> str:
    """Replace {key} by safe_part(value) for every key (a list value is joined with '-')."""
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            value = "-".join(safe_part(v, "") for v in value).strip("-")
        template = template.replace("{" + key + "}", safe_part(value, "none"))
    return template


def check_relative_name(name: str, what: str) -> str | None:
    """Why `name` ("sub/folder/name") is not a plain relative file name, or None."""
    if not isinstance(name, str) or not name.strip():
        return f"{what} is empty: give a file name, e.g. erase_circle"
    if "\x00" in name or "\\" in name or os.path.isabs(name) or name.startswith("~"):
        return f"{what} {name!r}: give a name (sub/folder/name allowed), not a path"
    parts = [p for p in name.strip().split("/") if p not in ("", ".")]
    if not parts:
        return f"{what} {name!r}: give a file name, e.g. erase_circle (not just a folder)"
    if any(p == ".." for p in parts):
        return f"{what} {name!r}: not a path inside the folder ('..' would leave it); give a plain name"
    if any(p.startswith(".") for p in parts):
        return f"{what} {name!r}: names starting with '.' are hidden files; drop the leading dot"
    if len(parts) > MAX_SUBFOLDERS + 1:
        return f"{what} {name!r}: at most {MAX_SUBFOLDERS} sub-folders"
    long = [p for p in parts if len(p.encode()) > NAME_LIMIT]
    if long:
        return f"{what} {name!r}: the part {long[0][:40]!r}... is longer than {NAME_LIMIT} bytes; shorten it"
    return None


def resolve_inside(root: Path, name: str, what: str) -> Path:
    """root / name, refusing (ValueError naming `what`) anything that would end outside root,
    symlinked sub-folders included."""
    problem = check_relative_name(name, what)
    if problem:
        raise ValueError(problem)
    parts = [p for p in name.strip().split("/") if p not in ("", ".")]
    base = Path(root).resolve()
    path = base.joinpath(*parts)
    # resolve() follows symlinks of the parts that exist; the file itself may be a symlink
    # that os.replace will replace, so only its folder is resolved
    folder = path.parent.resolve()
    if folder != base and base not in folder.parents:
        raise ValueError(f"{what} {name!r} leads to {folder}, outside {base} (a symlinked folder?); "
                         "give a name inside the folder")
    return folder / path.name


def check_output_file(path: Path, what: str) -> Path:
    """Refuse, before any work, an output path a write would fail on or damage: its folder
    missing or a file, the path a folder / device / FIFO / socket, a name too long."""
    path = Path(path)
    text = str(path)
    if not text or text in (".", "..") or path.name in ("", ".", ".."):
        raise ValueError(f"{what} {text!r}: give a file name, e.g. erase_circle.safetensors")
    if len(os.fsencode(text)) >= PATH_LIMIT or len(path.parts) > 256:
        raise ValueError(f"{what}: the path is too long ({len(text)} characters); use a shorter one")
    if len(os.fsencode(path.name)) > 255:
        raise ValueError(f"{what}: the file name is longer than 255 bytes; shorten it")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{what} {text}: {parent} is a file, not a folder; choose a path in a folder")
    if not parent.is_dir():
        raise ValueError(f"{what} {text}: the folder {parent} does not exist; create it first")
    try:
        mode = path.stat().st_mode          # follows a symlink to what it names
    except FileNotFoundError:
        return path
    except OSError as err:
        raise ValueError(f"{what} {text}: cannot be checked ({err.strerror or err})") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{what} {text} is a folder; give a file name inside it, e.g. "
                         f"{path / 'erase.safetensors'}")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {text} is not a regular file (a device, FIFO or socket); "
                         "it is never replaced: choose a file path")
    return path


def is_regular_file(path: Path) -> bool:
    """True for a regular file (through symlinks); False for FIFOs, devices, folders, missing
    paths: only regular files are ever opened for reading weights (a FIFO would block)."""
    return file_kind(path) == "file"


def file_kind(path: Path) -> str:
    """'file', 'missing', 'folder', 'fifo', 'device', 'socket', 'symlink loop' or 'unreadable'."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return "symlink loop" if err.errno == errno.ELOOP else "unreadable"
    except ValueError:                                     # a NUL byte in the name
        return "missing"
    return mode_kind(mode)


def mode_kind(mode: int) -> str:
    """What an st_mode is: 'file', 'folder', 'fifo', 'socket', 'symlink' (lstat) or 'device'."""
    for test, kind in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return kind
    return "device"


_KIND_TEXT = {"file": "a file", "folder": "a folder", "fifo": "a FIFO (named pipe: reading it would block)",
              "device": "a device node", "socket": "a socket", "symlink": "a symbolic link",
              "symlink loop": "a symlink loop", "unreadable": "not readable"}


def describe_mode(mode: int) -> str:
    """An st_mode in words, for messages: 'a folder', 'a symbolic link', ..."""
    return _KIND_TEXT[mode_kind(mode)]


def describe_kind(kind: str) -> str:
    """A file_kind in words, for messages ('missing' through a link: a broken link)."""
    return _KIND_TEXT.get(kind, "a broken link" if kind == "missing" else kind)


def require_regular_file(path: Path, what: str) -> Path:
    """`path` if it is a regular file (through symlinks); otherwise FileNotFoundError (missing)
    or ValueError saying what it is instead. Only regular files are ever opened for reading:
    a FIFO would block the pack (and ComfyUI's node list) forever."""
    kind = file_kind(path)
    if kind == "file":
        return Path(path)
    if kind == "missing":
        raise FileNotFoundError(f"{what} {path}: no such file")
    raise ValueError(f"{what} {path} is {_KIND_TEXT[kind]}, not a regular file; give the file itself")


def write_atomic(path: Path, write) -> None:
    """Readers see the old file at `path` or the complete new one, never half: `write(temp)`
    fills a temp file in the same folder, which is given the umask's usual mode, fsynced and
    renamed over `path`. On failure the temp file is removed, the previous file is untouched,
    and an OSError names the path."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OSError(f"cannot write {path}: the folder {path.parent} does not exist")
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(temp_name)
        # after the write: a writer may put its own 0600 file in place (safetensors does)
        os.chmod(temp_name, 0o666 & ~umask)
        with open(temp_name, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException as err:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError):
            message = f"could not write {path}: {err.strerror or err}; any previous file there is unchanged"
            raise (OSError(err.errno, message) if err.errno else OSError(message)) from err
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`data` at `path`, atomically (write_atomic)."""
    write_atomic(path, lambda temp: Path(temp).write_bytes(data))


def free_numbered_names(folder: Path, stem: str, count: int, suffix: str = ".png") -> list[Path]:
    """`count` names {stem}_{i:03d}{suffix} in folder, numbered after any that exist already,
    so a second run into the same folder adds files instead of replacing them."""
    taken = re.compile(re.escape(stem) + r"_(\d+)" + re.escape(suffix) + "$")
    used = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else ()) if (m := taken.match(p.name))]
    first = max(used) + 1 if used else 0
    return [folder / f"{stem}_{i:03d}{suffix}" for i in range(first, first + count)]
