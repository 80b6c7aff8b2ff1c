"""How every vaekernels operator is defined: the low-overhead structure PyTorch's maintainers recommend.

One `Op` per operator: a `torch.library` schema inferred from the implementation's annotations, the implementation
registered for every device (CompositeExplicitAutograd) and a fake (meta) function for tracing. Autograd lives
outside the operator, in a `torch.autograd.Function` per op family that calls the forward and backward operators,
so eager calls skip `register_autograd`'s wrapper. In plain eager mode (no torch.compile, no dispatch mode such
as FakeTensorMode or a profiler's, plain tensors) an `Op` call runs the implementation directly instead of
through the dispatcher; everywhere else it dispatches `torch.ops.vaekernels.<name>`, which is what
torch.compile, fake tensors and `torch.library.opcheck` see.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch.compiler import is_compiling
from torch.jit import is_tracing
from torch.overrides import has_torch_function
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

LIBRARY = torch.library.Library("vaekernels", "DEF")


class Op:
    """The operator `vaekernels::<name>` with implementation `impl` and fake `fake`; call it like `impl`.

    `impl` may return None for an output that a call does not produce (no sample, no KL, no prior gradient): the
    direct call passes the None on, the registered operator (whose schema has no optional outputs) returns an
    empty tensor of the first tensor argument's dtype there instead. Callers treat both alike."""

    def __init__(self, name: str, impl: Callable, fake: Callable):
        def registered(*args):
            out = impl(*args)
            if isinstance(out, tuple) and None in out:
                like = next(a for a in args if isinstance(a, torch.Tensor))
                return tuple(like.new_empty(0) if t is None else t for t in out)
            return out

        registered.__signature__ = inspect.signature(impl)
        LIBRARY.define(name + torch.library.infer_schema(impl, mutates_args=()))
        LIBRARY.impl(name, registered, "CompositeExplicitAutograd")
        torch.library.register_fake(f"vaekernels::{name}", fake, lib=LIBRARY)
        self.name, self.impl = name, impl
        self.op = getattr(torch.ops.vaekernels, name).default

    def __call__(self, *args):
        """The implementation called directly where that equals dispatching the operator: not tracing (torch.compile,
        jit), no dispatch mode active, no argument with a __torch_function__ override (plain tensors and
        nn.Parameters pass); the operator everywhere else."""
        if is_compiling() or is_in_torch_dispatch_mode() or is_tracing() or has_torch_function(args):
            return self.op(*args)
        return self.impl(*args)


def needs_grad(*tensors) -> bool:
    """True when autograd has to record the call (grad mode on and some input requires grad)."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


def distinct(*tensors) -> list:
    """`tensors` with repeats of one tensor replaced by views of it: torch.compile cannot trace an
    autograd.Function given the same tensor twice (as in gaussian_kl(z, z)), and a view changes nothing else."""
    out = []
    for t in tensors:
        if t is not None:
            for u in out:
                if t is u:
                    t = t.view_as(t)
                    break
        out.append(t)
    return out
