"""A local emulator of Ona's ListEnvironmentUsageRecords API, for tests, demos and benchmarks.

Names load on first use (PEP 562): `ona-usage` builds its `emulator` subcommand from
`ona_emulator.cli` on every run, which should not cost a scheduled sync the server's imports.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "EmulatorServer": ".server",
    "FaultConfig": ".faults",
    "Shape": ".generator",
    "UsageStore": ".data",
    "format_rfc3339": ".rfc3339",
    "generate_organisation": ".generator",
    "generate_records": ".generator",
    "organisation_names": ".generator",
    "organisation_records": ".generator",
    "parse_rfc3339_ns": ".rfc3339",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value
