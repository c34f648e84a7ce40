"""Counts the tests' assertions and waits on log text: what a process wrote (stdout, stderr, a log file, pytest's
capsys) checked by an ``assert`` or waited on, other than through ``conftest.assert_says`` and
``cluster.Output.wait_says`` (what a CLI says to a person, or prints as its product). Tests read the run record
(metrics.jsonl) and the store/checkpoint APIs instead.

    python tests/log_text_count.py [-v] [FILE...]      (default: every tests/*.py)

How it decides, per function (an approximation, on the side of counting too much):
  * a *source* of log text is an expression with ``.stdout``, ``.stderr`` or ``.text`` (cluster.Output) as an
    attribute, a ``readouterr()`` call, ``.lines`` of an Output, or ``.read_text()`` / ``open(...).read()`` of a
    path whose expression mentions log or stdout; output parsed as JSON or YAML (``json.loads``, ``yaml.safe_load``:
    a command's machine-readable product) is not log text;
  * so is a call of a function of the tests (this file's, conftest's, cluster's) that returns log text;
  * a name assigned (or bound by ``for``/``with``/a comprehension) from an expression holding a source or a tainted
    name is tainted too (``lines = proc.stderr.splitlines()``, ``m = re.search(..., out)``);
  * a call of a helper by its bare name (``scontrol_job(slurm, job)``) is not log text, whatever its arguments (a
    handle such as a job id read from sbatch's output); -v lists such calls given log text, to read;
  * counted: every ``assert`` whose test (not its message) holds a source or a tainted name, and every wait on
    text: ``X.wait_for(pattern)``, ``wait_for_log(...)``, or ``wait_for(lambda: ...)`` whose lambda
    holds a source or tainted name.
Exit status 1 when the count is above ``--max`` (default: no limit).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

SOURCE_ATTRS = {"stdout", "stderr", "text", "lines"}
LOGGY = ("log", "stdout")
# Structured output parsed as such (JSON, YAML a command prints as its product) is data, not log text.
PARSERS = {"loads", "load", "safe_load", "safe_load_all"}
# Builtins that keep what they are given: their result is as much log text as their argument.
NOT_HELPERS = {"assert_says", "wait_for", "print", "dict", "open", "AssertionError", "ValueError"}
BUILTINS = {"int", "float", "str", "len", "sorted", "list", "set", "tuple", "min", "max", "sum", "any", "all", "next"}


# Functions of the tests (in the file counted, conftest.py, cluster.py) that return log text: a call is a source.
RETURNERS: set[str] = set()
# Of those that return a tuple, the positions that hold log text (``return proc.wait(), rest``: only 1): unpacking
# such a call (``status, rest = f()``) taints those names only.
TUPLE_TEXT: dict[str, set[int]] = {}


def _is_source(node: ast.AST) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in RETURNERS:
        return True
    if isinstance(node, ast.Attribute) and node.attr in SOURCE_ATTRS and isinstance(node.ctx, ast.Load):
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        name, recv = node.func.attr, node.func.value
        if name == "readouterr":
            return True
        if name == "read_text" and any(w in ast.unparse(recv).lower() for w in LOGGY):
            return True
        if name == "read" and isinstance(recv, ast.Call) and getattr(recv.func, "id", "") == "open":
            return any(w in ast.unparse(recv).lower() for w in LOGGY)
    return False


def _parsed(node: ast.AST) -> bool:
    """JSON or YAML parsed as such (``json.loads(line)``)."""
    return isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in PARSERS


def _tainted(node: ast.AST, names: set[str]) -> bool:
    if _parsed(node) or isinstance(node, (ast.ListComp, ast.GeneratorExp)) and _parsed(node.elt):
        return False
    if _is_source(node) or (isinstance(node, ast.Name) and node.id in names and isinstance(node.ctx, ast.Load)):
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in BUILTINS:
        return False  # a helper of the tests given a handle (a job id read from sbatch): see _handoffs
    return any(_tainted(child, names) for child in ast.iter_child_nodes(node))


def _targets(node: ast.AST) -> list[str]:
    """The names an assignment to ``node`` binds or fills (``outputs[name] = ...`` fills outputs, not name)."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, (ast.Tuple, ast.List)):
        return [n for e in node.elts for n in _targets(e)]
    if isinstance(node, ast.Starred):
        return _targets(node.value)
    if isinstance(node, ast.Subscript):
        return _targets(node.value)
    return []


def _unpacked(target: ast.AST, value: ast.AST) -> list[str] | None:
    """The names that ``target = value`` fills with log text when ``value`` calls a function returning a tuple of
    which only some positions are log text (:data:`TUPLE_TEXT`); None when that does not apply."""
    if not (isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, ast.Call)):
        return None
    positions = TUPLE_TEXT.get(getattr(value.func, "id", ""))
    if positions is None or any(isinstance(e, ast.Starred) for e in target.elts):
        return None
    return [n for i, e in enumerate(target.elts) if i in positions for n in _targets(e)]


