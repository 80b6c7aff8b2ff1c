"""Run an original module and its patched twin through the same training step and compare everything."""
import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vaekernels as vk
from vaekernels import _backend

# fused backends that run on the CPU tensors these tests use: Triton through its interpreter
CPU_FUSED_BACKENDS = ["triton"] if _backend.triton_interpreted() and _backend.availability("triton")[0] else []


class OpCalls(TorchDispatchMode):
    """Records the vaekernels torch.library operators dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vaekernels":
            self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def weights_like(t):
    """A fixed random cotangent, so outputs are compared through a gradient in a generic direction."""
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(123), dtype=t.dtype)



def vq_objective(out):
    """A scalar that depends on every element of a (quantized, loss, info) quantizer output."""
    z_q, loss, _ = out
    return (z_q * weights_like(z_q)).sum() + loss


def _step(module, make_input, objective, seed, call_kwargs):
    torch.manual_seed(seed)
    x = make_input().requires_grad_()
    params = list(module.parameters())
    opt = torch.optim.SGD(params, lr=0.01) if params else None
    with OpCalls() as calls:
        out = module(x, **call_kwargs)
        objective(out).backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    if opt is not None:
        opt.step()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    module.eval()
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        eval_out = module(x.detach(), **call_kwargs)
    module.train()
    return dict(out=out, x_grad=x.grad, grads=grads, state=state, eval_out=eval_out), calls.names


def assert_patched_equivalent(original, make_input, objective, *, seed=0, call_kwargs=None, tol=None):
    """Patch a copy of `original`, run one training step (forward, backward, SGD step) and an eval forward on
    both from the same seed, and check equal outputs, indices, losses, gradients, parameters and buffers,
    that the patched run dispatched vaekernels operators and the original none, and that state_dicts load
    into both. tol: (rtol, atol) for whole models, where layers after the quantizer amplify float rounding.
    Returns the patched module."""
    patched = vk.patch(copy.deepcopy(original))
    patched_objs = [m for m in patched.modules() if vars(m).get("_vaekernels_patched")]
    assert patched_objs, "nothing was patched"
    ref, ref_ops = _step(original, make_input, objective, seed, call_kwargs or {})
    got, got_ops = _step(patched, make_input, objective, seed, call_kwargs or {})
    assert ref_ops == []
    assert "vaekernels::vq_fwd" in got_ops or "vaekernels::gaussian_fwd" in got_ops, got_ops
    rtol, atol = tol or (None, None)
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    assert original.state_dict().keys() == patched.state_dict().keys()
    patched.load_state_dict(original.state_dict())
    original.load_state_dict(patched.state_dict())
    return patched
