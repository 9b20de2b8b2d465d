"""affinage: fine-tune language models with LoRA from one YAML config.

The Python API (see :mod:`affinage.api`): ``affinage.train(config, output=...)`` returns a run;
``affinage.load_run(path)`` opens one; a run offers ``evaluate``, ``predict``, ``merge``,
``export`` and ``push``. ``BasicModelRunner`` is seed 001's two-line API; ``LudwigModel``
(:mod:`affinage.ludwig_api`) is seed 000's.
"""

__version__ = "0.1.0"

_LAZY = {
    "BasicModelRunner": "affinage.runner",
    "train": "affinage.api",
    "load_run": "affinage.api",
    "Run": "affinage.api",
    "LudwigModel": "affinage.ludwig_api",
}


def __getattr__(name: str):
    # Lazy: `import affinage` must not import torch/transformers (the CLI's --help stays instant).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["BasicModelRunner", "LudwigModel", "Run", "__version__", "load_run", "train"]
