"""`atomic_write`: every file clusterjax writes goes through here.

A file is written to a temporary name in the destination's directory and renamed over
the destination only once it is complete, so an interrupted or failed write never
leaves a half-written file (and never destroys an existing one). The result has the
permissions that a plain `open(path, "wb")` would give it:

- a new file: `0o666` minus the process umask (and any default ACL of the directory).
  The temporary file is created with `os.open(tmp, O_CREAT | O_EXCL, 0o666)`, so the
  kernel applies the umask exactly as for `open`; the umask is never read, since
  reading it (`os.umask` set and restore) changes it for every thread of the process.
  (`tempfile.mkstemp` would always give `0o600`: the file would be private to its
  owner, unreadable by a server running as another user.)
- an existing regular file: it keeps its permission bits, as `open` leaves them. Its
  owner and group are not kept (the new file belongs to the writer; changing that needs
  privileges), and hard links to the old file keep the old contents.
- a symbolic link: it is followed, as `open` follows it, and its target is replaced;
  the link stays a link.

The mode is taken when the temporary file is created and set again just before the
rename, since a writer may swap the temporary file for one of its own
(`safetensors.numpy.save_file` writes through its own `0o600` temporary file).
Replacing a file needs write permission on its directory, not on the file, as with any
atomic save: a read-only file is replaced (and stays read-only) where `open` would fail.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator

_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path to write; on success it is renamed to `path`.

    The temporary file already exists (empty, with the final permissions) when the
    block starts: write it by name (`open(tmp, "wb")`, `safetensors.numpy.save_file`).
    If the block raises, the temporary file is removed and `path` is untouched. `OSError`s
    name `path`, not the temporary file. The module docstring lists the permissions.

    Args:
      path: the file to write (created or replaced).

    Yields:
      The temporary file's path, in the same directory as the destination.

    Example:
      >>> import os, tempfile
      >>> from clusterjax._src.atomic import atomic_write
      >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
      >>> with atomic_write(path) as tmp:
      ...     with open(tmp, "w") as f:
      ...         _ = f.write("complete")
      >>> open(path).read(), os.listdir(os.path.dirname(path))
      ('complete', ['notes.txt'])
    """
    path = os.fspath(path)
    target = os.path.realpath(path)  # a symlink is followed, as open() follows it
    try:
        st = os.stat(target)
        keep_mode = stat.S_IMODE(st.st_mode) & 0o777 if stat.S_ISREG(st.st_mode) else None
    except OSError:  # no such file (or an unusable path: os.open below names the error)
        keep_mode = None
    directory = os.path.dirname(target)
    while True:
        tmp = os.path.join(directory, f".clusterjax-{secrets.token_hex(8)}.tmp")
        try:
            os.close(os.open(tmp, _FLAGS, 0o666))
            break
        except FileExistsError:  # a 64-bit name taken: astronomically rare, try again
            continue
        except OSError as err:  # report the file the user named, not the temporary one
            raise OSError(err.errno, err.strerror, path) from None
    try:
        try:
            if keep_mode is not None:
                os.chmod(tmp, keep_mode)
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
            yield tmp
            # A writer may have replaced tmp by its own file (safetensors writes through
            # a temporary file of its own, with mode 0o600): restore the mode.
            if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
                os.chmod(tmp, mode)
            os.replace(tmp, target)
        except OSError as err:
            if err.filename in (tmp, target) or err.filename2 in (tmp, target):
                raise OSError(err.errno, err.strerror, path) from None
            raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
