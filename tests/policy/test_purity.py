"""The policy core stays pure: no I/O, clock, randomness or environment, checked on its source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

POLICY = Path(__file__).parents[2] / "policy"
MODULES = sorted(POLICY.glob("*.py"))

# Modules the core may import; a submodule of one (collections.abc, ruamel.yaml.error) is allowed too.
ALLOWED = frozenset(
    {
        "__future__",
        "base64",
        "binascii",
        "collections",
        "dataclasses",
        "enum",
        "fnmatch",  # glob matching of MCP tool names (fnmatchcase: no file system)
        "functools",
        "hashlib",
        "heapq",
        "hmac",
        "ipaddress",
        "itertools",
        "json",
        "math",
        "re",
        "string",
        "types",  # MappingProxyType: a read-only view, nothing more
        "typing",
        "unicodedata",
        "urllib.parse",
        # third party, each pure: JWT signing, CEL evaluation, YAML parsing of text already read
        "jwt",
        "cel",
        "cryptography",  # Ed25519 signatures (EdDSA warrants): bytes in, bytes out
        "ruamel.yaml",
        "yaml",  # libyaml's composer (policy/yaml_lines.py): text in, nodes out
        "policy",
    }
)

# Named explicitly so that widening ALLOWED by accident (say to all of `urllib`) still fails here.
FORBIDDEN = frozenset(
    {
        "asyncio",
        "datetime",
        "io",
        "os",
        "pathlib",
        "random",
        "secrets",
        "socket",
        "subprocess",
        "sys",
        "threading",
        "time",
        "urllib.request",
        "uuid",
    }
)
# Builtins that read files or the terminal, or run code the scan cannot see.
FORBIDDEN_CALLS = frozenset({"open", "exec", "eval", "compile", "__import__", "input", "breakpoint"})


def _covered(name: str, modules: frozenset[str]) -> bool:
    return any(name == module or name.startswith(module + ".") for module in modules)


def _judge(line: int, named: str, submodule: str | None) -> str | None:
    # `from urllib import request` names urllib but imports urllib.request: both are judged.
    candidates = [named] if submodule is None else [named, submodule]
    bad = next((name for name in candidates if _covered(name, FORBIDDEN)), None)
    if bad is not None:
        return f"line {line}: imports {bad}"
    if not any(_covered(name, ALLOWED) for name in candidates):
        return f"line {line}: imports {named}, which is not on the allow-list"
    return None


def impurities(source: str) -> list[str]:
    """Each import outside the allow-list and each call of a builtin that does I/O or runs code."""
    problems: list[str | None] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            problems += [_judge(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:  # relative: inside policy/
            module = node.module or ""
            problems += [_judge(node.lineno, module, f"{module}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS
        ):
            problems.append(f"line {node.lineno}: calls {node.func.id}()")
    return [problem for problem in problems if problem is not None]


def test_every_policy_module_is_scanned() -> None:
    names = {path.stem for path in MODULES}
    assert {"engine", "classify", "rules", "warrants", "normalize", "addresses", "model"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_policy_module_imports_only_pure_modules(path: Path) -> None:
    assert impurities(path.read_text()) == []


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        pytest.param("import os", "line 1: imports os", id="os"),
        pytest.param("import os.path", "line 1: imports os.path", id="os-path"),
        pytest.param("from time import monotonic", "line 1: imports time", id="from-time"),
        pytest.param("import socket as s", "line 1: imports socket", id="aliased"),
        pytest.param("from urllib import request", "line 1: imports urllib.request", id="urllib-request"),
        pytest.param("import urllib.request", "line 1: imports urllib.request", id="urllib-request-dotted"),
        pytest.param("from datetime import datetime", "line 1: imports datetime", id="datetime"),
        pytest.param("import random", "line 1: imports random", id="random"),
        pytest.param("import secrets", "line 1: imports secrets", id="secrets"),
        pytest.param("import uuid", "line 1: imports uuid", id="uuid"),
        pytest.param("import asyncio", "line 1: imports asyncio", id="asyncio"),
        pytest.param("from pathlib import Path", "line 1: imports pathlib", id="pathlib"),
        pytest.param("import subprocess", "line 1: imports subprocess", id="subprocess"),
        pytest.param("import threading", "line 1: imports threading", id="threading"),
        pytest.param("import io", "line 1: imports io", id="io"),
        pytest.param("import sys", "line 1: imports sys", id="sys"),
        pytest.param(
            "import requests", "line 1: imports requests, which is not on the allow-list", id="unknown"
        ),
        pytest.param("def f():\n    import os\n", "line 2: imports os", id="nested-import"),
        pytest.param("data = open('x').read()", "line 1: calls open()", id="open-call"),
        pytest.param("eval('1')", "line 1: calls eval()", id="eval"),
        pytest.param("__import__('os')", "line 1: calls __import__()", id="dunder-import"),
    ],
)
def test_scanner_catches_impurity(source: str, problem: str) -> None:
    assert problem in impurities(source)


@pytest.mark.parametrize(
    "source",
    [
        "from collections.abc import Mapping",
        "from ruamel.yaml.comments import CommentedMap",
        "from urllib.parse import parse_qsl",
        "from policy.model import Tier",
        "from . import model",
        "import cel\nprogram = cel.compile('1 == 1')",
        "from typing import Any",
    ],
)
def test_scanner_allows_pure_modules(source: str) -> None:
    assert impurities(source) == []
