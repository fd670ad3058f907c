"""Line counts of method files (issue 17, item 6): total, module docstring, config dataclasses (and how
much of them is hand-written ``__post_init__`` validation), the rest (the recipe: imports, model
builder, step functions, inference, persistence) and the three largest functions.

    python benchmarks/recipe_lines.py                       # this tree's src/imgclust/methods
    python benchmarks/recipe_lines.py /path/to/other/src    # another tree, to compare
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FILES = ("spice", "icbpl", "pici", "temi", "icce")


def row(path: Path) -> str:
    src = path.read_text()
    tree = ast.parse(src)
    n = len(src.splitlines())
    first = tree.body[0] if tree.body else None
    doc = (first.end_lineno - first.lineno + 1) if isinstance(first, ast.Expr) and isinstance(
        getattr(first, "value", None), ast.Constant) else 0
    configs = [c for c in tree.body if isinstance(c, ast.ClassDef) and c.name.endswith("Config")]
    cfg = sum(c.end_lineno - c.lineno + 1 + len(c.decorator_list) for c in configs)
    post = sum(f.end_lineno - f.lineno + 1 for c in configs for f in c.body
               if isinstance(f, ast.FunctionDef) and f.name == "__post_init__")
    fns = sorted(((f.end_lineno - f.lineno + 1, f.name) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)),
                 reverse=True)[:3]
    largest = ", ".join(f"{name} {length}" for length, name in fns)
    return f"{path.stem:<7} {n:5d} {doc:5d} {cfg:5d} {post:5d} {n - doc - cfg:5d}   {largest}"


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "src"
    print(f"{'file':<7} {'total':>5} {'doc':>5} {'cfg':>5} {'post':>5} {'rest':>5}   largest functions (lines)")
    for name in FILES:
        print(row(root / "imgclust" / "methods" / f"{name}.py"))


if __name__ == "__main__":
    main()
