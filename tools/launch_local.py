"""Starts N processes of one command on this machine as one distributed JAX run (CPU devices by default).

  python tools/launch_local.py -n 2 --devices-per-process 4 -- \\
      -m distilbert_jax.train --config configs/tiny.py:TEACHER --workdir /tmp/tiny2

A way to try multi-process code paths (per-process data, collectives, checkpoints written by all processes,
process 0's metrics) without a pod. Each process gets JAX_PLATFORMS=cpu, JAX_NUM_CPU_DEVICES and the
DISTILBERT_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID variables that distributed.initialize reads (the
coordinator on a free localhost port). A command starting with -m or a .py file runs with this Python.
Output lines are prefixed with [pI]. If one process fails the others are stopped (they would wait for it
forever in a collective); exit status: the first failure's, 124 on --timeout, else 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

GRACE_S = 10.0  # between SIGTERM and SIGKILL when stopping the others


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(index: int, count: int, port: int, devices: int, platform: str, base=None) -> dict[str, str]:
  """The environment of process `index` of `count`."""
  env = dict(os.environ if base is None else base)
  env.update(DISTILBERT_JAX_COORDINATOR=f"localhost:{port}", DISTILBERT_JAX_NUM_PROCESSES=str(count),
             DISTILBERT_JAX_PROCESS_ID=str(index), JAX_PLATFORMS=platform)
  if platform == "cpu":
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
  return env


def _pump(stream, prefix: str, out):
  for line in stream:
    out.write(prefix + line)
    out.flush()


def _stop(procs: list[subprocess.Popen]):
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.time() + GRACE_S
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.time(), 0.1))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(command: list[str], *, processes: int = 2, devices_per_process: int = 4, platform: str = "cpu",
           port: int = 0, timeout: float = 0.0, out=None) -> int:
  """Runs `command` as `processes` cooperating processes; returns the exit status (see the module doc)."""
  out = sys.stdout if out is None else out
  if command and (command[0] == "-m" or command[0].endswith(".py")):
    command = [sys.executable, *command]
  port = port or free_port()
  procs, pumps = [], []
  try:
    for i in range(processes):
      p = subprocess.Popen(command, env=process_env(i, processes, port, devices_per_process, platform),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
      procs.append(p)
      t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out), daemon=True)
      t.start()
      pumps.append(t)
    deadline = time.time() + timeout if timeout > 0 else None
    status = 0
    while not all([p.poll() is not None for p in procs]):  # a list: poll every process, every time
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed:
        status = failed[0]
        out.write(f"launch_local: a process exited with {status}; stopping the others\n")
        break
      if deadline is not None and time.time() > deadline:
        status = 124
        out.write(f"launch_local: timeout after {timeout:.0f} s; stopping every process\n")
        break
      time.sleep(0.1)
    else:
      status = next((p.returncode for p in procs if p.returncode), 0)
    return status
  finally:
    _stop(procs)  # also on KeyboardInterrupt or an exception here: never leave a process behind
    for t in pumps:
      t.join(timeout=5)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("-n", "--processes", type=int, default=2)
  parser.add_argument("--devices-per-process", type=int, default=4, help="CPU devices of each process")
  parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS of the processes")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  parser.add_argument("--timeout", type=float, default=0.0, help="seconds before every process is stopped")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command (or -m MODULE ...)")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command after --")
  if args.processes < 1:
    parser.error("--processes must be at least 1")
  # SIGTERM (e.g. a test's timeout) stops the children too, through launch's finally.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  return launch(command, processes=args.processes, devices_per_process=args.devices_per_process,
                platform=args.platform, port=args.port, timeout=args.timeout)


if __name__ == "__main__":
  sys.exit(main())
