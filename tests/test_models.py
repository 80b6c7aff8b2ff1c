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
    assert sum(h["loss"] for h in h_vae[-5:]) < 0.8 * sum(h["loss"] for h in h_vae[:5])
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


def test_demo_writes_report_and_png(tmp_path):
    report = demo.run(steps=5, out_dir=str(tmp_path), device="cpu", timing_steps=2)
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert report["backend"] == "torch" and report["VQ-VAE"]["codes_used"] >= 1
    assert report["VAE"]["ms_per_step_fused"] > 0 and report["VAE"]["ms_per_step_eager"] > 0
