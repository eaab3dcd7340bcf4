"""The package's layers, read from its source: imports go down (spec <- core <- runtime <- train <- service <-
front ends), never up and never in a circle, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import fluxlab

ROOT = Path(fluxlab.__file__).parent
ORDER = ["errors", "files", "spec", "demo-vocabulary", "core", "runtime", "caption", "train", "service", "client",
         "batch", "serve", "web", "cli", "demo"]
# The demo's vocabulary and its reader are plain code over the standard library and numpy, below everything that
# uses them: the demo captioner (caption/) reads images with them. The rest of demo/ (building and training the
# demo model, the LoRA proof) is a front end.
VOCABULARY = {"fluxlab.demo.data", "fluxlab.demo.evaluate"}
TORCH_LIKE = {"torch", "diffusers", "transformers", "peft", "accelerate", "torchao", "safetensors", "numpy"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, top-level or inside functions, with relative imports made absolute."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            for a in node.names:  # `from . import x` imports the submodule x
                found.add(f"{mod}.{a.name}")
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        edges[name] = {m for m in imports(path) if m in modules and m != name}
    return edges


def layer(module: str) -> str:
    if module in VOCABULARY:
        return "demo-vocabulary"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fluxlab"


def test_no_import_cycles():
    edges = graph()
    # A package's __init__ importing its own submodules is not a cycle of layers; drop those edges.
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(d):], d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_imports_only_go_down():
    rank = {name: i for i, name in enumerate(ORDER)}
    bad = []
    for m, deps in graph().items():
        lm = layer(m)
        if lm not in rank:
            continue
        for d in deps:
            ld = layer(d)
            if ld in rank and rank[ld] > rank[lm]:
                bad.append(f"{m} imports {d}")
    assert not bad, bad


def test_spec_and_core_never_import_service_or_cli_and_spec_is_torch_free():
    for m, path in ((module_name(p), p) for p in ROOT.rglob("*.py")):
        if layer(m) not in ("spec", "core"):
            continue
        deps = imports(path)
        assert not any(layer(d) in ("service", "cli") for d in deps if d.startswith("fluxlab")), m
        if layer(m) == "spec":
            assert not {d.split(".")[0] for d in deps} & TORCH_LIKE - {"numpy"}, m


def test_server_and_page_functions_are_short():
    """serve/ and web/ are routers of small handlers: no function over 120 lines, and create_app only assembles
    (under 60)."""
    long = []
    for path in [*(ROOT / "serve").rglob("*.py"), *(ROOT / "web").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                limit = 60 if node.name == "create_app" else 120
                if size > limit:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({size} lines)")
    assert not long, long
