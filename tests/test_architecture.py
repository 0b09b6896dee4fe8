"""The layers of docs/architecture.md hold: every import of the package (module-level or inside
a function) points down the layers or within one, no module imports itself back through others,
and the methods load no evaluation code (torchmetrics, torch-fidelity) of their own."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import diffusion_apps

PACKAGE = Path(diffusion_apps.__file__).parent
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def module_of(path: Path) -> tuple[str, bool]:
    """(dotted module name, whether it is a package's ``__init__``) of a file of the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def internal_imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of the package that ``path`` imports, anywhere in it: ``from a.b import c``
    counts as a.b, or as a.b.c when c is a module."""
    name, is_package = module_of(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            origin = node.module or ""
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            # ``from pkg import module`` imports the module; other names come from ``origin``
            # (parent packages are left out: Python initialises them for every import).
            submodules = {f"{origin}.{alias.name}" for alias in node.names} & modules
            named = [a.name for a in node.names if f"{origin}.{a.name}" not in modules]
            targets = [*submodules, *([origin] if named else [])]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_of(p)[0] for p in paths}
    return {module_of(p)[0]: internal_imports(p, modules) for p in paths}


def documented_layers() -> dict[str, int]:
    """{top-level module or subpackage: layer} from the fenced block under "## Layers" of
    docs/architecture.md, whose lines read ``<layer number>  <name> <name> …``."""
    text = ARCHITECTURE.read_text().split("## Layers", 1)[1]
    block = re.search(r"```[^\n]*\n(.*?)```", text, re.S).group(1)
    layers = {}
    for line in block.splitlines():
        fields = line.split("#")[0].split()  # a line may be a comment alone
        if not fields:
            continue
        number, *names = fields
        layers |= {name.strip("/").removesuffix(".py"): int(number) for name in names}
    return layers


def layer_name(module: str) -> str:
    """The top-level part of the package a module belongs to (``diffusion_apps.nn.unet`` → nn)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_part_of_the_package_has_a_documented_layer():
    parts = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()}
    parts = {p for p in parts if p != "__pycache__" and not p.startswith(".")}
    assert parts == set(documented_layers()), "docs/architecture.md's layers and the tree differ"


def test_imports_point_down_the_layers():
    layers, graph = documented_layers(), import_graph()
    assert len(graph) > 40 and graph["diffusion_apps.cli"]  # the walk found the package
    upward = [
        f"{a} (layer {layers[layer_name(a)]}) imports {b} (layer {layers[layer_name(b)]})"
        for a, targets in graph.items()
        for b in targets
        if layers[layer_name(b)] > layers[layer_name(a)]
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected set of modules that import each other."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checks_see_function_level_imports_cycles_and_upward_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    source = PACKAGE / "commands" / "sample.py"  # imports everything inside its function
    imported = internal_imports(source, set(import_graph()))
    assert {"diffusion_apps.checkpoint", "diffusion_apps.evaluation.protocol"} <= imported


BLOCK_EVALUATION = """
import builtins, sys

real_import = builtins.__import__
BLOCKED = ("torchmetrics", "torch_fidelity")


def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__", "")
    if importer.startswith("diffusion_apps") and name.split(".")[0] in BLOCKED:
        raise ImportError(f"{importer} imports {name}, which is blocked")
    return real_import(name, globals, locals, fromlist, level)


builtins.__import__ = guarded_import
import diffusion_apps.methods
from diffusion_apps.methods import DDPM
from diffusion_apps.nn import UNet

unet = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1,), num_res_blocks=1,
            attention_resolutions=(), num_head_channels=8, num_groups=2)
DDPM(unet, sample_steps=2).sample(1)
loaded = sorted(m for m in sys.modules if m.startswith("diffusion_apps.evaluation"))
assert not loaded, loaded
"""


def test_methods_import_and_sample_with_evaluation_libraries_blocked():
    """Lightning itself imports torchmetrics (lightning.pytorch.core.module), so the block is on
    imports made by our modules: the methods' own, and no diffusion_apps.evaluation module."""
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_EVALUATION], cwd=PACKAGE.parent, capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
