"""Where measured profiles live: `profiles/<host>/<model>.json` (written by `moemesh profile`,
read by planning). Its own module so that planning and the profiler need not import each other."""

from __future__ import annotations

import socket
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "profiles"  # the checkout's profiles/


def default_host() -> str:
    """This machine's name for profiles/<host>/ ("local" when it has none)."""
    return socket.gethostname() or "local"


def profile_path(out: str | Path, host: str, model: str) -> Path:
    return Path(out) / host / f"{model}.json"


def stored_path(config) -> Path:
    """Where this host's profile of the configured model is (or would be) stored."""
    return profile_path(DEFAULT_OUT, default_host(), config.model.resolved_path().resolve().name)


def ensure_profiles(config) -> Path | None:
    """Measure this host's profile of the configured model if none is stored and
    `[policy] profiles = "auto"` (DESIGN.md: profiles are measured, never silently synthetic).

    Runs `moemesh profile` once (real function instances, a progress bar on stderr, about 20 s
    for the bundled model on 2 cores; the CFS-period comparison is skipped), cached under
    `profiles/<host>/<model>.json`; returns that path, or None where profiles are not "auto".
    """
    import logging
    import sys

    if config.policy.profiles != "auto":
        return None
    path = stored_path(config)
    if path.is_file():
        return path
    from mesh.profile import Settings, render, run_profile

    print(f"profiles: none measured for this host and model yet: measuring now, cached in {path} "
          "(set [policy] profiles = \"synthetic\" to skip)", file=sys.stderr, flush=True)
    result = run_profile(Settings(model=str(config.model.resolved_path()), period_us_compare=0,
                                  out=DEFAULT_OUT, host=default_host()))
    logging.getLogger("moemesh.profile").info("%s", render(result))
    return path
