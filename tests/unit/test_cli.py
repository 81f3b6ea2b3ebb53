"""The CLI's one table of subcommands: the server never loads edgeserve.tools, every subcommand has --help."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from edgeserve.cli import COMMANDS, build_parser, main

# what each subcommand's --help must show: its own arguments, added from the table when it is used
HELP_SHOWS = {
    "serve": "--max-queue",
    "calibrate": "--quick",
    "models": "prepare",
    "simulate": "--profile",
    "eval": "gsm8k",
    "bench-routing": "--study-policy",
    "bench": "--noise-cores",
    "loadtest": "--scenario",
}
NESTED = [("models", "prepare", "--quants"), ("eval", "gsm8k", "--sweep-budgets")]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_the_parser_and_the_serve_path_load_no_tool() -> None:
    done = run_python("""
        import ast, importlib, sys
        import edgeserve.cli as cli

        def tools():
            return sorted(m for m in sys.modules if m == "edgeserve.tools" or m.startswith("edgeserve.tools."))

        parser = cli.build_parser()
        parser.format_help()
        args = parser.parse_args(["serve", "--port", "0"])
        assert args.command == "serve" and args.port == 0, args
        # every module cli.py imports, at the top or inside a function (_serve: the settings and the
        # composition root, which imports the whole server)
        tree = ast.parse(open(cli.__file__).read())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        serve_path = sorted(m for m in imported if m.startswith("edgeserve"))
        assert "edgeserve.server" in serve_path and "edgeserve.settings" in serve_path, serve_path
        for module in serve_path:
            importlib.import_module(module)
        assert tools() == [], tools()
        # a tool is imported when its subcommand is parsed, and only that tool
        parser.parse_args(["simulate", "--policy", "p.toml", "--profile", "c.json"])
        assert "edgeserve.tools.simulate" in tools() and "edgeserve.tools.bench" not in tools(), tools()
        print("ok")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_no_server_module_imports_a_tool() -> None:
    done = run_python("""
        import importlib, pathlib, sys
        import edgeserve

        root = pathlib.Path(edgeserve.__file__).parent
        names = sorted(".".join(("edgeserve", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
                       for p in root.rglob("*.py") if p.relative_to(root).parts[0] != "tools")
        assert "edgeserve.http.app" in names and "edgeserve.runtime.stepper" in names, names
        for name in names:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if (m + ".").startswith("edgeserve.tools."))
        assert loaded == [], loaded
        print("ok")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_table_keeps_every_subcommand() -> None:
    assert [c.name for c in COMMANDS] == list(HELP_SHOWS)
    assert all(c.help for c in COMMANDS)
    usage = build_parser().format_help()
    for command in COMMANDS:
        assert command.name in usage


@pytest.mark.parametrize("name", [c.name for c in COMMANDS])
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([name, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: edgeserve {name} ")
    assert HELP_SHOWS[name] in out


@pytest.mark.parametrize(("name", "sub", "flag"), NESTED)
def test_nested_subcommands_have_help(name: str, sub: str, flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([name, sub, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: edgeserve {name} {sub} ")
    assert flag in out


def test_a_missing_argument_of_a_tool_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["simulate", "--policy", "p.toml"])
    assert exited.value.code == 2
    assert "--profile" in capsys.readouterr().err
