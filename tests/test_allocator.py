"""The command lines' host allocator: finding tcmalloc, the environment of the second run, the re-run itself."""
import os
import pathlib
import subprocess
import sys

from distilbert_jax import allocator


def _library(folder: pathlib.Path, name: str) -> str:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / name).write_bytes(b"")
  return str(folder / name)


def test_find_tcmalloc(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  assert allocator.find_tcmalloc({}, folders=(a, b)) is None
  full = _library(b, "libtcmalloc.so.4")
  assert allocator.find_tcmalloc({}, folders=(a, b)) == full
  minimal = _library(b, "libtcmalloc_minimal.so.4")  # the minimal build first (no heap profiler)
  assert allocator.find_tcmalloc({}, folders=(a, b)) == minimal
  assert allocator.find_tcmalloc({}, folders=(str(a), str(b))) == minimal
  assert allocator.find_tcmalloc({allocator.LIBRARY: "/opt/tc/libtcmalloc.so"}, folders=(b,)) == "/opt/tc/libtcmalloc.so"


def test_reexec_environment(tmp_path):
  lib = _library(tmp_path, "libtcmalloc_minimal.so.4")
  folders = (tmp_path,)
  env = allocator.reexec_environment({"PATH": "/bin", "LD_PRELOAD": "/x/libfoo.so"}, "linux", folders)
  assert env["LD_PRELOAD"] == f"{lib} /x/libfoo.so" and env["PATH"] == "/bin"
  assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
  env = allocator.reexec_environment({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"}, "linux", folders)
  assert env["LD_PRELOAD"] == lib and env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"  # the user's is kept
  # Nothing to do: off Linux, opted out, already preloaded (by any path, or the library named), not installed.
  assert allocator.reexec_environment({}, "darwin", folders) is None
  assert allocator.reexec_environment({allocator.OPT_OUT: "System"}, "linux", folders) is None
  assert allocator.reexec_environment({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, "linux", folders) is None
  assert allocator.reexec_environment({allocator.LIBRARY: "libm.so.6", "LD_PRELOAD": "libm.so.6"}, "linux") is None
  assert allocator.reexec_environment({}, "linux", (tmp_path / "empty",)) is None


def test_describe(tmp_path):
  assert "tcmalloc (/u/libtcmalloc_minimal.so.4;" in allocator.describe({"LD_PRELOAD": "/u/libtcmalloc_minimal.so.4"},
                                                                          "linux")
  assert "C library's malloc (DISTILBERT_JAX_MALLOC=system)" in allocator.describe({allocator.OPT_OUT: "system"},
                                                                                      "linux")
  assert "libtcmalloc-minimal4" in allocator.describe({}, "linux", (tmp_path,))
  lib = _library(tmp_path, "libtcmalloc.so.4")
  assert allocator.describe({}, "linux", (tmp_path,)) == (f"host allocator: tcmalloc ({lib}) for the command lines "
                                                          "(train, finetune, evaluate, fidelity)")
  assert allocator.describe({}, "darwin") == "host allocator: the system's malloc"


def test_reexec_runs_the_same_command_once_with_the_library_preloaded(tmp_path):
  """A real re-run: the command starts twice (once as given, once preloaded) and then goes on. The library is
  the C math library, present on every Linux, named through DISTILBERT_JAX_TCMALLOC."""
  starts = tmp_path / "starts"
  code = ("import os, sys\n"
          f"open({str(starts)!r}, 'a').write(os.environ.get('LD_PRELOAD', '-') + '\\n')\n"
          "from distilbert_jax import allocator\n"
          "allocator.reexec()\n"
          "print('ran', sys.argv[1:], os.environ.get('TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD'))\n")
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.OPT_OUT)}
  env[allocator.LIBRARY] = "libm.so.6"
  out = subprocess.run([sys.executable, "-c", code, "a", "b"], env=env, capture_output=True, text=True, check=True,
                       timeout=300)
  assert starts.read_text().splitlines() == ["-", "libm.so.6"]
  assert out.stdout.splitlines() == [f"ran ['a', 'b'] {1 << 40}"]
  env[allocator.OPT_OUT] = "system"
  starts.unlink()
  subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=300)
  assert starts.read_text().splitlines() == ["-"]
