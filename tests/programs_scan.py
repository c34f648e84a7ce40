"""Which programs the checkout starts: read from its Python (subprocess, os.exec*, shutil.which and the project's own
wrappers) and its shell scripts (parsed by shfmt, not by regular expressions). Used by tests/test_programs.py to hold
every such program to tools/packages.txt; a program the scan cannot name (built at run time) is simply not seen."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

# Shell builtins and keywords: never a program to install.
SHELL_BUILTINS = set(
    """. : [ [[ alias bg bind break builtin caller cd command compgen complete continue declare dirs disown echo enable
    eval exec exit export false fc fg getopts hash help history jobs kill let local logout mapfile popd printf pushd pwd
    read readarray readonly return set shift shopt source suspend test times trap true type typeset ulimit umask unalias
    unset wait""".split()
)
# Programs whose arguments name another program to start -> their options that take a value (skipped with it; other
# options and VAR=value words are skipped alone). timeout's duration is skipped too.
PREFIXES = {
    "env": {"-u", "-C"},
    "exec": {"-a"},
    "timeout": {"-s", "-k"},
    "nohup": set(),
    "setsid": set(),
    "xargs": {"-I", "-n", "-P", "-d", "-a", "-L", "-s", "-E"},
    "sudo": {"-u", "-g"},
    "command": set(),
    "nice": {"-n"},
    "stdbuf": {"-i", "-o", "-e"},
    "nsenter": {"-t", "-S", "-G", "-w", "-r"},
    "unshare": set(),
    "chroot": set(),
}
# The checkout's own shell functions that run their arguments: name -> how many words come before the program.
SHELL_RUNNERS = {"on": 1, "cmd_exec_daemon": 1, "wait_for": 0}
# Calls that start their first argument (or the argument after a node name) as a program.
STARTERS = {
    "run",
    "Popen",
    "call",
    "check_call",
    "check_output",
    "execv",
    "execvp",
    "execvpe",
    "execve",
    "execl",
    "execlp",
    "spawnv",
    "spawnvp",
    "create_subprocess_exec",
}
NAMERS = {"which", "find_executable", "tool"}  # return the path of the program they are given
NODE_STARTERS = {"argv", "popen"}  # tests/cluster.py's Cluster.argv/popen(node, program, ...)


def repo_files(repo: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=repo, capture_output=True, check=True
    )
    return sorted(f for f in out.stdout.decode().split("\0") if f and (repo / f).is_file())


def is_shell_script(repo: Path, name: str) -> bool:
    if name.endswith((".sh", ".sbatch")):
        return True
    try:
        first = (repo / name).open("rb").readline()
    except OSError:
        return False
    return first.startswith(b"#!") and (b"sh" in first.split(b"/")[-1].split()[0] or b"bash" in first)


# --- shell ---------------------------------------------------------------------------------------------------------


def _literal(word: dict | None) -> str | None:
    """A shell word's text where it is literal (quotes allowed), else None."""
    if not word:
        return None
    text = ""
    for part in word.get("Parts", []):
        if part["Type"] == "Lit":
            text += part.get("Value", "")
        elif part["Type"] in ("SglQuoted",):
            text += part.get("Value", "")
        elif part["Type"] == "DblQuoted" and all(p["Type"] == "Lit" for p in part.get("Parts", [])):
            text += "".join(p.get("Value", "") for p in part.get("Parts", []))
        else:
            return None
    return text


def _walk(node: object) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def shell_programs(source: str) -> Iterator[tuple[int, str]]:
    """(line, program) for each command of a shell source that names a program literally."""
    proc = subprocess.run(["shfmt", "--to-json"], input=source, capture_output=True, text=True)
    if proc.returncode:
        raise ValueError(f"shfmt cannot parse it: {proc.stderr.strip()}")
    tree = json.loads(proc.stdout)
    functions = {n["Name"]["Value"] for n in _walk(tree) if n.get("Type") == "FuncDecl"}
    for node in _walk(tree):
        if node.get("Type") != "CallExpr" or not node.get("Args"):
            continue
        words = [_literal(w) for w in node["Args"]]
        i = 0
        while i < len(words):
            word = words[i]
            if word in SHELL_RUNNERS and word in functions:
                i += 1 + SHELL_RUNNERS[word]
                continue
            if word is None or word in functions or word in SHELL_BUILTINS - {"exec", "command"}:
                break
            if word not in SHELL_BUILTINS:
                yield node["Args"][i]["Pos"]["Line"], os.path.basename(word) if word.startswith("/") else word
            if word not in PREFIXES:
                break
            i += 1  # the program the prefix starts: past its options (and their values) and VAR=value words
            while i < len(words) and words[i] is not None and (words[i].startswith("-") or "=" in words[i]):
                i += 2 if words[i] in PREFIXES[word] else 1
            if word == "timeout":
                i += 1
            if word == "chroot":
                i += 1


# --- Python --------------------------------------------------------------------------------------------------------


def _func_name(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _first_of(node: ast.AST, assigned: dict[str, list[ast.AST]], depth: int = 0) -> Iterator[ast.AST]:
    """The expressions that may be the first element of a command line."""
    if depth > 4:
        return
    if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
        yield node.elts[0]
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        yield from _first_of(node.left, assigned, depth + 1)
    elif isinstance(node, ast.Name):
        for value in assigned.get(node.id, []):
            yield from _first_of(value, assigned, depth + 1)
    elif isinstance(node, ast.Call) and _func_name(node) in NODE_STARTERS and len(node.args) > 1:
        yield node.args[1]
    elif isinstance(node, ast.Call) and _func_name(node) in ("horovodrun", "mpirun"):
        yield ast.Constant(_func_name(node))  # tests' helpers that return those launchers' argv


def python_programs(source: str) -> Iterator[tuple[int, str]]:
    """(line, program) for each program a Python source starts or looks up by a literal name."""
    tree = ast.parse(source)
    assigned: dict[str, list[ast.AST]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assigned.setdefault(target.id, []).append(node.value)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _func_name(node)
        if (
            name in NAMERS
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value
            continue
        module = (
            node.func.value.id
            if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
            else None
        )
        if name in STARTERS and module not in ("subprocess", "os", "asyncio", None) and name != "run":
            continue
        if name in STARTERS and module is None and name in ("run", "call"):
            continue  # a local function of that name, not subprocess's
        if name not in STARTERS and name not in NODE_STARTERS or not node.args:
            continue
        if (
            name in NODE_STARTERS
            or name == "run"
            and len(node.args) > 1
            and isinstance(node.func, ast.Attribute)
            and not isinstance(node.args[0], (ast.List, ast.Tuple, ast.BinOp))
        ):
            firsts = [node.args[1]] if len(node.args) > 1 else []
        elif isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            firsts = [node.args[0]]  # a command line for a shell (shell=True) or a lone program
        else:
            firsts = list(_first_of(node.args[0], assigned))
        shell = any(k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value for k in node.keywords)
        for first in firsts:
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                if shell or " " in first.value:
                    yield from ((node.lineno, p) for _, p in shell_programs(first.value))
                else:
                    yield node.lineno, first.value
            elif (
                isinstance(first, ast.Call)
                and _func_name(first) in NAMERS
                and first.args
                and isinstance(first.args[0], ast.Constant)
            ):
                yield node.lineno, first.args[0].value


# --- the checkout --------------------------------------------------------------------------------------------------


def scan(repo: Path) -> dict[str, list[str]]:
    """program -> ["file:line", ...] over the checkout's Python files and shell scripts (the Makefile's recipes
    too)."""
    found: dict[str, list[str]] = {}
    for name in repo_files(repo):
        path = repo / name
        if name.endswith(".py"):
            hits = python_programs(path.read_text())
        elif is_shell_script(repo, name):
            hits = shell_programs(path.read_text())
        elif name == "Makefile":
            lines = path.read_text().splitlines()
            recipe = "\n".join(line[1:].lstrip("@") for line in lines if line.startswith("\t"))
            recipe = re.sub(r"\$\((\w+)\)", r"${\1}", recipe)  # make's $(VAR), not a command substitution
            hits = shell_programs(recipe)
        else:
            continue
        for line, program in hits:
            found.setdefault(program, []).append(f"{name}:{line}")
    return found


def is_checkout_path(repo: Path, program: str) -> bool:
    """A script of the checkout (relative to the repository, or to the folder that names it) is not installed."""
    return "/" in program and not os.path.isabs(program)
