"""Reference models and the demo: they train on the bundled digits, and the demo writes its report and PNG."""
import torch

from vaekernels import demo
from vaekernels.models import ConvVAE, ConvVQVAE


def test_models_learn_and_use_the_codebook():
    torch.manual_seed(0)
    data = demo.load_digits(torch.device("cpu"))
    vae, vqvae = ConvVAE(), ConvVQVAE()
    h_vae = demo.train(vae, data, 60, progress=False)
    h_vq = demo.train(vqvae, data, 60, progress=False)
    assert sum(h["rec"] for h in h_vae[-5:]) < 0.8 * sum(h["rec"] for h in h_vae[:5])
    assert sum(h["rec"] for h in h_vq[-5:]) < 0.8 * sum(h["rec"] for h in h_vq[:5])
    assert h_vq[-1]["perplexity"] > 1.0
    assert vae.sample(4).shape == (4, 1, 8, 8)


def test_eager_twins_compute_the_same_losses():
    torch.manual_seed(0)
    x = demo.load_digits(torch.device("cpu"))[:32]
    fused, eager = ConvVQVAE().eval(), ConvVQVAE(eager=True).eval()
    eager.load_state_dict(fused.state_dict())
    a, b = fused(x), eager(x)
    torch.testing.assert_close(a["loss"], b["loss"])
    assert torch.equal(a["indices"], b["indices"])


def test_vae_twins_train_the_same_objective():
    """The fused VAE and its eager twin: the same KL with free bits, the same KL warm-up, the same decoding."""
    torch.manual_seed(0)
    x = demo.load_digits(torch.device("cpu"))[:32]
    fused, eager = ConvVAE(), ConvVAE(eager=True)
    eager.load_state_dict(fused.state_dict())
    a, b = fused(x), eager(x)
    torch.testing.assert_close(a["kl"], b["kl"])
    assert float(a["kl"].detach()) >= fused.free_bits * fused.latent_dim - 1e-4  # free bits: at least that many nats
    torch.testing.assert_close(fused.reconstruct(x), eager.reconstruct(x))
    assert float(fused.kl_weight) == 0.0
    for model in (fused, eager):
        model.after_step(49)
    assert float(fused.kl_weight) == float(eager.kl_weight) == 0.5
    fused.after_step(500)
    assert float(fused.kl_weight) == 1.0


def test_demo_writes_report_and_png(tmp_path):
    report = demo.run(steps=5, out_dir=str(tmp_path), device="cpu", timing_steps=2)
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert report["backend"] == "torch" and report["VQ-VAE"]["codes_used"] >= 1
    assert report["VAE"]["ms_per_step_fused"] > 0 and report["VAE"]["ms_per_step_eager"] > 0
    assert report["VAE"]["heldout_mse"] > 0 and report["VQ-VAE"]["heldout_mse"] > 0
