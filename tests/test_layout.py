"""The house's import rule: no arrow up. contract/ imports no room of the project; model_store/ only the
contract; service/ only the contract and the artifact; offline/ (learning, calibration) neither the loop nor
the research bench; loop/ not the research bench. Imports inside functions count as much as those at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("contract", "model_store", "service", "offline", "loop", "research", "saco")
ALLOWED = {
    "contract": set(),
    "model_store": {"contract"},
    "service": {"contract", "model_store"},
    "offline": {"contract", "model_store"},
    "loop": {"contract", "model_store", "offline"},
    "research": {"contract", "model_store", "offline", "loop"},
    "saco": set(ROOMS),
}


def imported_rooms(path: Path) -> dict[str, int]:
    """Each project room the module imports, with the first line that does."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            room = name.split(".")[0]
            if room in ROOMS:
                found.setdefault(room, node.lineno)
    return found


@pytest.mark.parametrize("room", ROOMS)
def test_no_room_imports_a_room_above_it(room: str) -> None:
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {other}"
        for path in sorted((REPO / room).rglob("*.py"))
        for other, line in imported_rooms(path).items()
        if other != room and other not in ALLOWED[room]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_rule_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from research.world import WorldConfig\n    import loop.gate\n")
    assert imported_rooms(module) == {"research": 2, "loop": 3}
