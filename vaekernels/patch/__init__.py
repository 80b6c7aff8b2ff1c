"""vk.patch / vk.unpatch: run existing models on the fused ops with one line, as Liger-Kernel does for
Hugging Face models, with the same numbers as before.

    vk.patch(model)        every known quantizer or posterior inside `model` runs the vaekernels ops
    vk.unpatch(model)      back to the originals
    vk.patch("diffusers")  class level: every instance, including models built afterwards (from_pretrained)
    vk.patch(SomeClass)    class level for one class (for the repos that are copied rather than installed)

Patched objects keep their class, parameters, buffers, state_dict keys, signatures and return values; only
methods are rebound. Configurations the kernels do not cover keep their original code, with a warning naming
the option.
"""
from __future__ import annotations

import importlib
import warnings

from torch import nn

from ._base import Adapter, bind, patch_class, unbind, unpatch_class

# name for vk.patch(name) -> adapter module; zalando's and SEED-Voken's quantizers have no importable home, so no name
LIBRARIES = {
    "diffusers": "diffusers",
    "vector_quantize_pytorch": "vector_quantize_pytorch",
    "taming": "taming",
    "vqvae2": "vqvae2",
    "encodec": "core_vq",
    "audiocraft": "core_vq",
    "speechtokenizer": "core_vq",
    "dac": "dac",
    "snac": "dac",
}
_ADAPTER_MODULES = (*dict.fromkeys(LIBRARIES.values()), "zalando", "seed_voken")


def _adapters(module_names=_ADAPTER_MODULES) -> list[Adapter]:
    return [a for m in module_names for a in importlib.import_module(f"{__name__}.{m}").ADAPTERS]


def _library_classes(name: str) -> list[tuple[Adapter, type]]:
    if name not in LIBRARIES:
        raise ValueError(f"unknown library {name!r}; known: {', '.join(sorted(LIBRARIES))}")
    pairs = [(a, a.load()) for a in _adapters([LIBRARIES[name]]) if a.library in ("", name)]
    return [(a, klass) for a, klass in pairs if klass is not None]


def _class_adapter(klass: type) -> Adapter:
    for a in _adapters():
        if a.is_target(klass):
            return a
    names = sorted({a.class_name for a in _adapters() if a.class_name})
    raise ValueError(f"{klass.__qualname__} is not a class vaekernels can patch; known: {', '.join(names)}")


def _objects(target):
    return target.modules() if isinstance(target, nn.Module) else (target,)


def patch(target):
    """Run the vaekernels ops in `target`.

    target: a model or any object (patched in place and returned: every recognised quantizer or posterior in it
    gets fused methods and `_vaekernels_patched = True`), a library name (one of LIBRARIES: "diffusers",
    "vector_quantize_pytorch", "taming", "vqvae2", "encodec", "audiocraft", "speechtokenizer", "dac", "snac": its
    classes are patched, so instances built later are too; returns None), or a class.
    Warns when nothing in `target` is recognised, and names the option for configurations left as they are.
    """
    if isinstance(target, str):
        for adapter, klass in _library_classes(target):
            patch_class(adapter, klass)
        return None
    if isinstance(target, type):
        patch_class(_class_adapter(target), target)
        return None
    adapters, found = _adapters(), False
    for obj in _objects(target):
        adapter = next((a for a in adapters if a.matches(obj)), None)
        if adapter is not None:
            found = True
            bind(adapter, obj)
    if not found:
        warnings.warn(f"vaekernels.patch: found no known quantizer or posterior in {type(target).__name__}; "
                      "nothing was patched", UserWarning, stacklevel=2)
    return target


def unpatch(target):
    """Undo `patch` for the same target: a model (returned), a library name or a class (None)."""
    if isinstance(target, str):
        for adapter, klass in _library_classes(target):
            unpatch_class(adapter, klass)
        return None
    if isinstance(target, type):
        unpatch_class(_class_adapter(target), target)
        return None
    for obj in _objects(target):
        unbind(obj)
    return target


__all__ = ["patch", "unpatch", "LIBRARIES"]
