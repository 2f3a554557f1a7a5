"""The docs and the code agree: every flag of every command and every config key is documented
once, in one table row with its default, and nothing documented is missing from the code. The
README stays a front page whose links resolve."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing

import pytest
import yaml
from conftest import ROOT

DOCS = ROOT / "docs"
UNSET = object()


def table_rows(header: str) -> list[tuple[str, str, str, str]]:
    """(page, heading or lead-in line, first cell, default cell) of every row of every docs table
    whose header is `header`."""
    rows = []
    for page in sorted(DOCS.glob("*.md")):
        context, in_table, in_code = "", False, False
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                in_code = not in_code
            if in_code:
                continue
            if line.startswith("|") and in_table:
                if not line.startswith("|---"):
                    cells = [c.strip() for c in line.strip("|").split("|")]
                    rows.append((page.name, context, cells[0], cells[1]))
                continue
            in_table = line.strip() == header
            if line.startswith("#") or line.endswith(":"):  # a heading or a lead-in line
                context = line
    return rows


def default_in_docs(cell: str):
    """The default a table cell states: its first `code` span read as YAML, or UNSET."""
    found = re.search(r"`([^`]+)`", cell)
    return yaml.safe_load(found.group(1)) if found else UNSET


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from clfsys.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_flag_of_every_command_is_documented_once_with_its_default():
    documented: dict[str, dict[str, str]] = {}
    for page, context, first, default in table_rows("| flag | default | meaning |"):
        command = re.search(r"clfsys ([a-z-]+)", context)
        assert command, f"docs/{page}: a flag table must follow a line naming `clfsys <command>`"
        flags = documented.setdefault(command.group(1), {})
        flag = first.strip("`")
        assert flag not in flags, f"{flag} of clfsys {command.group(1)} documented twice"
        flags[flag] = default
    commands = subcommands()
    assert set(documented) == set(commands)
    for name, parser in commands.items():
        actions = {a.option_strings[0]: a for a in parser._actions
                   if a.option_strings and a.option_strings[0] != "-h"}
        assert set(documented[name]) == set(actions), (name, sorted(actions))
        for flag, action in actions.items():
            cell = documented[name][flag]
            if action.required:
                assert cell == "required", (name, flag, cell)
            elif action.default is None or action.default is False or action.default == []:
                assert default_in_docs(cell) is UNSET, (name, flag, cell)
            else:
                assert default_in_docs(cell) == action.default, (name, flag, cell, action.default)


def config_fields(cls, prefix: str = "") -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found.update(config_fields(hints[f.name], f"{prefix}{f.name}."))
            continue
        # Declared like every option, so the help travels with the field.
        assert f.metadata.get("help"), f"{prefix}{f.name}: declare it with option(default, help)"
        if f.default is not dataclasses.MISSING:
            found[prefix + f.name] = f.default
        else:
            found[prefix + f.name] = f.default_factory()
    return found


def test_every_config_key_is_documented_once_with_its_default():
    from clfsys.config import Config

    documented: dict[str, str] = {}
    for page, _, first, default in table_rows("| key | default | meaning |"):
        (key,) = re.findall(r"`([a-z_.]+)`", first)
        assert key not in documented, f"{key} documented twice (docs/{page})"
        documented[key] = default
    fields = config_fields(Config)
    assert set(documented) == set(fields)
    for key, default in fields.items():
        stated = default_in_docs(documented[key])
        if default is None:  # "unset", "per arch", or a rule ("backbones: `30`"), not a value
            assert not documented[key].startswith("`"), (key, documented[key])
        else:
            assert stated == default, (key, documented[key], default)


def test_the_readme_is_a_front_page_and_every_docs_link_resolves():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert readme.index("make demo") < readme.index("make test") < readme.index("## ")
    pages = {"README.md": readme, **{f"docs/{p.name}": p.read_text() for p in DOCS.glob("*.md")}}
    for name, text in pages.items():
        base = (ROOT / name).parent
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", text):
            assert (base / target).is_file(), f"{name} links to {target}, which is not there"
    for page in DOCS.glob("*.md"):  # every page is reachable from the front page
        assert f"(docs/{page.name}" in readme, page.name


@pytest.mark.parametrize("name", ["tune", "label", "serve"])
def test_help_and_docs_name_the_same_flags(name, capsys):
    """`clfsys <command> --help` lists exactly the flags of the command's docs table."""
    from clfsys.cli import main

    with pytest.raises(SystemExit):
        main([name, "--help"])
    listed = {f for f in re.findall(r"(--[a-z][a-z-]+)", capsys.readouterr().out)
              if f != "--help" and not f.startswith("--no-")}  # --no-X: the off switch of --X
    documented = {first.strip("`") for _, context, first, _ in
                  table_rows("| flag | default | meaning |") if f"clfsys {name}" in context}
    assert listed == documented


def test_the_readme_places_every_module():
    """Each module of clfsys/ is in the README's "Where the code is" table, and every module
    that table names exists."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("Where the code is"):]
    end = table.find("\n\n", table.index("| concern |"))
    table = table if end < 0 else table[:end]
    named = set(re.findall(r"`(\w+\.py)`", table))
    modules = {p.name for p in (ROOT / "clfsys").glob("*.py")} - {"__init__.py", "__main__.py"}
    assert modules - named == set(), "modules missing from the README's table"
    assert named - modules == set(), "the README's table names modules that do not exist"
    http = {p.stem for p in (ROOT / "clfsys" / "http").glob("*.py")} - {"__init__"}
    assert http <= set(re.findall(r"`(\w+)`", table)), "http/ modules missing from the table"
