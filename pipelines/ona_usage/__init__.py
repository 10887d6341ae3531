"""Sync Ona (formerly Gitpod) environment usage records into any dlt destination."""

__version__ = "0.1.0"

from ona_usage.source import ona_usage  # noqa: E402

__all__ = ["ona_usage", "__version__"]
