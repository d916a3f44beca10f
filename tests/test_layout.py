"""The subpackages' import direction: each imports only from the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import atoken

PKG = Path(atoken.__file__).resolve().parent
# lowest first; a module may import from its own layer and any layer before it
LAYERS = ["core", "io", "threed", "pretrained", "text", "pipelines", "training", "cli"]


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "atoken" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            if node.module == "atoken":
                out += [f"atoken.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_imports_point_down_the_layers():
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        own = _layer(".".join(rel.parts))
        if own is None:
            continue
        for target in _imports(path):
            layer = _layer(target)
            if layer is not None and LAYERS.index(layer) > LAYERS.index(own):
                wrong.append(f"{'/'.join(rel.parts)}.py imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_every_module_sits_in_a_subpackage():
    flat = sorted(p.name for p in PKG.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "cli.py"]
    for layer in LAYERS[:-1]:
        assert (PKG / layer / "__init__.py").is_file(), layer


def test_old_flat_paths_are_the_same_modules():
    import atoken.hub
    import atoken.pipeline
    from atoken.core import config
    from atoken.pipelines import reconstruct
    from atoken.pretrained import hub
    from atoken.training import Trainer, trainer

    assert atoken.hub is hub and atoken.pipeline is reconstruct and atoken.config is config
    assert Trainer is trainer.Trainer
