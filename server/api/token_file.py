"""A generated admin token kept in the store directory, so it survives restarts.

`scripts/serve.sh` runs `python -m adapterserve.server.api.token_file STORE_DIR` when no
ADAPTERSERVE_ADMIN_TOKEN is set: the first run writes a fresh token to STORE_DIR/.admin-token (mode
0600, created exclusively, never through a symlink); later runs read the same file. A file that
others may read or write, a symlink or anything else but a plain token is refused: the caller must
fix or remove it, the token is never silently replaced. The store ignores dot-files, so the file
never looks like an adapter.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from pathlib import Path

TOKEN_FILE = ".admin-token"
TOKEN_BYTES = 24
MAX_TOKEN_CHARS = 512


class TokenFileError(Exception):
    """The token file exists but cannot be trusted or read; the message says what to do."""


def _read(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TokenFileError(f"{path} is not a regular file; remove it")
        if info.st_mode & 0o077:
            raise TokenFileError(
                f"{path} may be read or written by other users (mode {stat.S_IMODE(info.st_mode):o}); "
                f"run: chmod 600 {path}"
            )
        data = os.read(fd, MAX_TOKEN_CHARS + 1)
    finally:
        os.close(fd)
    token = data.decode("ascii", "replace").strip()
    if not token or len(data) > MAX_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise TokenFileError(f"{path} does not hold a token; remove it to have a new one made")
    return token


def load_or_create_token(store: Path) -> tuple[str, bool]:
    """(token, created): the token kept in `store`/.admin-token, made (mode 0600) if there is none."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    path = store / TOKEN_FILE
    try:
        return _read(path), False
    except FileNotFoundError:
        pass
    except OSError as err:  # ELOOP: a symlink planted in place of the file
        raise TokenFileError(f"{path} cannot be read safely ({err.strerror}); remove it") from None
    token = secrets.token_urlsafe(TOKEN_BYTES)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return _read(path), False
    try:
        os.write(fd, (token + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return token, True


def main(argv: list[str] | None = None) -> int:
    """Print the store's admin token (making it on first use); exit 1 with the reason if unsafe."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m adapterserve.server.api.token_file STORE_DIR", file=sys.stderr)
        return 2
    try:
        token, created = load_or_create_token(Path(args[0]))
    except TokenFileError as err:
        print(f"admin token: {err}", file=sys.stderr)
        return 1
    path = Path(args[0]) / TOKEN_FILE
    print(f"{'made a new' if created else 'reusing the'} admin token kept in {path}", file=sys.stderr)
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
