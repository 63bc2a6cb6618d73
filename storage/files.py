"""The database's files on disk: created private to this user (the folder 0700, the files
0600), and the bytes they take."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def private_dir(folder: Path) -> None:
    """Create `folder` and the missing ones above it readable by this user only (0700); a
    folder that exists is left as it is (it may be the user's home)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)


def private_files(path: Path) -> None:
    """Create the database file 0600 before SQLite does (SQLite gives its -wal and -shm the
    mode of the main file), and take group and other access away from an existing one this
    user owns. Best effort: a file that cannot be changed (read-only) is left as it is."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return
    except FileExistsError:
        pass
    except OSError:
        return  # SQLite says what is wrong, in its words
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            info = file.stat()
            if info.st_uid == os.geteuid() and info.st_mode & 0o077:
                file.chmod(stat.S_IMODE(info.st_mode) & 0o700)
        except OSError:
            continue


def database_size(path: Path) -> int:
    """Bytes a database takes on disk: the file and its write-ahead log."""
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
