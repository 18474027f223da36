"""dsv4: DeepSeek-V4 in plain PyTorch.

The public entry points are imported lazily so that `import dsv4` stays cheap.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "dsv4.config",
    "Transformer": "dsv4.model",
    "load_pretrained": "dsv4.checkpoint",
    "save_pretrained": "dsv4.checkpoint",
    "load_tokenizer": "dsv4.tokenizer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsv4' has no attribute {name!r}")


__all__ = list(_LAZY)
