"""zalandoresearch/pytorch-vq-vae's VectorQuantizerEMA (vq-vae.ipynb, current master: codes looked up before
the EMA update)."""
import torch
import torch.nn.functional as F
from torch import nn


class VectorQuantizerEMA(nn.Module):
    """NCHW input; returns (loss, quantized, perplexity, encodings). In training the EMA cluster sizes are stored
    Laplace-smoothed, and _ema_w and _embedding.weight are replaced by new Parameters."""

    def __init__(self, num_embeddings, embedding_dim, commitment_cost, decay, epsilon=1e-5):
        super().__init__()
        self._embedding_dim, self._num_embeddings = embedding_dim, num_embeddings
        self._embedding = nn.Embedding(num_embeddings, embedding_dim)
        self._embedding.weight.data.normal_()
        self._commitment_cost = commitment_cost
        self.register_buffer("_ema_cluster_size", torch.zeros(num_embeddings))
        self._ema_w = nn.Parameter(torch.Tensor(num_embeddings, embedding_dim))
        self._ema_w.data.normal_()
        self._decay, self._epsilon = decay, epsilon

    def forward(self, inputs):
        inputs = inputs.permute(0, 2, 3, 1).contiguous()
        flat = inputs.view(-1, self._embedding_dim)
        w = self._embedding.weight
        distances = flat.pow(2).sum(dim=1, keepdim=True) + w.pow(2).sum(dim=1) - 2 * torch.matmul(flat, w.t())
        idx = torch.argmin(distances, dim=1).unsqueeze(1)
        encodings = torch.zeros(idx.shape[0], self._num_embeddings, device=inputs.device)
        encodings.scatter_(1, idx, 1)
        quantized = torch.matmul(encodings, w).view(inputs.shape)
        if self.training:
            self._ema_cluster_size = self._ema_cluster_size * self._decay + (1 - self._decay) * encodings.sum(0)
            n = torch.sum(self._ema_cluster_size.data)
            self._ema_cluster_size = (self._ema_cluster_size + self._epsilon) / (
                n + self._num_embeddings * self._epsilon) * n
            dw = torch.matmul(encodings.t(), flat)
            self._ema_w = nn.Parameter(self._ema_w * self._decay + (1 - self._decay) * dw)
            self._embedding.weight = nn.Parameter(self._ema_w / self._ema_cluster_size.unsqueeze(1))
        loss = self._commitment_cost * F.mse_loss(quantized.detach(), inputs)
        quantized = inputs + (quantized - inputs).detach()
        avg_probs = torch.mean(encodings, dim=0)
        perplexity = torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-10)))
        return loss, quantized.permute(0, 3, 1, 2).contiguous(), perplexity, encodings
