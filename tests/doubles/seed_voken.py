"""SEED-Voken's IndexPropagationQuantize (TencentARC/SEED-Voken, src/IBQ/modules/vqvae/quantize.py), written from
the published formulas: the dense logits, softmax, one-hot and einsums over NCHW latents, and MAGVIT-v2's entropy
loss on the (rows, codes) logits."""
import torch
import torch.nn.functional as F
from torch import nn

from .taming import init_remap, remap_to_used


def entropy_loss(logits, temperature, sample_weight, batch_weight, eps=1e-5):
    """(sample entropy, batch entropy, sample_weight * sample - batch_weight * batch) of softmax(logits / T)."""
    probs = (logits / temperature).softmax(-1)
    log_probs = (logits / temperature + eps).log_softmax(-1)
    avg = probs.mean(0)
    batch = -(avg * (avg + eps).log()).sum()
    sample = (-(probs * log_probs).sum(-1)).mean()
    return sample, batch, sample_weight * sample - batch_weight * batch


class IndexPropagationQuantize(nn.Module):
    """IBQ: z (B, D, H, W); the index maximises the softmax of z . codes; z_q = (hard - sg(soft) + soft) codes."""

    def __init__(self, n_e, e_dim, beta=0.25, use_entropy_loss=False, remap=None, unknown_index="random",
                 cosine_similarity=False, entropy_temperature=0.01, sample_minimization_weight=1.0,
                 batch_maximization_weight=1.0):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.use_entropy_loss = n_e, e_dim, beta, use_entropy_loss
        self.embedding = nn.Embedding(n_e, e_dim)  # N(0, 1), nn.Embedding's own initialisation
        init_remap(self, n_e, remap, unknown_index)
        self.cosine_similarity = cosine_similarity
        self.entropy_temperature = entropy_temperature
        self.sample_minimization_weight = sample_minimization_weight
        self.batch_maximization_weight = batch_maximization_weight

    remap_to_used = remap_to_used

    def forward(self, z, temp=None, return_logits=False):
        logits = torch.einsum("bdhw,nd->bnhw", z, self.embedding.weight)
        if self.remap is not None:
            full = torch.zeros_like(logits)
            logits = logits[:, self.used]
        soft = logits.softmax(1)
        if self.remap is not None:
            full[:, self.used] = soft
            soft = full
        ind = soft.max(1, keepdim=True)[1]
        hard = torch.zeros_like(soft, memory_format=torch.contiguous_format).scatter_(1, ind, 1.0)
        one_hot = hard - soft.detach() + soft
        z_q = torch.einsum("bnhw,nd->bdhw", one_hot, self.embedding.weight)
        z_q2 = torch.einsum("bnhw,nd->bdhw", hard, self.embedding.weight)
        quant_loss = (((z_q - z) ** 2).mean() + ((z_q2.detach() - z) ** 2).mean()
                      + self.beta * ((z_q2 - z.detach()) ** 2).mean())
        diff = quant_loss
        if self.use_entropy_loss:
            flat = logits.permute(0, 2, 3, 1).reshape(-1, self.n_e)
            diff = (quant_loss, *entropy_loss(flat, self.entropy_temperature, self.sample_minimization_weight,
                                              self.batch_maximization_weight))
        ind = ind.flatten()
        if self.remap is not None:
            ind = self.remap_to_used(ind.reshape(z.shape[0], -1)).reshape(-1, 1)
        return z_q, diff, (None, None, ind)
