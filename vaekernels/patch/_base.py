"""What every adapter shares: recognising a foreign class, binding vaekernels methods to one object or to a
class (and undoing it), falling back to the original method with a warning, and the small EMA helpers.

Patching binds methods, it never swaps classes: the object keeps its class, parameters, buffers and
state_dict keys, and `unpatch` only has to remove what was bound.
"""
from __future__ import annotations

import functools
import importlib
import types
import warnings

import torch
import torch.distributed as dist

_FLAG = "_vaekernels_patched"
_warned: set[tuple[str, str]] = set()


class Uncovered(Exception):
    """Raised by a fused method, before it changes any state, for a call option it does not cover."""


class Adapter:
    """One foreign class vaekernels can run: how to find and recognise it and which methods replace its own.

    A subclass sets `name` (used in warnings), `module` and `class_name` (where the class is defined; module None
    for classes that are not in a package and are recognised by class name and `attributes`), `methods` (the
    names replaced), and defines a method of each name taking the foreign object first: the fused version.
    """

    name = ""
    module: str | None = None
    class_name = ""
    methods: tuple[str, ...] = ("forward",)
    attributes: tuple[str, ...] = ()
    install_hint = ""  # what the ImportError says when the class cannot be imported
    library = ""  # the vk.patch(name) it answers to, where one adapter module serves several libraries

    def is_target(self, klass: type) -> bool:
        """klass is the foreign class itself (it defines every replaced method)."""
        if klass.__name__ != self.class_name or (self.module is not None and klass.__module__ != self.module):
            return False
        return all(m in vars(klass) for m in self.methods)

    def owner(self, klass: type) -> type | None:
        """The foreign class in klass's MRO, provided no subclass in between overrides a replaced method."""
        for k in klass.__mro__:
            if self.is_target(k):
                return k
            if any(m in vars(k) for m in self.methods):
                return None
        return None

    def matches(self, obj) -> bool:
        return self.owner(type(obj)) is not None and all(hasattr(obj, a) for a in self.attributes)

    def uncovered(self, obj) -> str | None:
        """The option of obj's configuration that the fused methods do not cover, or None."""
        return None

    def load(self) -> type | None:
        """Import the foreign class for class-level patching (None: this adapter has no class-level form);
        ImportError says what to install."""
        try:
            klass = getattr(importlib.import_module(self.module), self.class_name)
        except (ImportError, AttributeError) as err:
            raise ImportError(f"patching {self.name} needs {self.install_hint}") from err
        if not self.is_target(klass):
            raise ImportError(f"{self.module}.{self.class_name} is not the {self.name} vaekernels knows; "
                              f"patching it needs {self.install_hint}")
        return klass


def is_fused(fn) -> bool:
    return getattr(fn, "_vaekernels_fused", False)


def _warn(adapter: Adapter, option: str, stacklevel: int) -> None:
    warnings.warn(f"vaekernels.patch: {adapter.name} with {option} is not covered by the fused kernels; "
                  "it keeps its original code", UserWarning, stacklevel=stacklevel)


def warn_once(adapter: Adapter, option: str) -> None:
    """Warn at call time, once per process for each (adapter, option)."""
    if (adapter.name, option) not in _warned:
        _warned.add((adapter.name, option))
        _warn(adapter, option, stacklevel=4)


def fused_method(adapter: Adapter, original):
    """A method with `original`'s name and signature that runs the adapter's fused version, or `original` when
    the object's configuration or the call's options are not covered."""
    impl = getattr(adapter, original.__name__)

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        option = adapter.uncovered(self)
        if option is None:
            try:
                return impl(self, *args, **kwargs)
            except Uncovered as err:
                option = str(err)
        warn_once(adapter, option)
        return original(self, *args, **kwargs)

    method._vaekernels_fused = True
    return method


def bind(adapter: Adapter, obj) -> None:
    """Patch one object in place (instance attributes only), or leave it as it is with a warning naming the
    option when its configuration is not covered."""
    owner = adapter.owner(type(obj))
    if all(is_fused(getattr(owner, m)) for m in adapter.methods):
        return  # its class is patched already
    option = adapter.uncovered(obj)
    if option is not None:
        _warn(adapter, option, stacklevel=4)
        return
    for m in adapter.methods:
        setattr(obj, m, types.MethodType(fused_method(adapter, vars(owner)[m]), obj))
    setattr(obj, _FLAG, True)


def unbind(obj) -> None:
    """Remove what `bind` added to obj."""
    state = vars(obj) if hasattr(obj, "__dict__") else {}
    for k in [k for k, v in state.items() if isinstance(v, types.MethodType) and is_fused(v.__func__)]:
        del state[k]
    state.pop(_FLAG, None)


_class_originals: dict[tuple[type, str], object] = {}


def patch_class(adapter: Adapter, klass: type) -> None:
    """Replace the methods on the class itself: every instance, present or future, runs the fused versions."""
    for m in adapter.methods:
        if (klass, m) not in _class_originals:
            _class_originals[(klass, m)] = vars(klass)[m]
            setattr(klass, m, fused_method(adapter, vars(klass)[m]))
    setattr(klass, _FLAG, True)


def unpatch_class(adapter: Adapter, klass: type) -> None:
    for m in adapter.methods:
        original = _class_originals.pop((klass, m), None)
        if original is not None:
            setattr(klass, m, original)
    if _FLAG in vars(klass):
        delattr(klass, _FLAG)


# Helpers shared by the EMA adapters.

def snapshot(codebook: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the codebook for the op, which saves it for backward: the EMA update that follows
    rewrites the buffer in place (through .data, unseen by autograd), and backward must see the codes it searched."""
    return codebook.clone(memory_format=torch.contiguous_format)


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks under torch.distributed with more than one process (what the EMA repos do), else nothing."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def smoothed_cluster_size(cluster_size: torch.Tensor, eps: float) -> torch.Tensor:
    """Laplace smoothing of EMA cluster sizes as Sonnet and its ports write it: (c + eps) / (n + K eps) * n."""
    n = cluster_size.sum(dim=-1, keepdim=True)
    return (cluster_size + eps) / (n + cluster_size.shape[-1] * eps) * n


def one_hot_perplexity(counts: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """exp(-sum p log(p + 1e-10)) with p the code frequencies: the perplexity Sonnet's ports compute from the
    one-hot matrix, here from the (K,) counts."""
    p = counts.to(dtype) / n
    return torch.exp(-torch.sum(p * torch.log(p + 1e-10)))
