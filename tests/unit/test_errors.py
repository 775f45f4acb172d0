"""The exception tree in ``errors.py``'s docstring is the tree of classes, and every class in it is raised."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import asyncdepo
from asyncdepo import errors

PACKAGE = Path(asyncdepo.__file__).parent


def _docstring_tree() -> dict[str, str | None]:
    """class name -> parent name, read from the box drawing in the module docstring."""
    doc = errors.__doc__ or ""
    tree: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        m = re.match(r"^(\s*(?:[│ ]   )*)(?:[├└]── )?([A-Z][A-Za-z]+)\s{2,}", line)
        if not m or not line.startswith("    "):
            continue
        depth = len(m.group(1)) // 4 + (1 if "──" in line else 0)
        name = m.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        tree[name] = stack[-1][1] if stack else None
        stack.append((depth, name))
    return tree


def _classes() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, errors.DepoError):
            parent = obj.__bases__[0]
            out[name] = parent.__name__ if parent is not Exception else None
    return out


def test_the_docstring_tree_is_the_class_tree() -> None:
    drawn = _docstring_tree()
    assert drawn["DepoError"] is None and len(drawn) > 10
    assert drawn == _classes()


def test_every_class_of_the_tree_is_raised_somewhere() -> None:
    """Each error class (or a subclass of it defined elsewhere) is constructed by the package's code, outside
    errors.py: a class nobody raises does not belong in the tree."""
    made: set[str] = set()
    subclasses: dict[str, str] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py" or "sim" in path.relative_to(PACKAGE).parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
                made.add(name)
            elif isinstance(node, ast.Return) and isinstance(node.value, ast.Name):
                made.add(node.value.id)  # an archive's refine() returns the class status_error raises
            elif isinstance(node, ast.ClassDef):
                for base in node.bases:
                    base_name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
                    subclasses[node.name] = base_name
    # status_error picks classes from a table: count those it names as raised
    failures = (PACKAGE / "transport" / "failures.py").read_text()
    made |= set(re.findall(r"\b([A-Z][A-Za-z]+Error)\b", failures))

    def raised(cls: str) -> bool:
        return cls in made or any(base == cls and raised(sub) for sub, base in subclasses.items())

    never = [cls for cls in _classes() if cls != "DepoError" and not raised(cls)]
    assert never == []
