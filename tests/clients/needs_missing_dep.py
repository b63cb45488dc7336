"""A stand-in delegate module whose import fails on a missing third-party package (CLI tests)."""

import surely_not_installed_pkg  # noqa: F401
