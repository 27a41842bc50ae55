"""Issue 14, entry 25: the API reference renders the public surface, and only it, from
Google-style docstrings, with a header link that goes somewhere real."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import gpuctx

ROOT = Path(__file__).resolve().parent.parent
API_MD = (ROOT / "docs" / "api.md").read_text()
MKDOCS = (ROOT / "mkdocs.yml").read_text()
PUBLIC = set(gpuctx.__all__) - {"__version__"}
ROLE = re.compile(r":(class|func|meth|attr|data|exc|mod):`")


def _rendered() -> set[str]:
    """The names api.md renders: one ``::: gpuctx.NAME`` (or ``::: gpuctx.api.NAME``) block each."""
    names: set[str] = set()
    for block in re.split(r"^(?=::: )", API_MD, flags=re.M)[1:]:
        ident = block.split()[1]
        assert ident != "gpuctx", "a bare ::: gpuctx block renders the package docstring again"
        assert re.fullmatch(r"gpuctx\.(api\.)?\w+", ident), f"::: {ident} renders an internal module"
        name = ident.rsplit(".", 1)[1]
        assert name in PUBLIC, f"::: {ident} is not in gpuctx.__all__"
        names.add(name)
    return names


def test_the_reference_renders_exactly_the_public_surface():
    assert _rendered() == PUBLIC


def test_no_internal_module_is_rendered():
    for module in ("scheduler", "status", "errors", "policy", "trace", "task", "models", "units"):
        assert f"::: gpuctx.{module}\n" not in API_MD


def test_mkdocs_reads_google_docstrings_and_links_nowhere_invalid():
    assert "example.invalid" not in MKDOCS
    assert re.search(r"docstring_style:\s*google", MKDOCS)
    assert re.search(r"docstring_section_style:\s*table", MKDOCS)


@pytest.mark.parametrize("name", ["KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"])
def test_the_size_constants_are_documented(name):
    import ast

    tree = ast.parse((ROOT / "gpuctx" / "units.py").read_text())
    body = tree.body
    for i, node in enumerate(body[:-1]):
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
            nxt = body[i + 1]
            assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), name
            return
    pytest.fail(f"{name} is not assigned on its own line with a docstring")


def test_size_functions_have_google_sections_and_no_roles():
    for fn in (gpuctx.parse_size, gpuctx.format_size):
        doc = inspect.getdoc(fn)
        assert "Args:" in doc and "Returns:" in doc and not ROLE.search(doc), fn.__name__


def _public_docs():
    for name in sorted(PUBLIC):
        obj = getattr(gpuctx, name)
        if callable(obj):
            yield name, inspect.getdoc(obj) or ""


def test_no_public_docstring_shows_a_raw_role():
    bad = [name for name, doc in _public_docs() if ROLE.search(doc)]
    assert not bad, bad


def test_every_public_function_with_parameters_has_an_args_section():
    bad = []
    for name, doc in _public_docs():
        obj = getattr(gpuctx, name)
        if inspect.isclass(obj):
            continue
        params = [p for p in inspect.signature(obj).parameters if p not in ("self",)]
        if params and "Args:" not in doc:
            bad.append(name)
    assert not bad, bad
