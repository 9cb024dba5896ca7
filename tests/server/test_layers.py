"""One writer per table, checked on the source: the lifecycle is the only code that writes a batch row, and
nothing outside the database calls the database's private methods (docs/server.md, "One writer")."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import vllm_batch_server
from vllm_batch_server.store.database import Database

PACKAGE = Path(vllm_batch_server.__file__).parent
DATABASE = "store/database.py"
LIFECYCLE = "store/lifecycle.py"

# What a Database is called wherever one is held: `db`, `self.db`, `self._db`, `ctx.db`, `database`, ...
DB_NAMES = {"db", "_db", "database", "_database"}
# SQL that changes the batches table.
WRITES_BATCHES = re.compile(r"\b(?:INSERT\s+(?:OR\s+\w+\s+)?INTO|REPLACE\s+INTO|UPDATE|DELETE\s+FROM)\s+batches\b",
                            re.IGNORECASE)
# The database's doors to the batches table: a transaction of batch writes, and a checkpoint committer.
BATCH_DOORS = {"writes", "checkpoint_committer"}


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), str(path))


def names_a_database(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in DB_NAMES or node.id == "Database"
    return isinstance(node, ast.Attribute) and node.attr in DB_NAMES


def private_database_calls(tree: ast.AST) -> list[str]:
    return [f"line {node.lineno}: .{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            and names_a_database(node.value)]


def batch_writes(tree: ast.AST) -> list[str]:
    found = [f"line {node.lineno}: SQL {node.value[:60]!r}" for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and WRITES_BATCHES.search(node.value)]
    found += [f"line {node.lineno}: .{node.func.attr}()" for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in BATCH_DOORS and names_a_database(node.func.value)]
    return found


def test_the_checks_see_what_they_look_for() -> None:
    tree = ast.parse("async def f(db, self):\n"
                     "    await self._db._insert_event(1)\n"
                     "    async with db.writes() as tx: pass\n"
                     "    await self._conn.execute('UPDATE batches SET x = 1')\n")
    assert private_database_calls(tree) == ["line 2: ._insert_event"]
    assert len(batch_writes(tree)) == 2


def test_nothing_outside_the_database_calls_its_private_methods() -> None:
    offenders = {name: calls for name, tree in modules() if name != DATABASE
                 and (calls := private_database_calls(tree))}
    assert offenders == {}


def test_only_the_lifecycle_writes_the_batches_table() -> None:
    offenders = {name: writes for name, tree in modules() if name not in (DATABASE, LIFECYCLE)
                 and (writes := batch_writes(tree))}
    assert offenders == {}
    # The SQL itself is the database's: the lifecycle asks for it by name, never writes it.
    assert not [w for w in batch_writes(ast.parse((PACKAGE / LIFECYCLE).read_text())) if "SQL" in w]
    # And the database offers no writer of batch rows outside those doors.
    assert not hasattr(Database, "update_batch")
