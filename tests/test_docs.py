"""The docs and the code's messages name only commands and flags that exist.

Every ``prunebench ...`` command in README.md, docs/*.md and benchmarks/README.md (fenced shell
blocks and inline code), every bare inline ``--flag``, and every ``--flag`` in a string literal of
prunebench/ (error and help messages; docstrings excluded) is checked against the CLI parser
(``prunebench.cli.main.build_parser()``, study subcommands included). A flag is checked against its own
subcommand where the text names one (``prunebench run --suite ...``), otherwise against every
subcommand. ``python benchmarks/*.py`` and ``python docs/figures/*.py`` commands are checked against
the options those scripts' own argparse parsers declare.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from prunebench.cli.main import build_parser

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FLAG = re.compile(r"^(--[A-Za-z][\w-]*|-[A-Za-z])$")
LONG_FLAG_IN_TEXT = re.compile(r"(?<![\w-])(--[A-Za-z][\w]*(?:-[\w]+)*)(?![\w>-])")
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "text"}


# --------------------------------------------------------------------------- the parser
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_commands() -> dict[str, set[str]]:
    """'run' -> its option strings; 'study run' -> the study action's; 'study' -> its own."""
    out: dict[str, set[str]] = {}
    for name, parser in _subparsers(build_parser()).items():
        out[name] = {o for a in parser._actions for o in a.option_strings}
        for action, sub in _subparsers(parser).items():
            out[f"{name} {action}"] = {o for a in sub._actions for o in a.option_strings}
    return out


def script_options(path: Path) -> set[str]:
    """Options a script's argparse parser declares (read from its source, not run)."""
    options = {"-h", "--help"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            options |= {a.value for a in node.args if isinstance(a, ast.Constant) and
                        isinstance(a.value, str) and a.value.startswith("-")}
    return options


COMMANDS = cli_commands()
SCRIPTS = {str(p.relative_to(ROOT)): script_options(p)
           for p in [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("docs/figures/*.py")]}
ANY_FLAG = set().union(*COMMANDS.values(), *SCRIPTS.values())


# --------------------------------------------------------------------------- reading commands
def _tokens(text: str) -> list[str]:
    return [t.strip("'\"") for t in text.split()]


def _flag(token: str) -> list[str]:
    """The flags a token names: '[--tasks' -> ['--tasks'], '--set=k=v' -> ['--set'], '--a|--b'."""
    token = token.strip("[](){},;.:'\"").split("=", 1)[0]
    return [t for t in token.split("|") if FLAG.match(t)]


def check_command(tokens: list[str], where: str) -> list[str]:
    """Problems with one command line that starts at 'prunebench' or 'python <script>'."""
    problems = []
    if tokens[0] in ("python", "python3"):
        script = tokens[1] if len(tokens) > 1 else ""
        if script not in SCRIPTS:
            return []  # python -m pytest, python3 -m venv, ...
        known, name = SCRIPTS[script], script
        rest = tokens[2:]
    else:
        if len(tokens) < 2:
            return []  # the word alone, e.g. "`prunebench` entry-point group"
        names = tokens[1].strip("'\"),.:;").split("|")
        if any(n not in COMMANDS for n in names):
            return [f"{where}: unknown command 'prunebench {tokens[1]}'"]
        rest = tokens[2:]
        if _subparsers_of(names[0]) and rest and not rest[0].startswith("-"):
            actions = rest[0].strip("'\"),.:;").split("|")
            if all(re.fullmatch(r"[a-z][a-z-]*", a) for a in actions):
                missing = [a for a in actions if any(f"{n} {a}" not in COMMANDS for n in names)]
                if missing:
                    return [f"{where}: unknown command 'prunebench {names[0]} {missing[0]}'"]
                names = [f"{n} {a}" for n in names for a in actions]
                rest = rest[1:]
        known = set().union(*(COMMANDS[n] for n in names))
        name = "prunebench " + " | ".join(names)
    for token in rest:
        for flag in _flag(token):
            if flag not in known:
                problems.append(f"{where}: '{name}' has no option {flag}")
    return problems


def _subparsers_of(command: str) -> bool:
    return any(c.startswith(command + " ") for c in COMMANDS)


def _segments(line: str) -> list[list[str]]:
    """A shell line split at &&, ; and spaced pipes, each as tokens from the program on ($ prompts
    and VAR=value prefixes dropped)."""
    out = []
    for part in re.split(r"&&|;|\s\|\s", line):
        tokens = _tokens(part)
        while tokens and (tokens[0] == "$" or re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0])):
            tokens = tokens[1:]
        if tokens:
            out.append(tokens)
    return out


