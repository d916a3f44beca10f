"""The text side: text towers (`towers`) and zero-shot classification with the pooled feature
(`zeroshot`)."""

import importlib

_FACADE = ("towers",)  # modules whose names `atoken.text.<name>` still gives


def __getattr__(name: str):
    # `atoken.text` was one module before the subpackages: its names still resolve here
    if name.startswith("__"):
        raise AttributeError(name)
    try:  # a submodule (`from atoken.text import X` looks here first)
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    for sub in _FACADE:
        module = importlib.import_module(f"{__name__}.{sub}")
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
