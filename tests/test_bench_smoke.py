"""CI smoke test of the benchmark command: `bench/run.py --quick` runs every comparison, or says why it did not,
and writes well-formed JSON and markdown. It never gates on times."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("reparameterize", "gaussian_kl", "reparameterize_kl", "nearest_code", "vector_quantize", "vq_module")
EXPLAINED = ("skipped", "not installed")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    cmd = [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--no-progress",
           "--json", str(paths["json"]), "--markdown", str(paths["markdown"])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(paths["json"]) as f:
        data = json.load(f)
    return data, paths["markdown"].read_text()


@pytest.mark.slow
def test_meta_names_where_and_how(quick_run):
    meta = quick_run[0]["meta"]
    for key in ("device", "kind", "driver", "torch", "triton", "cuda", "date", "command", "shape_size",
                "memory_method", "timer", "competitors"):
        assert key in meta, key
    assert meta["shape_size"] == "quick" and "--quick" in meta["command"]


@pytest.mark.slow
def test_every_comparison_ran_or_says_why(quick_run):
    rows = quick_run[0]["results"]
    errors = [f"{r['op']} {r['mode']} {r['set']} {r['shape']} {r['competitor']}: {r['note']}"
              for r in rows if r["status"] == "error"]
    assert not errors, "\n".join(errors)
    for r in rows:
        assert r["status"] in ("ok",) + EXPLAINED, r
        if r["status"] == "ok":
            t = r["times_ms"]
            assert t["n"] >= 1 and all(math.isfinite(t[k]) and t[k] > 0 for k in ("median", "q25", "q75"))
            assert t["min"] <= t["median"] <= t["max"]
            assert r["peak_bytes"] is None or r["peak_bytes"] >= 0
        else:
            assert r["note"], r


@pytest.mark.slow
def test_every_op_mode_and_competitor_is_covered(quick_run):
    data = quick_run[0]
    rows = data["results"]
    ran = {(r["op"], r["mode"]) for r in rows if r["competitor"] == "eager" and r["status"] == "ok"}
    expected = {(op, mode) for op in OPS for mode in ("fwd", "fwdbwd") if (op, mode) != ("nearest_code", "fwdbwd")}
    assert ran == expected
    assert {r["competitor"] for r in rows} == set(data["meta"]["competitors"])
    for name, availability in data["meta"]["competitors"].items():
        if availability["status"] == "available":
            assert any(r["competitor"] == name and r["status"] in ("ok", "skipped") for r in rows), name
        else:
            assert availability["status"] in EXPLAINED and availability["note"], name
    assert any(r["competitor"] == "vaekernels[torch]" and r["status"] == "ok" for r in rows)


@pytest.mark.slow
def test_figures_and_markdown(quick_run):
    data, markdown = quick_run
    assert {"speed", "memory"} <= set(data["figures"])
    for figure in data["figures"].values():
        assert figure["eager"]["status"] == "ok" and figure["vaekernels[torch]"]["status"] == "ok", figure
    assert "counts" in data["launches"] or data["launches"]["note"]
    assert markdown.startswith("### vaekernels benchmark: ")
    assert data["meta"]["kind"] == "cuda" or "CPU" in markdown.splitlines()[0]
    for op in OPS[:-1]:
        assert f"#### {op}" in markdown


@pytest.mark.slow
def test_docs_block_is_generated_between_its_markers(quick_run, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import run

    data = quick_run[0]
    block = run.headline(data, "bench/results/x.md")
    assert data["meta"]["device"] in block and "bench/results/x.md" in block
    for op in ("reparameterize", "gaussian_kl", "nearest_code", "vector_quantize", "VectorQuantizer module"):
        assert f"| {op}" in block
    kind = data["meta"]["kind"]
    readme = tmp_path / "performance.md"
    readme.write_text(f"before\n<!-- bench:{kind}:start -->\nold\n<!-- bench:{kind}:end -->\nafter\n")
    run.update_block(str(readme), kind, block)
    text = readme.read_text()
    assert "old" not in text and block in text and text.startswith("before\n") and text.endswith("after\n")
    with pytest.raises(SystemExit, match="no <!-- bench:other:start -->"):
        run.update_block(str(readme), "other", block)


def test_kmeans_bench_quick(tmp_path):
    """bench/kmeans.py --quick: both competitors run at both sizes, from the same seed to the same codebook."""
    pytest.importorskip("vector_quantize_pytorch")
    out = tmp_path / "kmeans.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "kmeans.py"), "--quick", "--iters", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["size"] for r in rows] == ["llamagen", "wide"]
    for r in rows:
        for competitor in ("vaekernels", "vector-quantize-pytorch"):
            assert r[competitor]["status"] == "ok" and r[competitor]["seconds"] > 0, r
            assert r[competitor]["peak_bytes"] is None or r[competitor]["peak_bytes"] >= 0
        assert r["codes_agreeing"] == 1.0 and r["speedup"] > 0
    assert "| llamagen, N=2048 D=8 K=512 | 2 |" in proc.stdout


def test_overhead_benchmark_compares_every_op_with_its_eager_formula(tmp_path):
    """bench/overhead.py at the smallest size: every public op against its eager formula, with speed and memory
    ratios and host µs per call for both, and --floor's rows, written as JSON and a markdown table."""
    out, table = tmp_path / "overhead.json", tmp_path / "overhead.md"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "overhead.py"), "--sizes", "4x4", "--rounds", "1", "--floor",
           "--json", str(out), "--markdown", str(table)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["op"] for r in rows] == ["reparameterize", "gaussian_kl", "reparameterize_kl", "nearest_code",
                                       "vector_quantize"]
    for r in rows:
        assert r["speedup"] > 0 and r["eager_host_us"] > 0 and r["vaekernels_host_us"] > 0
        assert math.isclose(r["speedup"], r["eager_ms"] / r["vaekernels_ms"])
    assert "| reparameterize_kl |" in table.read_text()
    floor, = json.loads(out.read_text())["floor"]
    assert set(floor["ratio"]) == {"eager", "bare Function", "bare Function + seed", "vaekernels"}
    assert floor["ratio"]["eager"] == 1.0 and all(v > 0 for v in floor["us"].values())
    assert "| 4x4 | 1.00× (" in table.read_text()



