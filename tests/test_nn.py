"""nn modules: VectorQuantizer (learned and EMA codebooks, usage, restarts, DDP), ResidualVectorQuantizer,
DiagonalGaussian."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vaekernels as vk


def _batch(n=64, d=4, seed=0, channel_first=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n // 4, d, 2, 2, generator=g) if channel_first else torch.randn(n, d, generator=g)


def test_learned_codebook_is_a_parameter_and_trains():
    vq = vk.nn.VectorQuantizer(16, 4)
    assert isinstance(vq.codebook, torch.nn.Parameter) and vq.codebook.shape == (16, 4)
    z = _batch()
    out = vq(z)
    out.loss.backward()
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0
    assert set(out._fields) == {"quantized", "indices", "loss", "codebook_loss", "commitment_loss", "perplexity"}


def test_ema_update_matches_the_closed_form():
    k, d, decay, eps = 8, 4, 0.9, 1e-5
    vq = vk.nn.VectorQuantizer(k, d, ema=True, decay=decay, eps=eps)
    init = vq.codebook.clone()
    z = _batch(d=d)
    idx = torch.cdist(z, init).argmin(1)
    counts = torch.bincount(idx, minlength=k).float()
    sums = torch.zeros(k, d).index_add_(0, idx, z)
    out = vq(z)
    assert torch.equal(out.indices, idx)
    cluster = (1 - decay) * counts
    embed = decay * init + (1 - decay) * sums
    n = cluster.sum()
    expected = embed / ((cluster + eps) / (n + k * eps) * n).unsqueeze(1)
    torch.testing.assert_close(vq.cluster_size, cluster)
    torch.testing.assert_close(vq.embed_sum, embed)
    torch.testing.assert_close(vq.codebook, expected)
    assert not isinstance(vq.codebook, torch.nn.Parameter)


def test_ema_eval_changes_nothing_and_state_dict_roundtrips():
    vq = vk.nn.VectorQuantizer(8, 4, ema=True).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(_batch())
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())
    other = vk.nn.VectorQuantizer(8, 4, ema=True)
    other.load_state_dict(vq.state_dict())
    assert torch.equal(other.codebook, vq.codebook)


def test_channel_first_module():
    vq = vk.nn.VectorQuantizer(8, 4, dim=1)
    z = _batch(channel_first=True)
    out = vq(z)
    assert out.quantized.shape == z.shape and out.indices.shape == (16, 2, 2)


def test_usage_and_dead_code_restart():
    torch.manual_seed(0)
    vq = vk.nn.VectorQuantizer(128, 4, ema=True)
    z = _batch()
    vq(z)
    assert vq.code_usage.sum().item() == 64
    dead = int((vq.code_usage < 1).sum())
    assert dead > 0
    assert vq.restart_dead_codes(threshold=1.0) == dead
    assert vq.code_usage.sum().item() == 0
    # every restarted code is now a row of the batch
    restarted = vq.codebook[(vq.cluster_size == 1.0)]
    assert restarted.shape[0] == dead
    assert all(torch.isclose(z, c).all(1).any() for c in restarted)
    with pytest.raises(ValueError, match="needs a batch"):
        vk.nn.VectorQuantizer(4, 4).restart_dead_codes()


def test_residual_vector_quantizer():
    rvq = vk.nn.ResidualVectorQuantizer(3, 16, 4)
    z = _batch()
    out = rvq(z)
    assert out.indices.shape == (64, 3) and out.perplexity.shape == (3,)
    manual, residual = torch.zeros_like(z), z
    for layer, idx in zip(rvq.layers, out.indices.unbind(-1)):
        manual = manual + layer.codebook[idx]
        residual = z - manual
    torch.testing.assert_close(out.quantized, manual)
    assert residual.norm() < z.norm()


def test_diagonal_gaussian():
    post = vk.nn.DiagonalGaussian(dim=1)
    h = torch.randn(3, 8, 4, 4, requires_grad=True)
    z, kl = post(h)
    mu, lv = h.chunk(2, dim=1)
    assert z.shape == mu.shape
    torch.testing.assert_close(kl, vk.gaussian_kl(mu, lv.clamp(-30, 20)))
    post.eval()
    z_eval, _ = post(h)
    assert torch.equal(z_eval, mu)
    with pytest.raises(ValueError, match="even number of channels"):
        post(torch.randn(2, 3, 4))


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    vq = vk.nn.VectorQuantizer(8, 4, ema=True, decay=0.5)
    z = _batch(seed=3)
    vq(z.chunk(world)[rank])
    torch.save({"codebook": vq.codebook, "usage": vq.code_usage}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_ema_keeps_every_rank_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert torch.equal(r0["codebook"], r1["codebook"])
    torch.manual_seed(0)
    single = vk.nn.VectorQuantizer(8, 4, ema=True, decay=0.5)
    single(_batch(seed=3))
    torch.testing.assert_close(r0["codebook"], single.codebook)
    assert torch.equal(r0["usage"], single.code_usage)
