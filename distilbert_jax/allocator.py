"""The host memory allocator of the command-line runs: tcmalloc where it is installed.

XLA's CPU runtime allocates each execution's temporaries afresh, one or two blocks of 100+ MB per step of the
demo: above the largest block glibc's malloc keeps for reuse (32 MB), so every step maps them anew and the kernel
zeroes every page the step touches (BENCHMARKS.md "The kernel's share"). tcmalloc keeps freed blocks for the next
step: on 2 Intel Xeon cores the demo's distillation step (`tools/bench.py`) took 2.12 s instead of 2.95 s, and
PyTorch's (which gains too) 1.71 s instead of 2.25 s; the whole demo 9 min 32 s instead of 10 min 48 s
(BENCHMARKS.md "The host allocator").

The library cannot be switched inside a running process, so `reexec` runs the command again with it in
`LD_PRELOAD`, once, before anything is computed. It does nothing where the library is missing (install Debian's
or Ubuntu's `libtcmalloc-minimal4`, or `google-perftools`), already preloaded, off Linux, or opted out with
`DISTILBERT_JAX_MALLOC=system`; `DISTILBERT_JAX_TCMALLOC=PATH` names another build of the library.
"""
from __future__ import annotations

import os
import pathlib
import sys
from typing import Mapping

OPT_OUT = "DISTILBERT_JAX_MALLOC"  # "system": keep the C library's malloc
LIBRARY = "DISTILBERT_JAX_TCMALLOC"  # a path to the library, instead of the search below
NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
FOLDERS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# No report on stderr of each block over 1 GB (a bert-base step on a CPU has them). tcmalloc's page release is
# left at its default: never releasing (TCMALLOC_RELEASE_RATE=0) measured the same (BENCHMARKS.md).
SETTINGS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def find_tcmalloc(environ: Mapping[str, str] = os.environ, folders=FOLDERS) -> str | None:
  """The library's path: `DISTILBERT_JAX_TCMALLOC` if set, else the first of `NAMES` in `folders`."""
  if environ.get(LIBRARY):
    return environ[LIBRARY]
  for folder in folders:
    for name in NAMES:
      if (pathlib.Path(folder) / name).is_file():
        return str(pathlib.Path(folder) / name)
  return None


def _preloads(environ: Mapping[str, str]) -> list[str]:
  return environ.get("LD_PRELOAD", "").replace(":", " ").split()  # ld.so takes spaces or colons


def preloaded(environ: Mapping[str, str] = os.environ) -> str | None:
  """The tcmalloc entry of `LD_PRELOAD`, if any."""
  return next((e for e in _preloads(environ) if "tcmalloc" in pathlib.Path(e).name), None)


def reexec_environment(environ: Mapping[str, str] = os.environ, platform: str = sys.platform,
                       folders=FOLDERS) -> dict[str, str] | None:
  """The environment to run this command again under tcmalloc, or None where nothing is to be done. The user's
  own `TCMALLOC_*` settings are kept; the library goes before any other preloaded one."""
  if not platform.startswith("linux") or environ.get(OPT_OUT, "").lower() == "system" or preloaded(environ):
    return None
  library = find_tcmalloc(environ, folders)
  if library is None or library in _preloads(environ):
    return None
  env = dict(environ)
  env["LD_PRELOAD"] = " ".join(filter(None, (library, environ.get("LD_PRELOAD", ""))))
  for key, value in SETTINGS.items():
    env.setdefault(key, value)
  return env


def reexec() -> None:
  """Replaces this process by the same command under tcmalloc (`reexec_environment`); returns where there is
  nothing to do. Call it first thing in a command line's `__main__`, never inside a library call."""
  env = reexec_environment()
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


def describe(environ: Mapping[str, str] = os.environ, platform: str = sys.platform, folders=FOLDERS) -> str:
  """One line for a run's log (and setup.sh): which allocator runs, and how to change that."""
  if not platform.startswith("linux"):
    return "host allocator: the system's malloc"
  library = preloaded(environ)
  if library:
    return f"host allocator: tcmalloc ({library}; {OPT_OUT}=system turns it off)"
  if environ.get(OPT_OUT, "").lower() == "system":
    return f"host allocator: the C library's malloc ({OPT_OUT}=system)"
  library = find_tcmalloc(environ, folders)
  if library:
    return f"host allocator: tcmalloc ({library}) for the command lines (train, finetune, evaluate, fidelity)"
  return ("host allocator: the C library's malloc; with tcmalloc installed (Debian/Ubuntu: libtcmalloc-minimal4) "
          "CPU steps take up to a quarter less time (README \"Faster CPU runs\")")
