"""Lines per package module and the longest package functions, as a Markdown snapshot for the README.

    python tools/code_size.py [--top 10]

A function's length is from its `def` (decorators excluded) to its last line, docstring and comments included;
a method is named `Class.method`, a nested function `outer.inner`.
"""
import argparse
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "distilbert_jax"


def functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, int]]:
  """(qualified name, lines) of every function below `tree`."""
  found = []
  for node in ast.iter_child_nodes(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      found.append((prefix + node.name, node.end_lineno - node.lineno + 1))
      found += functions(node, prefix + node.name + ".")
    elif isinstance(node, ast.ClassDef):
      found += functions(node, prefix + node.name + ".")
  return found


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--top", type=int, default=10, help="how many of the longest functions to list")
  args = parser.parse_args(argv)
  rows, funcs = [], []
  for path in sorted(PACKAGE.glob("*.py")):
    text = path.read_text()
    rows.append((path.name, len(text.splitlines()), sum(1 for line in text.splitlines() if line.strip())))
    funcs += [(f"{path.stem}.{name}", n) for name, n in functions(ast.parse(text))]
  print("| module | lines | non-blank |\n| --- | ---: | ---: |")
  for name, lines, code in rows:
    print(f"| `{name}` | {lines} | {code} |")
  print(f"| total | {sum(r[1] for r in rows)} | {sum(r[2] for r in rows)} |\n")
  print("| function | lines |\n| --- | ---: |")
  for name, n in sorted(funcs, key=lambda f: -f[1])[:args.top]:
    print(f"| `{name}` | {n} |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
