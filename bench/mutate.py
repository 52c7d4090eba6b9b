"""Mutation testing: the share of small code changes ("mutants") that make the given tests fail.

Works on a private copy of ``src/`` and ``tests/`` (the working tree is never modified): for each
mutant of one source file it writes the mutated file into the copy, forks a process that already
holds torch, numpy and pytest in memory, runs ``pytest -x`` on the given tests there, and counts the
mutant killed when they fail (or run past ``--timeout``). Mutations, on the AST: arithmetic
operators (+ -, * /, // /, ** *), comparisons (< <=, > >=, == !=, is / is not, in / not in),
and/or, dropping ``not`` and unary minus, numbers n -> n + 1, True/False, min/max, any/all,
argmin/argmax, negated if/while conditions, and removing an assignment or call statement.
Strings, docstrings, annotations, asserts and ``raise`` statements are not mutated.

    python bench/mutate.py src/flexmerge/sizes.py tests/test_plan.py tests/test_conformance.py \
        [--only CostModel,mask_bytes] [--skip-if planner] [--lines 70,74] [--timeout 120] [--out survivors.json]

Prints every surviving mutant (line and change) and the share killed.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
          ast.FloorDiv: ast.Div, ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult,
          ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.LShift: ast.RShift, ast.RShift: ast.LShift}
CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
          ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
NAMES = {"min": "max", "max": "min", "any": "all", "all": "any", "argmax": "argmin", "argmin": "argmax",
         "amax": "amin", "amin": "amax"}


def _skip_subtree(node: ast.AST) -> bool:
    return isinstance(node, (ast.Raise, ast.Assert, ast.JoinedStr, ast.Import, ast.ImportFrom))


def _is_docstring(node: ast.AST, parent: ast.AST | None) -> bool:  # any bare string statement
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))


def mutants(source: str, only: list[str], skip_if: list[str]):
    """Yield ``(node, replacement_text, description)`` for every mutation site."""
    tree = ast.parse(source)

    def walk(node, scope, parent):
        if _skip_subtree(node) or _is_docstring(node, parent):
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = f"{scope}.{node.name}" if scope else node.name
            children = node.body  # decorators, bases and annotations are not mutated
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                children = [c for c in [*node.args.defaults, *node.args.kw_defaults, *node.body] if c is not None]
            for c in children:
                yield from walk(c, scope, node)
            return
        if isinstance(node, (ast.If, ast.While)) and any(s in ast.unparse(node.test) for s in skip_if):
            return
        selected = not only or any(scope == o or scope.startswith(o + ".") for o in only)
        if selected:
            yield from sites(node)
        for field, value in ast.iter_fields(node):
            if field in ("annotation", "returns", "decorator_list", "type_comment"):
                continue
            for c in (value if isinstance(value, list) else [value]):
                if isinstance(c, ast.AST):
                    yield from walk(c, scope, node)

    def sites(node):
        def swap(make, what):
            new = make(copy.deepcopy(node))
            return node, ast.unparse(new), what

        if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
            op = BINOPS[type(node.op)]
            yield swap(lambda n: (setattr(n, "op", op()), n)[1], f"{type(node.op).__name__} -> {op.__name__}")
        elif isinstance(node, ast.AugAssign) and type(node.op) in BINOPS:
            op = BINOPS[type(node.op)]
            yield swap(lambda n: (setattr(n, "op", op()), n)[1], f"{type(node.op).__name__}= -> {op.__name__}=")
        elif isinstance(node, ast.Compare):
            for i, o in enumerate(node.ops):
                if type(o) in CMPOPS:
                    op = CMPOPS[type(o)]

                    def make(n, i=i, op=op):
                        n.ops[i] = op()
                        return n
                    yield swap(make, f"{type(o).__name__} -> {op.__name__}")
        elif isinstance(node, ast.BoolOp):
            op = ast.Or if isinstance(node.op, ast.And) else ast.And
            yield swap(lambda n: (setattr(n, "op", op()), n)[1], f"{type(node.op).__name__} -> {op.__name__}")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            yield node, ast.unparse(node.operand), f"drop {type(node.op).__name__}"
        elif isinstance(node, ast.Constant) and not isinstance(node.value, (str, bytes)) and node.value is not None \
                and node.value is not Ellipsis:
            v = node.value
            new = (not v) if isinstance(v, bool) else v + 1
            yield node, repr(new), f"{v!r} -> {new!r}"
        elif isinstance(node, ast.Name) and node.id in NAMES:
            yield node, NAMES[node.id], f"{node.id} -> {NAMES[node.id]}"
        elif isinstance(node, ast.Attribute) and node.attr in NAMES:
            yield swap(lambda n: (setattr(n, "attr", NAMES[node.attr]), n)[1], f".{node.attr} -> .{NAMES[node.attr]}")
        if isinstance(node, (ast.If, ast.While)):
            test = node.test
            yield test, f"not ({ast.unparse(test)})", "negate condition"
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) or (
                isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
            yield node, "pass", "remove statement"

    yield from walk(tree, "", None)


def apply(source: str, node: ast.AST, text: str) -> str:
    """``source`` with ``node``'s span replaced by ``text`` (offsets are UTF-8 bytes)."""
    lines = source.encode().splitlines(keepends=True)
    start = sum(len(x) for x in lines[:node.lineno - 1]) + node.col_offset
    end = sum(len(x) for x in lines[:node.end_lineno - 1]) + node.end_col_offset
    data = source.encode()
    is_stmt = isinstance(node, ast.stmt)
    rep = text if is_stmt else f"({text})"
    return (data[:start] + rep.encode() + data[end:]).decode()


