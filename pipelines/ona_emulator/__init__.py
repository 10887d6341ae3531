"""A local emulator of Ona's ListEnvironmentUsageRecords API, for tests, demos and benchmarks."""

from .data import UsageStore
from .faults import FaultConfig
from .generator import generate_organisation, generate_records, organisation_names
from .rfc3339 import format_rfc3339, parse_rfc3339_ns
from .server import EmulatorServer

__all__ = ["EmulatorServer", "FaultConfig", "UsageStore", "format_rfc3339", "generate_organisation", "generate_records", "organisation_names", "parse_rfc3339_ns"]
