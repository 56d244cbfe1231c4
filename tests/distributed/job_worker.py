"""One process of the main job, as ``python -m qsharp_jax.train`` runs it (started by
test_multiprocess_job.py, never collected by pytest).

argv: the train flags (``--config=... --config.key=value ...``). The test sets JAX_PLATFORMS,
the fake device count (XLA_FLAGS) and, for a kill test, QSHARP_TEST_PAUSE_AT=ITERATION:SHARD
and QSHARP_TEST_MARKERS=DIR: the process then writes DIR/paused_<process index> when it
reaches that shard's collection and waits there for the test's SIGTERM.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time

from absl import app

from qsharp_jax import train
from qsharp_jax.qsharp import collect

PAUSE_AT = os.environ.get("QSHARP_TEST_PAUSE_AT", "")
faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)  # `kill -USR1 PID`: where it hangs

if PAUSE_AT:
    import jax

    _collect = collect.collect_iteration
    _iteration, _shard = (int(x) for x in PAUSE_AT.split(":"))

    def paused_collect(*args, **kwargs):
        if (kwargs["iteration"], kwargs["shard"]) == (_iteration, _shard):
            marker = os.path.join(os.environ["QSHARP_TEST_MARKERS"], f"paused_{jax.process_index()}")
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            while True:  # mid-collection: the earlier shards are saved, this one is not
                time.sleep(1)
        return _collect(*args, **kwargs)

    collect.collect_iteration = paused_collect

if __name__ == "__main__":
    app.run(train.main, flags_parser=train.parse_flags)
