"""What `pip install .` ships: every package of the source tree, and the files they read at run time
(an editable install in CI would hide a package missing from the list)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_and_its_data_is_in_the_distribution() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("policy", "proxy")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert set(config["packages"]) == found
    data = config["package-data"]["proxy"]
    assert "static/*" in data and "builtin_policy.yaml" in data
    assert {p.name for p in (ROOT / "proxy" / "static").iterdir()} == {
        "console.html",
        "console.js",
        "console.css",
    }
