"""rosinality/vq-vae-2-pytorch's Quantize (vqvae.py), Sonnet's EMA quantizer, single process."""
import torch
import torch.nn.functional as F
from torch import nn


class Quantize(nn.Module):
    """Channel-last input; codebook `embed` stored as (dim, n_embed); in training, EMA of the code counts and
    sums (decay) with Laplace smoothing (eps) rewrites `embed` after the codes were looked up."""

    def __init__(self, dim, n_embed, decay=0.99, eps=1e-5):
        super().__init__()
        self.dim, self.n_embed, self.decay, self.eps = dim, n_embed, decay, eps
        embed = torch.randn(dim, n_embed)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(n_embed))
        self.register_buffer("embed_avg", embed.clone())

    def forward(self, input):
        flat = input.reshape(-1, self.dim)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed + self.embed.pow(2).sum(0, keepdim=True)
        _, ind = (-dist).max(1)
        onehot = F.one_hot(ind, self.n_embed).type(flat.dtype)
        ind = ind.view(*input.shape[:-1])
        quantize = F.embedding(ind, self.embed.transpose(0, 1))
        if self.training:
            self.cluster_size.data.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
            self.embed_avg.data.mul_(self.decay).add_(flat.transpose(0, 1) @ onehot, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            size = (self.cluster_size + self.eps) / (n + self.n_embed * self.eps) * n
            self.embed.data.copy_(self.embed_avg / size.unsqueeze(0))
        diff = (quantize.detach() - input).pow(2).mean()
        quantize = input + (quantize - input).detach()
        return quantize, diff, ind
