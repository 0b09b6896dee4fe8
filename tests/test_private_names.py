"""No module of diffusion_apps imports another one's private (``_``-prefixed) names: what modules
share is public. Every import statement counts, module-level or inside a function."""

import ast
from pathlib import Path

import diffusion_apps

PACKAGE = Path(diffusion_apps.__file__).parent


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, name) for each private name (or module) that ``source``, the code of ``module``,
    imports from diffusion_apps; relative imports are resolved against ``module``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            origin = node.module or ""
            if node.level:
                package = module.split(".")[: len(module.split(".")) - node.level + is_package]
                origin = ".".join([*package, *([node.module] if node.module else [])])
            if origin.split(".")[0] != "diffusion_apps":
                continue
            names = [*origin.split("."), *(alias.name for alias in node.names)]
        elif isinstance(node, ast.Import):
            dotted = [a.name.split(".") for a in node.names]
            names = [part for parts in dotted if parts[0] == "diffusion_apps" for part in parts]
        else:
            continue
        found += [(node.lineno, name) for name in names if is_private(name)]
    return sorted(found)


def test_no_module_imports_a_private_name_of_another():
    paths = sorted(PACKAGE.rglob("*.py"))
    assert len(paths) > 30  # the walk found the package
    offenders = []
    for path in paths:
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        hits = private_imports(path.read_text(), module, is_package)
        offenders += [f"{path.relative_to(PACKAGE.parent)}:{line}: {name}" for line, name in hits]
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def test_the_check_sees_function_level_relative_and_dotted_imports():
    source = (
        "from __future__ import annotations\n"
        "import torch._dynamo\n"  # not ours: ignored
        "from lightning.pytorch.cli import _private\n"  # not ours: ignored
        "from diffusion_apps.nn import UNet, __all__\n"  # public and dunder: fine
        "def f():\n"
        "    from diffusion_apps.checkpoint import _hidden\n"
        "    from .unet import _also_hidden\n"
        "    from .. import _top\n"
        "    import diffusion_apps._private_module\n"
    )
    hits = private_imports(source, "diffusion_apps.nn.probe")
    assert [name for _, name in hits] == ["_hidden", "_also_hidden", "_top", "_private_module"]
    assert private_imports("from . import _x\n", "diffusion_apps.nn", is_package=True) == [
        (1, "_x")
    ]
    assert private_imports("from . import _x\n", "other.nn", is_package=True) == []
