"""taming-transformers' VectorQuantizer2 (CompVis/taming-transformers, taming/modules/vqvae/quantize.py)."""
import numpy as np
import torch
from torch import nn


def init_remap(module, n_e, remap, unknown_index):
    """The index remapping of taming's quantizers (and of the ones copied from them): indices into the codes listed
    in the .npy file `remap`, an unknown one replaced by a random index or by `unknown_index` ("extra": one past
    the listed codes)."""
    module.remap = remap
    module.re_embed = n_e
    if remap is not None:
        module.register_buffer("used", torch.tensor(np.load(remap)))
        module.re_embed = module.used.shape[0]
        module.unknown_index = unknown_index
        if unknown_index == "extra":
            module.unknown_index = module.re_embed
            module.re_embed += 1


def remap_to_used(module, inds):
    shape = inds.shape
    inds = inds.reshape(shape[0], -1)
    match = (inds[:, :, None] == module.used.to(inds)[None, None, :]).long()
    new = match.argmax(-1)
    unknown = match.sum(2) < 1
    if module.unknown_index == "random":
        new[unknown] = torch.randint(0, module.re_embed, size=new[unknown].shape).to(device=new.device)
    else:
        new[unknown] = module.unknown_index
    return new.reshape(shape)


class VectorQuantizer2(nn.Module):
    """VQGAN's quantizer: NCHW input, distances by the expanded square, argmin, losses with `legacy` beta
    placement (legacy=True weighs the codebook term by beta), straight-through output, optional index remapping
    to the codes listed in the .npy file `remap`, and (B, H, W) indices with sane_index_shape."""

    def __init__(self, n_e, e_dim, beta, remap=None, unknown_index="random", sane_index_shape=False, legacy=True):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, beta, legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        init_remap(self, n_e, remap, unknown_index)
        self.sane_index_shape = sane_index_shape

    remap_to_used = remap_to_used

    def forward(self, z, temp=None, rescale_logits=False, return_logits=False):
        assert temp is None or temp == 1.0, "Only for interface compatible with Gumbel"
        assert not rescale_logits and not return_logits, "Only for interface compatible with Gumbel"
        z = z.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, self.e_dim)
        w = self.embedding.weight
        d = flat.pow(2).sum(dim=1, keepdim=True) + w.pow(2).sum(dim=1) - 2 * torch.einsum("bd,dn->bn", flat, w.t())
        idx = torch.argmin(d, dim=1)
        z_q = self.embedding(idx).view(z.shape)
        commitment = torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        loss = commitment + self.beta * codebook if self.legacy else self.beta * commitment + codebook
        z_q = z + (z_q - z).detach()
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        if self.remap is not None:
            idx = self.remap_to_used(idx.reshape(z.shape[0], -1)).reshape(-1, 1)
        if self.sane_index_shape:
            idx = idx.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, idx)