def doc_snippets(text: str) -> list[tuple[str, str]]:
    """(kind, text) for every shell command line in fenced blocks ('block', continuations joined,
    comments dropped) and every inline code span outside them ('inline')."""
    snippets, prose, fence, pending = [], [], None, ""
    for line in text.splitlines():
        marker = re.match(r"^\s*(```|~~~)\s*([\w+-]*)", line)
        if marker and fence is None:
            fence = marker.group(2).lower()
            continue
        if marker and fence is not None:
            fence, pending = None, ""
            continue
        if fence is None:
            prose.append(line)
        elif fence in SHELL_FENCES:
            line = re.sub(r"(^|\s)#.*$", "", line)
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            snippets.append(("block", pending + line))
            pending = ""
    for span in re.findall(r"`([^`]+)`", "\n".join(prose)):
        snippets.append(("inline", span.replace("\\|", "|").replace("\n", " ")))
    return snippets


def doc_problems(text: str, name: str) -> list[str]:
    problems = []
    for kind, snippet in doc_snippets(text):
        where = f"{name}: `{snippet.strip()[:80]}`"
        segments = _segments(snippet)
        if kind == "inline" and segments and segments[0][0].startswith("-"):
            # a bare flag in prose ("`--render-quality fast --fast-reset` are ..."): any subcommand
            for token in segments[0]:
                problems += [f"{where}: no command or script has option {f}"
                             for f in _flag(token) if f.startswith("--") and f not in ANY_FLAG]
            continue
        for tokens in segments:
            if tokens[0] in ("prunebench", "python", "python3"):
                problems += check_command(tokens, where)
    return problems


def code_problems(source: str, name: str) -> list[str]:
    """Flags named in string literals (messages, help texts) of one module; docstrings skipped."""
    tree = ast.parse(source)
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    problems = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docstrings:
            continue
        text = node.value.replace("\\\n", " ")
        where = f"{name}:{node.lineno}"
        in_commands = set()
        for line in text.splitlines():
            for match in re.finditer(r"(?<![\w/.-])prunebench\s+\S", line):
                tokens = _segments(line[match.start():])[0]  # up to the next && or ;
                # "prunebench run ..." is a command; "a prunebench stream file" is prose
                if len(tokens) > 1 and tokens[1].strip("'\"),.:;") in COMMANDS or any(_flag(t) for t in tokens):
                    problems += check_command(tokens, f"{where}: {line.strip()[:80]!r}")
                    in_commands |= {f for t in tokens for f in _flag(t)}
        for flag in LONG_FLAG_IN_TEXT.findall(text):
            if flag not in in_commands and flag not in ANY_FLAG:
                problems.append(f"{where}: {text.strip()[:80]!r} names {flag}, which no command has")
    return problems


# --------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_existing_commands_and_flags(path):
    assert doc_problems(path.read_text(), str(path.relative_to(ROOT))) == []


def test_code_messages_name_existing_flags():
    problems = []
    for path in sorted((ROOT / "prunebench").rglob("*.py")):
        problems += code_problems(path.read_text(), str(path.relative_to(ROOT)))
    assert problems == []


def test_the_checker_catches_made_up_commands_and_flags():
    doc = (
        "Run it:\n\n```bash\nprunebench run --suite libero_object --strategy none \\\n"
        "    --episodes 2 --frobnicate 3  # a comment --not-checked\n"
        "prunebench study run studies/x.yaml && prunebench plot studies/x.yaml --stream s.npz\n"
        "python benchmarks/engine.py --rounds 3 --no-such-option\n```\n\n"
        "Then `prunebench compare --keep-ratio 0.5 --episodes 2`, `prunebench study frob DEF`,\n"
        "`prunebench replay DIR --record-streams DIR` (a run flag, not a replay one),\n"
        "`--fast-reset` and `--made-up-flag`, `prunebench unknown`.\n")
    problems = doc_problems(doc, "probe.md")
    text = "\n".join(problems)
    assert "has no option --frobnicate" in text
    assert "--no-such-option" in text
    assert "unknown command 'prunebench study frob'" in text
    assert "'prunebench replay' has no option --record-streams" in text
    assert "--made-up-flag" in text
    assert "unknown command 'prunebench unknown'" in text
    assert "--not-checked" not in text and "--stream" not in text and "--keep-ratio" not in text
    assert len(problems) == 6, text

    code = code_problems(
        '"""A docstring may say --anything."""\n'
        'def f():\n'
        '    raise ValueError("mode replay needs streams (record them with prunebench run --record-dir)")\n'
        'def g(path):\n'
        '    return f"{path} exists; choose another --output or pass --overwrite --overwrit"\n'
        'NOTE = "not a prunebench stream file"\n', "probe.py")
    assert len(code) == 2 and "'prunebench run' has no option --record-dir" in code[0], code
    assert "names --overwrit, which no command has" in code[1], code


def test_example_study_writes_under_ignored_results():
    """The example study's storage, trial results and plots go to results/, not into docs/."""
    from prunebench.study.definition import load_study_definition

    defn = load_study_definition(ROOT / "studies" / "object_pareto.yaml")
    assert defn.results_path.parts[0] == "results"
    assert defn.storage_url.startswith("sqlite:///results/")
    assert "/results/" in (ROOT / ".gitignore").read_text()
    assert not list((ROOT / "docs").rglob("*.db"))