def _taint(scope: ast.AST) -> set[str]:
    names: set[str] = set()
    while True:
        before = len(names)
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign) and _tainted(node.value, names):
                for t in node.targets:
                    unpacked = _unpacked(t, node.value)
                    names.update(_targets(t) if unpacked is None else unpacked)
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
                if _tainted(node.value, names):
                    names.update(_targets(node.target))
            elif isinstance(node, (ast.For, ast.comprehension)) and _tainted(node.iter, names):
                names.update(_targets(node.target))
            elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                if _tainted(node.context_expr, names):
                    names.update(_targets(node.optional_vars))
        if len(names) == before:
            return names


def _scopes(tree: ast.Module):
    """Each top-level function (nested ones with it: taint flows into closures) and the module's own statements."""
    top = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    for n in top:
        if isinstance(n, ast.ClassDef):
            yield from (m for m in n.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)))
        else:
            yield n
    yield ast.Module(body=[n for n in tree.body if n not in top], type_ignores=[])


def _is_wait_on_text(node: ast.Call, names: set[str]) -> bool:
    f = node.func
    if isinstance(f, ast.Attribute) and f.attr == "wait_for_log":
        return True
    if isinstance(f, ast.Attribute) and f.attr == "wait_for" and node.args and not isinstance(node.args[0], ast.Lambda):
        return True  # a wait_for method: a wait on a pattern in some output
    if isinstance(f, ast.Name) and f.id == "wait_for" and node.args and isinstance(node.args[0], ast.Lambda):
        return _tainted(node.args[0].body, names)
    return False


def _handoffs(scope: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """Calls of the tests' own helpers given log text (not counted; listed with -v, to read)."""
    out = []
    for node in ast.walk(scope):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in BUILTINS:
            if node.func.id not in NOT_HELPERS and any(_tainted(a, names) for a in [*node.args, *node.keywords]):
                out.append((node.lineno, "given  " + ast.unparse(node)))
    return out


def _returners(tree: ast.Module) -> set[str]:
    """The functions of ``tree`` that return log text (``def launch(...): ... return proc.stdout``)."""
    found: set[str] = set()
    while True:
        before = len(found)
        RETURNERS.update(found)
        for scope in ast.walk(tree):  # (nested helpers too)
            if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)) and scope.name not in found:
                names = _taint(scope)
                returns = [n.value for n in ast.walk(scope) if isinstance(n, ast.Return) and n.value is not None]
                if any(_tainted(r, names) for r in returns):
                    found.add(scope.name)
                    tuples = [r for r in returns if isinstance(r, ast.Tuple)]
                    if tuples and len(tuples) == len(returns) and len({len(r.elts) for r in tuples}) == 1:
                        TUPLE_TEXT[scope.name] = {i for r in tuples for i, e in enumerate(r.elts) if _tainted(e, names)}
        if len(found) == before:
            return found


def count(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    RETURNERS.clear()
    TUPLE_TEXT.clear()
    for shared in ("conftest.py", "cluster.py"):
        RETURNERS.update(_returners(ast.parse((Path(__file__).parent / shared).read_text())))
    RETURNERS.update(_returners(tree))
    hits = []
    for scope in _scopes(tree):
        if getattr(scope, "name", "") == "assert_says":
            continue
        names = _taint(scope)
        for node in ast.walk(scope):
            if isinstance(node, ast.Assert) and _tainted(node.test, names):
                hits.append((node.lineno, "assert " + ast.unparse(node.test)))
            elif isinstance(node, ast.Call) and _is_wait_on_text(node, names):
                hits.append((node.lineno, "wait   " + ast.unparse(node)))
    return sorted(set(hits))


def handoffs(path: Path) -> list[tuple[int, str]]:
    count(path)  # (its RETURNERS)
    tree = ast.parse(path.read_text(), str(path))
    return sorted({h for scope in _scopes(tree) for h in _handoffs(scope, _taint(scope))})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("-v", "--verbose", action="store_true", help="list each one")
    p.add_argument("--max", type=int, default=None, help="exit 1 when more than this")
    a = p.parse_args()
    here = Path(__file__).resolve().parent
    files = a.files or sorted(f for f in here.glob("*.py") if f.name != Path(__file__).name)
    total = 0
    for f in files:
        hits = count(f)
        total += len(hits)
        given = handoffs(f) if a.verbose else []
        if hits or given:
            print(f"{len(hits):4d} {f.name}")
        if a.verbose:
            for line, what in hits + [(n, w + "  (not counted)") for n, w in given]:
                print(f"       {line}: {what[:150]}")
    print(f"{total:4d} in all")
    return 1 if a.max is not None and total > a.max else 0


if __name__ == "__main__":
    sys.exit(main())
