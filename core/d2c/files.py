"""The file mechanics every writer shares: one atomic writer (temp file, fsync, rename), a
write-once for several ranks, the stable JSON hash that names run folders, caches and cells, a
file's digest, and the liveness test for the temp files of writers that died."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path


def json_default(o):
    """JSON for what configs and records hold beyond plain types: dataclasses, tensors / numpy
    scalars, paths, tuples and sets; anything else by its str()."""
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return o.identity() if hasattr(o, "NOT_HASHED") else dataclasses.asdict(o)   # TrainConfig
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def stable_hash(obj, length: int = 16) -> str:
    """Hex digest of `obj` as sorted-key JSON: the same config names the same folder on any machine."""
    blob = json.dumps(obj, sort_keys=True, default=json_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_digest(path, length: int = 12) -> str:
    """SHA-256 of a file's bytes (read in 16 MiB blocks: a public checkpoint is up to 4 GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:length]


def fsync_path(path) -> None:
    """Flush a file's or a folder's entry to disk (a rename is durable once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write, tmp=None) -> None:
    """The one atomic writer: `write(f)` fills a binary file opened on a temp file beside `path`
    (default `.<name>.tmp<pid>`), then fsync, rename over `path`, fsync the folder: readers see
    the old content or the new, never half.  The temp file is opened O_EXCL | O_NOFOLLOW, so a
    planted link is never written through; a failed write removes it."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.unlink()   # our own pid's leftover (pid reuse); unlinking a link never touches its target
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)   # replaces a symlink at `path` itself, never its target
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    fsync_path(path.parent)


def atomic_write_text(path, text: str, tmp=None) -> None:
    atomic_write(path, lambda f: f.write(text.encode()), tmp)


def write_once(path, text: str) -> None:
    """Create `path` with `text` unless it exists: the first of several writers (ranks of a job)
    wins, atomically (link(2) fails on an existing name); the others read what it wrote."""
    import socket
    path = Path(path)
    tmp = path.parent / f".{path.name}-{socket.gethostname()}-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    fsync_path(path.parent)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still has `pid` (a writer whose temp files must stay)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True   # someone else's process (or not a pid): assume alive
    return True


class NpzRows:
    """One array of an .npz read a few rows at a time, never whole: `rows[i]`, `rows[a:b]`, len,
    shape, dtype.  A stored member (np.savez, ADM's sample and reference files) is read in place
    with os.pread, so nothing but the rows asked for enters the process (a memory map would keep
    every page it touched resident); a compressed member is first unpacked, streaming, to an
    unlinked temporary file.  Object arrays are refused (nothing is unpickled)."""

    def __init__(self, path, key: str):
        import struct
        import tempfile
        import zipfile

        import numpy as np
        self.path = Path(path)
        with zipfile.ZipFile(self.path) as zf:
            info = zf.getinfo(f"{key}.npy")          # KeyError when the member is missing
            with zf.open(info) as member:
                header = self._header(member)
                if info.compress_type == zipfile.ZIP_STORED:
                    with open(self.path, "rb") as raw:   # the member's data follow its local header
                        raw.seek(info.header_offset)
                        name_len, extra_len = struct.unpack("<HH", raw.read(30)[26:30])
                    self._offset = info.header_offset + 30 + name_len + extra_len + header
                    self._fd = os.open(self.path, os.O_RDONLY)
                else:
                    with tempfile.TemporaryFile() as tmp:
                        import shutil
                        shutil.copyfileobj(member, tmp, 1 << 24)
                        self._fd, self._offset = os.dup(tmp.fileno()), 0
        self._row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def _header(self, f) -> int:
        import numpy as np
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        self.shape, fortran, self.dtype = read(f)
        if self.dtype.hasobject or fortran or not self.shape:
            raise ValueError(f"{self.path}: a {'Fortran-order ' if fortran else ''}{self.dtype} array of shape "
                             f"{self.shape}; need a C-order numeric array with rows")
        return f.tell()

    def __len__(self):
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, i):
        import numpy as np
        if isinstance(i, (int, np.integer)):
            j = int(i) + (len(self) if i < 0 else 0)
            if not 0 <= j < len(self):
                raise IndexError(f"row {i} of {len(self)}")
            return self[j:j + 1][0]
        start, stop, step = i.indices(len(self))
        if step != 1:
            raise IndexError("NpzRows reads contiguous rows only")
        n = max(0, stop - start)
        buf = os.pread(self._fd, n * self._row, self._offset + start * self._row)
        if len(buf) != n * self._row:
            raise ValueError(f"{self.path}: truncated (rows {start}..{stop} past the end of the file)")
        return np.frombuffer(bytearray(buf), dtype=self.dtype).reshape(n, *self.shape[1:])

    def close(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close
