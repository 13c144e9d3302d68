"""The test suite's own marks: a mark the fast tier relies on must be where pytest reads it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
# A mark, then the next function defined not a test's: only the files with one are parsed (parsing them
# all takes a second, in the fast tier).
MARK_THEN_HELPER = re.compile(r"@pytest\.mark\.(?:(?!\bdef\s).)*?\bdef\s+(?!test)\w", re.DOTALL)


def _marks(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """The names of the ``pytest.mark.<name>`` decorators of ``function`` (called or not)."""
    names = []
    for decorator in function.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if (
            isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Attribute)
            and target.value.attr == "mark"
            and isinstance(target.value.value, ast.Name)
            and target.value.value.id == "pytest"
        ):
            names.append(target.attr)
    return names


def test_marks_are_on_tests_not_on_their_helpers() -> None:
    """pytest reads marks only from tests: a ``slow`` put on a helper above a test (a real 1 s timeout in
    the test that follows it) left that test in the fast unit run, which ``-m "not slow"`` is to keep
    fast."""
    suspects = {
        path: text
        for path in sorted(TESTS.rglob("*.py"))
        if MARK_THEN_HELPER.search(text := path.read_text())
    }
    misplaced = [
        f"{path.relative_to(TESTS)}:{node.lineno} {node.name} (@pytest.mark.{', '.join(marks)})"
        for path, text in suspects.items()
        for node in ast.walk(ast.parse(text, str(path)))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and not node.name.startswith("test")
        and (marks := _marks(node))
    ]
    assert not misplaced, misplaced
