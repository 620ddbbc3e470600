"""Multi-process (multi-host) start-up for the scripts.

JAX's SPMD runtime is the distributed engine: every process runs the same
program over a mesh that spans all processes' devices, and
`jax.distributed.initialize` connects them. The settings come from flags,
with environment fallbacks, as usual for cluster launchers:

| flag | environment fallback |
|---|---|
| `--coordinator_address` (host:port of process 0) | `JAX_COORDINATOR_ADDRESS` |
| `--num_processes` | `JAX_NUM_PROCESSES` |
| `--process_id` | `JAX_PROCESS_ID` |

On CPU the processes' collectives go through gloo
(`jax_cpu_collectives_implementation="gloo"`).
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging
import jax

COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for multi-process runs (env "
    "JAX_COORDINATOR_ADDRESS).")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (env JAX_NUM_PROCESSES).")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (env JAX_PROCESS_ID).")


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, *,
               cpu_collectives: str = "gloo") -> bool:
  """Connects this process to the others, if a multi-process run is asked.

  Arguments default to the flags above, then to the environment. Nothing
  happens for a single process.

  Returns:
    Whether `jax.distributed.initialize` was called.
  """
  env = os.environ.get
  if coordinator_address is None:
    coordinator_address = (COORDINATOR_ADDRESS.value if flags.FLAGS.is_parsed()
                           else None) or env("JAX_COORDINATOR_ADDRESS")
  if num_processes is None:
    num_processes = (NUM_PROCESSES.value if flags.FLAGS.is_parsed() else
                     None) or int(env("JAX_NUM_PROCESSES", "1"))
  if process_id is None:
    process_id = PROCESS_ID.value if flags.FLAGS.is_parsed() else None
    if process_id is None:
      process_id = int(env("JAX_PROCESS_ID", "0"))
  if num_processes <= 1:
    return False
  if not coordinator_address:
    raise ValueError(f"num_processes = {num_processes} needs a coordinator "
                     "address (--coordinator_address or "
                     "JAX_COORDINATOR_ADDRESS).")
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)
  logging.info("Process %d of %d: %d local / %d global devices.",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True
