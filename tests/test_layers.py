"""The layers of docs/architecture.md hold: a vare_core module imports only from its own layer and
the layers below it (imports inside functions too), nothing in vare_core imports ComfyUI or the
nodes, and there is no import cycle. The family registry (vare_core/families.py) names the
higher modules it loads by string only, so it is no import here."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# bottom to top, as docs/architecture.md draws them
LAYERS = (
    r"vare_core(\.(checks|paths|devices|checkpoints|families))?",
    r"vare_core\.models(\..+)?",
    r"vare_core\.embedded(\.(world|spec))?",
    r"vare_core\.generation(\..+)?",
    r"vare_core\.erasure(\..+)?",
    r"vare_core\.evaluation(\.judges(\..+)?)?",
    r"vare_core\.(embedded\.(loader|profile)|testing)",
    r"vare_core\.(evaluation\.(prompt_eval|run_folder|shapes_world(\..+)?)|embedded\.training(\..+)?)",
    r"vare_core\.(demo|cli(\..+)?|__main__)",
)


def layer(module: str) -> int:
    found = [i for i, pattern in enumerate(LAYERS) if re.fullmatch(pattern, module)]
    assert len(found) == 1, f"{module} is in {len(found)} layers; place it in exactly one"
    return found[0]


def modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "vare_core").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(module: str, path: Path, known) -> set[str]:
    """Every vare_core module `module` imports (anywhere in the file), and foreign top names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            out |= {f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names}
    return out


def test_every_import_goes_down_the_layers_and_none_reaches_comfyui():
    known = modules()
    wrong = []
    for module, path in known.items():
        for target in imports(module, path, known):
            top = target.split(".")[0]
            if top in ("comfy", "comfy_api", "folder_paths", "server", "nodes"):
                wrong.append(f"{module} imports {target}")
            elif top == "vare_core" and target in known and not module.startswith(target + "."):
                if layer(target) > layer(module):
                    wrong.append(f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})")
    assert wrong == []


def test_no_import_cycle():
    known = modules()
    graph = {m: {t for t in imports(m, p, known) if t in known and not m.startswith(t + ".")}
             for m, p in known.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
