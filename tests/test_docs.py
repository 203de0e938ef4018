"""The docs keep up with the code, and every package reaches the wheel."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from tokenmill import hookspecs
from tokenmill.spec import TOP_KEYS, CompileSpec, LimitsSpec

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hook_names() -> list[str]:
    return sorted(name for name in dir(hookspecs)
                  if getattr(getattr(hookspecs, name), "tokenmill_spec", None) is not None)


def test_every_hook_has_a_section_in_hooks_md():
    names = _hook_names()
    assert names, "no hookspecs found in tokenmill.hookspecs"
    headings = set(re.findall(r"^## (\S+)\s*$", (DOCS / "hooks.md").read_text(encoding="utf-8"), re.M))
    missing = [n for n in names if n not in headings]
    assert not missing, f"docs/hooks.md has no '## <hook>' section for: {', '.join(missing)}"


@pytest.mark.parametrize("key", sorted(set(TOP_KEYS) | {f.name for f in dataclasses.fields(CompileSpec)}
                                       | {f.name for f in dataclasses.fields(LimitsSpec)}))
def test_pipeline_key_is_documented(key):
    text = (DOCS / "pipelines.md").read_text(encoding="utf-8")
    assert f"`{key}`" in text, f"docs/pipelines.md does not mention the pipeline key `{key}`"


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = config["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"tokenmill": "framework", "tokenmill.plugins": "plugins"}
    listed = set(setuptools["packages"])
    found = set()
    for folder, prefix in (("framework", "tokenmill"), ("plugins", "tokenmill.plugins")):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((prefix, *rel)))
    assert {"tokenmill", "tokenmill.plugins"} <= found
    missing = sorted(found - listed)
    assert not missing, f"packages missing from [tool.setuptools] packages in pyproject.toml: {missing}"
