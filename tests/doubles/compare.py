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


def _flat(out):
    """The tensors of a quantizer's output, in order (QuantizedResult, tuples, lists of per-level outputs)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "__dataclass_fields__"):
        out = [getattr(out, f) for f in out.__dataclass_fields__]
    return [t for o in out if o is not None for t in _flat(o)]


def _objective(outs):
    return sum(((t * weights_like(t)).sum() for t in outs if t.is_floating_point() and t.requires_grad),
               torch.zeros(()))


def _train(module, make_input, call, steps, seed):
    """`steps` training steps (forward, backward, SGD) from torch.manual_seed(seed), then an eval call: what each
    step saw, and the vaekernels operators of the last step."""
    torch.manual_seed(seed)
    params = list(module.parameters())
    opt = torch.optim.SGD(params, lr=0.01) if params else None
    records = []
    for _ in range(steps):
        x = make_input().requires_grad_()
        with OpCalls() as calls:
            outs = _flat(call(module, x))
            _objective(outs).backward()
        records.append(dict(out=[t.detach() for t in outs], x_grad=x.grad,
                            grads={n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None},
                            state={k: v.clone() for k, v in module.state_dict().items()}))
        if opt is not None:
            opt.step()
            opt.zero_grad()
    module.eval()
    with torch.no_grad():
        records.append(dict(eval=_flat(call(module, make_input()))))
    module.train()
    return records, calls.names


def assert_trains_the_same(make_module, make_input, call, *, steps=3, seed=0, op="vq_fwd", rtol=1e-5, atol=1e-5):
    """Build the module twice (make_module seeds its own initialisation; modules with torch.nn.utils.weight_norm
    cannot be deep-copied), patch one, train both `steps` steps from the same seed (then an eval call), and check
    equal codes, outputs, losses, gradients and buffers at every step, and that the patched run dispatched
    vaekernels::`op`. Returns both, trained."""
    original, patched = make_module(), vk.patch(make_module())
    assert any(vars(m).get("_vaekernels_patched") for m in patched.modules()), "nothing was patched"
    want, want_ops = _train(original, make_input, call, steps, seed)
    got, got_ops = _train(patched, make_input, call, steps, seed)
    assert want_ops == [] and f"vaekernels::{op}" in got_ops, (want_ops, got_ops)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    return original, patched
