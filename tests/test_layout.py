"""The codebase's layout rules, read from the source (nothing heavy is imported except the CLI's typer tree).

- `lineguard/` is the shared base: no module in it imports a room (ingest, inference, storage, dialogue,
  training, deploy), not even lazily inside a function;
- the `lineguard` command is the rooms' commands assembled by `deploy/app.py`: the same tree of commands and
  groups as before the rooms owned them, and every room's user-fixable errors still print one `error:` line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("ingest", "inference", "storage", "dialogue", "training", "deploy")


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


def test_the_shared_package_imports_no_room():
    files = sorted((REPO / "lineguard").rglob("*.py"))
    assert REPO / "lineguard" / "cli.py" in files
    offending = [f"{path.relative_to(REPO)}:{line}: {name}" for path in files for line, name in room_imports(path)]
    assert not offending, "lineguard/ must not import a room:\n" + "\n".join(offending)


def test_the_import_check_sees_lazy_imports(tmp_path):
    sample = tmp_path / "probe.py"
    sample.write_text("import lineguard.settings\n\n\ndef f():\n    from storage.records import RecordStore\n"
                      "    import deploy.stack\n    importlib.import_module('ingest.cli')\n"
                      "    from .events import Verdict\n")
    assert room_imports(sample) == [(5, "storage.records"), (6, "deploy.stack"), (7, "ingest.cli")]


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
    for room in ("ingest", "inference", "storage", "dialogue", "training", "deploy"):
        tree = ast.parse((REPO / room / "cli.py").read_text())
        assert any(isinstance(node, ast.FunctionDef) and node.name == "register" for node in tree.body), room


def test_every_rooms_user_errors_are_one_line_errors():
    import deploy.app  # noqa: F401  (registers the rooms)
    from lineguard.cli import _user_errors

    assert {error.__name__ for error in _user_errors()} == {
        "KafkaUnavailable", "StackError", "DeliveryFailed", "FrameTooLarge", "SourceError", "ReferenceError",
        "ModelBroken", "RegistryError", "StorageError", "TrainingLocked"}
