"""affinage: fine-tune language models with LoRA from one YAML config."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import affinage` must not import torch/transformers (the CLI's --help stays instant).
    if name == "BasicModelRunner":
        from affinage.runner import BasicModelRunner

        return BasicModelRunner
    raise AttributeError(name)


__all__ = ["BasicModelRunner", "__version__"]