def run_tests(work: Path, tests: list[str], timeout: float) -> str:
    """``killed`` / ``survived`` / ``timeout`` for one run of pytest in a forked child."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(work)
            sys.path.insert(0, str(work / "src"))
            import pytest
            rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests])
            os._exit(int(rc))
        except BaseException:
            os._exit(99)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return "survived" if code == 0 else "killed"
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help="source file to mutate, relative to the repository root")
    ap.add_argument("tests", nargs="+", help="pytest arguments (files or node ids)")
    ap.add_argument("--only", default="", help="comma-separated functions/classes (qualified names) to mutate")
    ap.add_argument("--skip-if", default="", help="comma-separated texts: if/while blocks whose condition "
                                                  "contains one are not mutated")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per test run (killed when over)")
    ap.add_argument("--work", default="/tmp/flexmerge-mutate", help="private copy of src/ and tests/")
    ap.add_argument("--out", default=None, help="write the survivors as JSON here")
    ap.add_argument("--lines", default="", help="comma-separated line numbers: mutate only these lines")
    ap.add_argument("--list", action="store_true", help="only list the mutants")
    args = ap.parse_args()

    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    ignore = shutil.ignore_patterns("__pycache__", ".hypothesis", "*.pyc")
    for d in ("src", "tests"):
        shutil.copytree(ROOT / d, work / d, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    target = work / args.file
    source = target.read_text()
    only = [x for x in args.only.split(",") if x]
    skip_if = [x for x in args.skip_if.split(",") if x]
    found = list(mutants(source, only, skip_if))
    if args.lines:
        lines = {int(x) for x in args.lines.split(",")}
        found = [m for m in found if m[0].lineno in lines]
    if args.list:
        for node, text, what in found:
            print(f"{args.file}:{node.lineno}: {what}: {text[:80]}")
        print(f"{len(found)} mutants")
        return

    sys.dont_write_bytecode = True  # a mutant must never be read back from a stale .pyc
    import numpy, torch, pytest, hypothesis, safetensors.torch, pydantic, yaml  # noqa: F401,E401  preloaded
    try:
        import scipy.cluster.hierarchy  # noqa: F401
    except ImportError:
        pass
    t0 = time.monotonic()
    base = run_tests(work, args.tests, args.timeout * 3)
    base_s = time.monotonic() - t0
    if base != "survived":
        sys.exit(f"error: the tests fail on the unmutated code ({base}); fix them first")
    timeout = max(args.timeout, 3 * base_s)
    counts = {"killed": 0, "timeout": 0, "survived": 0, "invalid": 0}
    survivors = []
    try:
        for i, (node, text, what) in enumerate(found):
            mutated = apply(source, node, text)
            try:
                compile(mutated, str(target), "exec")
            except SyntaxError:
                counts["invalid"] += 1
                continue
            target.write_text(mutated)
            result = run_tests(work, args.tests, timeout)
            counts[result] += 1
            if result == "survived":
                line = source.splitlines()[node.lineno - 1].strip()
                survivors.append({"line": node.lineno, "change": what, "code": line})
                print(f"SURVIVED {args.file}:{node.lineno}: {what}   | {line[:90]}", flush=True)
    finally:
        target.write_text(source)
    valid = counts["killed"] + counts["timeout"] + counts["survived"]
    killed = counts["killed"] + counts["timeout"]
    print(f"{args.file}: {killed}/{valid} mutants killed ({100 * killed / max(1, valid):.1f}%); "
          f"{counts['timeout']} by timeout, {counts['invalid']} not compilable (skipped); "
          f"baseline test run {base_s:.1f} s, total {time.monotonic() - t0:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"file": args.file, "tests": args.tests, **counts,
                                              "survivors": survivors}, indent=1))


if __name__ == "__main__":
    main()
