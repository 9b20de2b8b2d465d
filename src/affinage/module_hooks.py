"""Whether code may use a module's weights directly instead of calling the module.

The fused paths (a LoRA layer's base product inside its own autograd node, the chunked vocabulary
head) read ``module.weight`` themselves: that skips whatever runs around the module's call, its own
hooks, the global module hooks, and an instance ``forward`` (accelerate's device hooks replace it).
They take that shortcut only when none of these is there.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from torch import nn

_OWN = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")  # torch's private dicts
_GLOBAL = tuple(f"_global{name}" for name in _OWN)


def bypassable(module: nn.Module, harmless_pre_hooks: Collection[Callable] = ()) -> bool:
    """No instance ``forward``, no hook of ``module``'s own but the ``harmless_pre_hooks`` (hooks known to
    change no value), no global module hook."""
    return (
        "forward" not in vars(module)
        and not any(getattr(module, name) for name in _OWN if name != "_forward_pre_hooks")
        and all(hook in harmless_pre_hooks for hook in module._forward_pre_hooks.values())
        and not any(getattr(nn.modules.module, name, None) for name in _GLOBAL)
    )
