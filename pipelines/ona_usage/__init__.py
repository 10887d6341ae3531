"""Sync Ona (formerly Gitpod) environment usage records into any dlt destination."""

__version__ = "0.2.0"

from ona_usage.models import ona_usage_models  # noqa: E402
from ona_usage.source import ona_usage  # noqa: E402

__all__ = ["ona_usage", "ona_usage_models", "__version__"]
