"""The codebase's layout rules, read from the source (nothing heavy is imported except the CLI's typer tree).

- the rooms stand on floors, and an import runs only downward: `lineguard/` (the shared base, the embedded
  stack included) at the bottom, then ingest → inference → storage → dialogue and training (one floor: they
  never import each other), with bench/ and deploy/ on top (deploy assembles the CLI, so it may import bench).
  Lazy imports inside functions and `importlib.import_module("...")` / `__import__("...")` count too;
- the `lineguard` command is the rooms' commands assembled by `deploy/app.py`: the same tree of commands and
  groups as before the rooms owned them, and every room's user-fixable errors still print one `error:` line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[1]

# room → the rooms it may import (besides itself). Everything not listed is forbidden: upward, sideways
# (dialogue ↔ training) and in a circle.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "lineguard": frozenset(),
    "ingest": frozenset({"lineguard"}),
    "inference": frozenset({"lineguard", "ingest"}),
    "storage": frozenset({"lineguard", "ingest", "inference"}),
    "dialogue": frozenset({"lineguard", "ingest", "inference", "storage"}),
    "training": frozenset({"lineguard", "ingest", "inference", "storage"}),
    "bench": frozenset({"lineguard", "ingest", "inference", "storage", "dialogue", "training"}),
    "deploy": frozenset({"lineguard", "ingest", "inference", "storage", "dialogue", "training", "bench"}),
}
ROOMS = tuple(MAY_IMPORT)


def _room(module: str | None) -> str | None:
    top = (module or "").split(".")[0]
    return top if top in ROOMS else None


def room_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of a room in `path`, at any depth, `importlib.import_module("...")` and
    `__import__("...")` with a literal name included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [(node.lineno, name) for name in names if _room(name)]
    return found


def dynamic_imports(path: Path) -> list[int]:
    """Lines of `import_module(x)` / `__import__(x)` calls whose name is not a literal: the rule table cannot
    read them, so the product code has none."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and not (
                    node.args and isinstance(node.args[0], ast.Constant)):
                lines.append(node.lineno)
    return lines


def violations(repo: Path) -> list[str]:
    """Every import in the product code that the rule table forbids, as `path:line: room → module`."""
    found = []
    for room, allowed in MAY_IMPORT.items():
        for path in sorted((repo / room).rglob("*.py")):
            for line, name in room_imports(path):
                target = _room(name)
                if target != room and target not in allowed:
                    found.append(f"{path.relative_to(repo)}:{line}: {room} → {name}")
            found += [f"{path.relative_to(repo)}:{line}: {room} → a computed module name"
                      for line in dynamic_imports(path)]
    return found


def test_every_import_runs_downward():
    assert (REPO / "lineguard" / "cli.py").exists() and (REPO / "bench" / "report.py").exists()
    offending = violations(REPO)
    assert not offending, "imports that run upward, sideways or in a circle:\n" + "\n".join(offending)


def test_the_rule_table_fails_on_an_upward_import(tmp_path):
    """A test of the test: a copy of the tree with one upward import (storage → deploy), one sideways
    (training → dialogue), one in the base (lineguard → a room, lazily) and a computed name is caught, each."""
    for room in ROOMS:
        (tmp_path / room).mkdir()
    (tmp_path / "storage" / "x.py").write_text("from deploy.stack import thing\n")
    (tmp_path / "training" / "y.py").write_text("import lineguard.settings\n\n\ndef f():\n"
                                                "    from dialogue.answers import answer\n")
    (tmp_path / "lineguard" / "z.py").write_text("def g():\n    importlib.import_module('ingest.cli')\n")
    (tmp_path / "bench" / "w.py").write_text("import importlib\nname = 'deploy'\nimportlib.import_module(name)\n")
    (tmp_path / "inference" / "ok.py").write_text("from ingest.publisher import encode_jpeg\nfrom .model import m\n")
    assert sorted(violations(tmp_path)) == ["bench/w.py:3: bench → a computed module name",
                                            "lineguard/z.py:2: lineguard → ingest.cli",
                                            "storage/x.py:1: storage → deploy.stack",
                                            "training/y.py:5: training → dialogue.answers"]


def test_the_import_check_sees_lazy_imports(tmp_path):
    sample = tmp_path / "probe.py"
    sample.write_text("import lineguard.settings\n\n\ndef f():\n    from storage.records import RecordStore\n"
                      "    import deploy.app\n    importlib.import_module('ingest.cli')\n"
                      "    from .events import Verdict\n")
    assert room_imports(sample) == [(1, "lineguard.settings"), (5, "storage.records"), (6, "deploy.app"),
                                    (7, "ingest.cli")]


def test_python_m_lineguard_is_gone_and_python_m_deploy_runs_the_app():
    assert not (REPO / "lineguard" / "__main__.py").exists(), "it would have to import the rooms"
    assert "deploy.app" in (REPO / "deploy" / "__main__.py").read_text()


# -- the command tree -----------------------------------------------------------------------------------------

EXPECTED = {
    (), ("up",), ("down",), ("ingest",), ("monitor",), ("demo",), ("infer",), ("schema",), ("eval",),
    ("stats",), ("store",), ("records",), ("db",), ("db", "upgrade"), ("db", "current"),
    ("topics",), ("topics", "create"), ("topics", "list"),
    ("refs",), ("refs", "add"), ("refs", "list"),
    ("bench",), ("bench", "stream"), ("bench", "resolution"), ("bench", "memory"), ("bench", "dialogue"),
    ("bench", "scale"), ("bench", "gpu"), ("bench", "all"), ("bench", "store"), ("bench", "train"), ("bench", "lvlm"),
    ("bench", "soak"),
    ("grafana",), ("grafana", "push"), ("grafana", "generate"),
    ("train",), ("train", "lvlm"),
    ("models",), ("models", "list"), ("models", "show"), ("models", "promote"), ("models", "rollback"),
    ("dialogue",), ("dialogue", "token"), ("dialogue", "token", "create"), ("dialogue", "token", "list"),
    ("dialogue", "token", "revoke"),
}


def command_paths(command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [path]
    for name, sub in getattr(command, "commands", {}).items():
        paths += command_paths(sub, (*path, name))
    return paths


def test_the_cli_tree_is_every_rooms_commands():
    from deploy.app import app

    root = typer.main.get_command(app)
    assert set(command_paths(root)) == EXPECTED
    assert list(root.commands) == ["up", "down", "ingest", "monitor", "demo", "infer", "schema", "stats", "store",
                                   "records", "eval", "db", "topics", "refs", "bench", "grafana", "train", "models",
                                   "dialogue"], "the order `lineguard --help` lists them in"
    assert list(root.commands["bench"].commands) == ["stream", "resolution", "memory", "scale", "dialogue", "gpu",
                                                     "all", "store", "train", "lvlm", "soak"]


def test_each_room_registers_its_own_commands():
    for room in ("ingest", "inference", "storage", "dialogue", "training", "deploy", "bench"):
        tree = ast.parse((REPO / room / "cli.py").read_text())
        assert any(isinstance(node, ast.FunctionDef) and node.name == "register" for node in tree.body), room


def test_every_rooms_user_errors_are_one_line_errors():
    import deploy.app  # noqa: F401  (registers the rooms)
    from lineguard.cli import _user_errors

    assert {error.__name__ for error in _user_errors()} == {
        "KafkaUnavailable", "StackError", "DeliveryFailed", "FrameTooLarge", "SourceError", "ReferenceError",
        "ModelBroken", "RegistryError", "StorageError", "TrainingLocked"}
