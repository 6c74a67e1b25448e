"""The layer contract of ARCHITECTURE.md, checked on the source and in a live process."""

import ast
import importlib.util
import json
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest

PACKAGES = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("module_graph", PACKAGES.parent / "scripts/module_graph.py")
module_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(module_graph)
SOURCES = {
    "jarvis": PACKAGES / "jarvis/src/jarvis",
    "jarvis_prime": PACKAGES / "jarvis-prime/src/jarvis_prime",
    "reactor_core": PACKAGES / "reactor-core/src/reactor_core",
}
HEAVY = {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}


def imports(path: Path, module_level_only: bool = False) -> list[tuple[str, int]]:
    """(top-level module, line) of every import in `path`; optionally only those run at import time."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = list(ast.walk(tree))
    if module_level_only:  # statements outside any function body
        nodes, stack = [], list(tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            nodes.append(node)
            stack.extend(ast.iter_child_nodes(node))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module.split(".")[0], node.lineno))
    return found


def violations(package: str, forbidden: set[str], module_level_only: bool = False, allow: tuple[str, ...] = ()) -> list[str]:
    root = SOURCES[package]
    return [
        f"{path.relative_to(root.parent)}:{line}: imports {name}"
        for path in sorted(root.rglob("*.py"))
        if path.relative_to(root).as_posix() not in allow
        for name, line in imports(path, module_level_only)
        if name in forbidden
    ]


def test_jarvis_never_imports_ml_libraries_or_reactor_core():
    assert violations("jarvis", HEAVY | {"reactor_core"}) == []


def test_jarvis_prime_imports_reactor_core_only_lazily():
    assert violations("jarvis_prime", {"reactor_core", "jarvis"}, module_level_only=True) == []
    lazy = violations("jarvis_prime", {"reactor_core"})
    assert lazy and all(v.startswith("jarvis_prime/recipes/") for v in lazy), lazy


def test_jarvis_prime_loads_torch_only_in_the_transformers_backend():
    # those modules are imported only when the transformers backend is chosen (batching:
    # only by PrimeModel.enable_batching on that backend)
    allow = ("models/transformers_backend.py", "models/batching.py")
    assert violations("jarvis_prime", HEAVY, module_level_only=True, allow=allow) == []


def test_importing_jarvis_prime_loads_no_numerical_library():
    """`import jarvis_prime` (every `prime` and `jarvis` command pays it) loaded numpy through
    the GGUF exporter, imported at module level for file names and a rare export branch."""
    script = ("import sys, jarvis_prime\n"
              "print(sorted(m for m in ('numpy', 'torch', 'transformers', 'gguf', 'llama_cpp', 'jarvis_prime.export')"
              " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_reactor_core_imports_neither_upper_layer():
    assert violations("reactor_core", {"jarvis", "jarvis_prime"}) == []


def test_the_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\ndef f():\n    from torch import nn\n")
    assert imports(bad) == [("os", 1), ("torch", 4)]
    assert imports(bad, module_level_only=True) == [("os", 1)]


@pytest.mark.parametrize("package", sorted(SOURCES))
def test_no_import_cycle_between_modules(package):
    """Function-level imports count: a lazy import that points back up still tangles the layers."""
    graph = module_graph.module_graph(package)
    assert len(graph) > 5 and sum(map(len, graph.values())) > 5  # the graph really was read
    assert module_graph.cycles(graph) == []


@pytest.mark.parametrize("package", sorted(SOURCES))
def test_no_import_cycle_between_folders(package):
    assert module_graph.cycles(module_graph.folder_graph(package)) == []


def test_the_cycle_finder_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "demo"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from demo.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub/__init__.py").write_text("")
    (pkg / "sub/b.py").write_text("from demo import a\n")
    monkeypatch.setitem(module_graph.SOURCES, "demo", pkg)
    graph = module_graph.module_graph("demo")
    assert graph["demo.a"] == {"demo.sub.b": 2}
    assert module_graph.cycles(graph) == [["demo.a", "demo.sub.b"]]
    assert module_graph.cycles(module_graph.folder_graph("demo")) == [["demo.a", "demo.sub"]]


def test_declared_dependencies_follow_the_layers():
    agent = " ".join(requires("jarvis-ai-agent"))
    assert "jarvis-prime" in agent
    assert not any(lib in agent for lib in ("torch", "transformers", "peft", "reactor-core"))
    prime_base = [r for r in requires("jarvis-prime") if "extra ==" not in r]
    assert not any(r.startswith(("torch", "transformers", "reactor-core")) for r in prime_base)
    # the floor itself is checked against the recipes' keys below (test_jarvis_prime_requires_a_reactor_core_...)
    assert any(r.startswith("reactor-core>=") and 'extra == "training"' in r for r in requires("jarvis-prime"))


@pytest.mark.real_model
def test_llamacpp_chat_never_loads_torch(chat_model):
    script = (
        "import sys, json, jarvis, jarvis_prime\n"
        "from jarvis import Chatbot, ChatbotConfig\n"
        "after_import = sorted(m for m in ('torch', 'transformers', 'reactor_core') if m in sys.modules)\n"
        "bot = Chatbot(ChatbotConfig(backend='llamacpp', max_new_tokens=8))\n"
        "bot.ask('Hello')\n"
        "after_chat = sorted(m for m in ('torch', 'transformers', 'reactor_core') if m in sys.modules)\n"
        "print(json.dumps([after_import, after_chat, bot.model.runtime.backend]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], [], "llamacpp"]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def test_jarvis_prime_requires_a_reactor_core_that_knows_every_key_its_recipes_pass():
    """The `training` extra's reactor-core floor must be at least the release that introduced
    the newest TrainingConfig key jarvis-prime passes (reactor_core.training.config.FIELD_SINCE),
    or an old reactor-core rejects the recipe as `unknown key`. Read from source and installed
    metadata: nothing is imported or installed."""
    config_py = SOURCES["reactor_core"] / "training/config.py"
    value = next(node.value for node in ast.parse(config_py.read_text()).body
                 if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "FIELD_SINCE")
    since = eval(compile(ast.Expression(value), str(config_py), "eval"), {"__builtins__": {}, "dict": dict})
    passed: dict[str, str] = {}  # key -> where
    for path in sorted(SOURCES["jarvis_prime"].rglob("*.py")):
        text = path.read_text()
        if "TrainingConfig(" not in text:
            continue
        for node in ast.walk(ast.parse(text)):  # keywords of TrainingConfig(...) and of the dict(...) of its keys
            name = getattr(node, "func", None)
            name = getattr(name, "attr", None) or getattr(name, "id", None)
            if isinstance(node, ast.Call) and name in ("TrainingConfig", "dict"):
                for kw in node.keywords:
                    if kw.arg in since:
                        passed.setdefault(kw.arg, f"{path.relative_to(SOURCES['jarvis_prime'])}:{kw.value.lineno}")
    assert {"kl_to_base", "kl_anchor_path", "output_name"} <= set(passed), "the recipe scan found too little"
    newest = max(passed, key=lambda key: _version(since[key]))
    (floor,) = [r for r in requires("jarvis-prime") if r.startswith("reactor-core") and 'extra == "training"' in r]
    declared = floor.split(">=")[1].split(";")[0].split(",")[0].strip()
    assert _version(declared) >= _version(since[newest]), (
        f"jarvis-prime requires {floor.split(';')[0]}, but passes `{newest}` ({passed[newest]}), "
        f"which reactor-core {since[newest]} introduced")
