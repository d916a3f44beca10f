"""Training and evaluation. The tokenizer: its stage config (`config`), model building and init
recipes (`init`), offline stand-ins (`standins`), the objective (`objective`, terms in
`losses`), EMA and schedule (`schedule`), the trainer (`trainer`), several processes
(`launch`), exported checkpoints (`export`). Data: `data`, the procedural `world`. The Gaussian
decoder's training (`gs`), the generator's (`flow`, `flow_eval`), and `atoken eval`
(`evaluate`)."""

import importlib

_FACADE = (
    "trainer",
    "config",
    "init",
    "standins",
    "objective",
    "schedule",
    "export",
    "launch",
    "evaluate",
)  # modules whose names `atoken.training.<name>` still gives


def __getattr__(name: str):
    # `atoken.training` was one module before the subpackages: its names still resolve here
    if name.startswith("__"):
        raise AttributeError(name)
    try:  # a submodule (`from atoken.training import X` looks here first)
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    for sub in _FACADE:
        module = importlib.import_module(f"{__name__}.{sub}")
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
