"""Two processes x 4 CPU devices on loopback: ring and an all-gather
mechanism over a mesh spanning both processes, against the reference."""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_the_single_process_reference():
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=ROOT)
  # The worker sets its own 4 devices; it keeps conftest's compile flags.
  env["XLA_FLAGS"] = " ".join(
      flag for flag in os.environ.get("XLA_FLAGS", "").split()
      if "xla_force_host_platform_device_count" not in flag)
  worker = os.path.join(ROOT, "tests", "multihost_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, str(i), str(port)],
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-3000:]
    assert "ok ring" in output and "ok blockwise" in output, output[-3000:]
