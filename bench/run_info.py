"""What every benchmark's JSON records about its run: when, the exact command, jax, the machine
and its load at the start (the machines here are shared: read results with the load)."""

from __future__ import annotations

import datetime
import os
import platform
import sys

import jax


def run_info(args=None, **extra) -> dict:
    """The run's header; ``args`` (an argparse namespace) and ``extra`` are added as given."""
    info = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_start": os.getloadavg(),
        **extra,
    }
    if args is not None:
        info["args"] = vars(args)
    return info
