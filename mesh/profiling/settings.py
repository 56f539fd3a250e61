"""What one `moemesh profile` run measures, and how (the CLI's flags, mesh/profile.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mesh.profile_store import DEFAULT_OUT

MEASURED = ("expert", "scatter_gather", "cold_start", "spawn_shares")  # the Profiles fields a run measures
ASSUMED = ("gpu_expert", "dense", "main_cold_start", "runtime_gb")  # left as Profiles.synthetic has them


@dataclasses.dataclass
class Settings:
    model: str | None = None  # None: the config's [model] path ("bundled" by default)
    dtype: str | None = None  # None: the config's [model] dtype (the served mesh's: what its functions load)
    memory: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)  # GB of the swept functions (from [functions] min_memory_gb)
    tokens: tuple[int, ...] = (1, 4, 16, 64)  # rows per call
    calls: int = 50  # calls per (memory, tokens) point
    rounds: int = 10  # the calls go in this many rounds over all sizes
    period_us: int | None = None  # None: the config's [functions] cfs_period_us
    period_us_compare: int = 100_000  # 0: no second daemon, no comparison
    period_memory: float = 0.25
    period_tokens: int = 1
    period_seconds: float = 2.0
    cold_experts: tuple[int, ...] = (1, 2, 4, 16)  # experts per cold-started function
    cold_repeats: int = 3
    cold_memory: float = 1.0
    cold_burst: int = 48  # one-expert functions of burst_memory requested at once (0: none)
    burst_memory: float = 0.25  # GB of each function of the burst
    saturation_gb: float | None = None  # None: threads_per_function * gb_per_vcpu
    family: str = "best"  # the expert fit to store: "best" or one of allocator.profiles.FAMILIES
    out: Path = DEFAULT_OUT
    host: str = ""  # "": this machine's name
    config: str | None = None  # launch.toml (None: built-in defaults)
    quiet: bool = False  # no progress bar
