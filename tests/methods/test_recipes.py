"""Method files are recipes (issue 17, items 5-6): no networks defined in methods/, and one wrapper /
one trainable-copy helper for every backbone + head trained together."""

import ast
from pathlib import Path

import imgclust

SRC = Path(imgclust.__file__).parent


def _classes_subclassing_module(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                name = ast.unparse(base)
                if name in ("nn.Module", "torch.nn.Module", "Module"):
                    out.append(f"{path.name}:{node.name}")
    return out


def test_no_network_is_defined_in_a_method_file():
    found = [c for p in sorted((SRC / "methods").glob("*.py")) for c in _classes_subclassing_module(p)]
    assert found == [], f"networks belong in heads/ or backbones/: {found}"


def test_backbones_are_made_trainable_only_by_the_one_helper():
    """Turning a backbone's gradients on happens in backbones/finetune.py only (trainable_copy)."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).as_posix() == "backbones/finetune.py":
            continue
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            if "requires_grad_(True)" in line and "weight" not in line and "bias" not in line:
                offenders.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert offenders == []


def _self_attributes_set(cls: ast.ClassDef) -> set[str]:
    names = set()
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else []
        for t in targets:
            for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if isinstance(el, ast.Attribute) and ast.unparse(el.value) == "self":
                    names.add(el.attr)
    return names


def test_one_backbone_head_wrapper():
    """No module other than heads/wrap.py defines a Module that sets both ``self.backbone`` and ``self.head``."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).as_posix() == "heads/wrap.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and {"backbone", "head"} <= _self_attributes_set(node):
                found.append(f"{path.relative_to(SRC)}:{node.name}")
    assert found == []
    wrap = ast.parse((SRC / "heads" / "wrap.py").read_text())
    assert any(isinstance(n, ast.ClassDef) and {"backbone", "head"} <= _self_attributes_set(n) for n in ast.walk(wrap))