def test_overhead_floor_bare_function_computes_the_eager_formula():
    """bench/overhead.py --floor's bare Function is an honest floor: from the same generator state it gives eager's z
    and gradients (its noise is torch.randn's), and the seeded variant draws the same z for the same torch seed."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import overhead

    f = overhead.floor_formulas(torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(5, 3, generator=g, requires_grad=True)
    lv = (0.5 * torch.randn(5, 3, generator=g)).requires_grad_()
    w = torch.randn(5, 3, generator=g)
    results = {}
    for name in ("eager", "bare Function", "bare Function + seed", "bare Function + seed"):
        torch.manual_seed(7)
        z, = f[name](mu, lv)
        results.setdefault(name, []).append((z.detach(),) + torch.autograd.grad((z * w).sum(), (mu, lv)))
    for a, b in zip(results["eager"][0], results["bare Function"][0]):
        torch.testing.assert_close(a, b)
    for a, b in zip(*results["bare Function + seed"]):
        assert torch.equal(a, b)


def test_roofline_predicts_every_case_kernel_and_device(tmp_path):
    """bench/roofline.py: each device x case x precision has the search's three kernels, waves are the grid over the
    SMs, the bound is the larger of the compute and memory times, and tensor cores bound the fast precisions lower."""
    from bench import roofline

    out = tmp_path / "roofline.json"
    assert roofline.main(["--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == len(roofline.DEVICES) * len(roofline.CASES) * 3 * 3
    for r in rows:
        assert r["waves"] == pytest.approx(r["grid"] / roofline.DEVICES[r["device"]]["sms"])
        assert r["bound_us"] == max(r["compute_us"], r["memory_us"]) > 0
    search = {(r["device"], r["case"], r["precision"]): r for r in rows if r["kernel"] == "search"}
    sizes = {case: (n, k) for case, n, k, _ in roofline.CASES}
    for (device, case, _), r in search.items():
        assert search[device, case, "bf16"]["compute_us"] < search[device, case, "tf32"]["compute_us"] < \
            search[device, case, "exact"]["compute_us"]
        # two waves of programs, or every split already down to one 128-code tile
        n, k = sizes[case]
        assert r["grid"] >= min(2 * roofline.DEVICES[device]["sms"], math.ceil(n / 64) * math.ceil(k / 128))
