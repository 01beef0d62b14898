"""Checks on requested paths, and a safe form of any client text for logs and error replies.

One job: refuse a hostile path cheaply, before anything touches the filesystem, and make sure
that what a client typed can never break a log line, a gRPC trailer or a status message.

- `check_path` refuses empty paths, paths with control characters (a NUL byte, a newline that
  would forge a log line), paths longer than a byte limit (default 4095: Linux's PATH_MAX of
  4096 counts the terminating NUL; so `realpath` never walks a 400 KB `a/a/a/...` path, whose cost
  grows with the square of its length) and components over NAME_MAX (255 bytes). It is
  O(len(path)).
- `check_file` then stats the file and names what is wrong with it: missing, a symlink loop,
  not a regular file, not readable.
- `display` turns any text into printable ASCII of bounded length: control and non-ASCII
  characters escaped, the middle of long text elided with the number of characters left out.
"""

from __future__ import annotations

import errno
import os
import re
import stat

from io_server.media import AccessDeniedError, InvalidRequestError, MediaNotFoundError

PATH_MAX = 4096
"""Linux's PATH_MAX: the longest path the kernel resolves, in bytes with its NUL."""
MAX_PATH_BYTES = PATH_MAX - 1
"""The longest path in bytes (without the NUL) a file can be opened by: the default limit."""
NAME_MAX = 255
"""Linux's NAME_MAX: the longest file name component in bytes."""
DISPLAY_CHARS = 240
"""Default length of `display`'s output before eliding."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""C0 and C1 control characters, DEL, and the Unicode line and paragraph separators."""


def _escape(text: str) -> str:
    return "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def display(text: str, limit: int = DISPLAY_CHARS) -> str:
    """`text` as printable ASCII of at most about `limit` characters (safe in a log line, a
    gRPC trailer or a status message). Escapes use Python's `\\x..`/`\\u....` notation; long
    text keeps its start and end with the number of characters left out between them."""
    if len(text) <= limit:
        safe = _escape(text)
        if len(safe) <= limit:
            return safe
    head, tail = (2 * limit) // 3, max(limit // 3 - 24, 8)
    left_out = max(len(text) - head - tail, 0)
    return (f"{_escape(text[:head])[:head]}...({left_out} chars)..."
            f"{_escape(text[-tail:])[-tail:]}")


def check_path(path: str, max_bytes: int = MAX_PATH_BYTES) -> None:
    """Refuses a path that no file can have or that would be costly to resolve.

    Raises:
        InvalidRequestError: naming the problem and the numbers involved (the path itself in
            `display` form): empty; a control character (which one, at which offset); more than
            `max_bytes` bytes of UTF-8; a component longer than NAME_MAX bytes.
    """
    if not path:
        raise InvalidRequestError(path, "the path is empty")
    bad = _CONTROL.search(path)
    if bad is not None:
        char = bad.group()
        raise InvalidRequestError(
            display(path), f"the path contains the control character U+{ord(char):04X} "
                           f"({char!r}) at offset {bad.start()}; file names here never do")
    encoded = os.fsencode(path)
    if len(encoded) > max_bytes:
        raise InvalidRequestError(
            display(path), f"the path is {len(encoded)} bytes long, over the limit of "
                           f"{max_bytes} bytes (--max-path-bytes; Linux's PATH_MAX is {PATH_MAX} "
                           "with the terminating NUL)")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise InvalidRequestError(
            display(path), f"a path component is {len(longest)} bytes long, over NAME_MAX "
                           f"({NAME_MAX} bytes)")


def check_file(path: str, max_bytes: int = MAX_PATH_BYTES) -> os.stat_result:
    """`check_path`, then the file's `stat`, following symlinks.

    Raises:
        InvalidRequestError: a bad path (see `check_path`), a symlink loop (ELOOP), a path the
            filesystem finds too long, not a regular file, or another stat failure.
        MediaNotFoundError: no such file (also when a component is not a directory).
        AccessDeniedError: the filesystem refuses access (EACCES, EPERM).
    """
    check_path(path, max_bytes)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MediaNotFoundError(path, "no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InvalidRequestError(path, "the path runs into a symlink loop (ELOOP: too many "
                                            "levels of symbolic links)") from None
        if e.errno == errno.ENOTDIR:
            raise MediaNotFoundError(path, "no such file (a component of the path is not a "
                                           "directory)") from None
        if e.errno == errno.ENAMETOOLONG:
            raise InvalidRequestError(path, "the path is too long for the filesystem "
                                            "(ENAMETOOLONG)") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise AccessDeniedError(path, f"the filesystem denies access ({e.strerror})") from None
        raise InvalidRequestError(path, f"cannot stat the file: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidRequestError(path, "not a regular file")
    return st
