"""The layers of docs/architecture.md, checked on the source: who may import whom, no import cycle,
no module over ~300 lines, and the built-in strategies installed only as ``prunebench.strategies``."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# bottom to top: a layer imports only the layers before it (and itself); study and training are
# siblings above evaluation, the CLI sits on top
ORDER = ["contract", "runtime", "plugins", "engine", "models", "evaluation", "study", "training", "cli"]
SIBLINGS = {("study", "training"), ("training", "study")}
MAX_LINES = 330  # "about 300": a module past this is split


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "prunebench").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "strategies").glob("*.py")):
        out["prunebench.strategies" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Our modules ``path`` imports at run time, anywhere in it (functions included; not under
    ``if TYPE_CHECKING``): ``from a import b`` counts as ``a.b`` when that is a module, else ``a``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", "")) == "TYPE_CHECKING"
                   for n in ast.walk(block)}  # annotations only: never imported at run time
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] == "prunebench"}
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ORDER) else "(package)"


GRAPH = {m: imports_of(p, set(modules())) for m, p in modules().items()}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer(m) in ORDER))
def test_a_layer_imports_only_the_layers_below_it(module):
    mine = layer(module)
    for target in GRAPH[module]:
        theirs = layer(target)
        if theirs == "(package)" or theirs == mine:
            assert theirs != "(package)" or target in ("prunebench",), f"{module} imports {target}"
            continue
        assert theirs in ORDER, f"{module} imports {target}"
        below = ORDER.index(theirs) < ORDER.index(mine) and (mine, theirs) not in SIBLINGS
        assert below, f"{module} ({mine}) imports {target} ({theirs}): a layer above it"


def test_strategies_use_only_the_public_contract():
    allowed = ("prunebench", "prunebench.selection", "prunebench.contract", "prunebench.strategies")
    for module in (m for m in GRAPH if m.startswith("prunebench.strategies")):
        for target in GRAPH[module]:
            assert target == "prunebench" or target.startswith(allowed[1:]), f"{module} imports {target}"


def test_no_import_cycle():
    seen, stack = set(), []

    def visit(module):
        if module in stack:
            cycle = stack[stack.index(module):] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in seen or module not in GRAPH:
            return
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if target != "prunebench":  # the package's public names: re-exports of the contract
                visit(target)
        stack.pop()
        seen.add(module)

    for module in sorted(GRAPH):
        visit(module)


def test_no_module_is_much_over_300_lines():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_the_built_in_strategies_install_only_as_prunebench_strategies(tmp_path):
    # outside the checkout (the checkout's own folder would be importable from its root)
    code = ("import importlib.util, prunebench.strategies.fastv as f; "
            "assert importlib.util.find_spec('strategies') is None, 'a top-level strategies is installed'; "
            "print(f.FastV.name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "fastv", out.stderr
