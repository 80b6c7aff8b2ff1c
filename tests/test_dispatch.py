"""What "auto" knows of GPUs: the verification records and measured tables of vaekernels/dispatch.json, how they are
read (vaekernels._backend), how GPU runs write them (bench/dispatch.py) and how `python -m vaekernels info` reports
them. The file itself holds GPU results; these tests use made-up ones."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vaekernels import __main__ as cli
from vaekernels import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import dispatch  # noqa: E402

TABLE = {"sm_90": {"device": "test GPU", "entries": [
    {"op": "vq_fwd", "size": [1024, 512, 8], "backend": "triton"},
    {"op": "vq_fwd", "size": [65536, 16384, 256], "backend": "cuda"},
    {"op": "gaussian_fwd", "size": [4096], "backend": "cuda"},
]}}


VERIFIED = {"sm_90": {"cuda": {"device": "test GPU", "date": "2026-12-01T10:00:00+00:00",
                                "source": "bench/results/test_GPU-20261201-gpu_check.log"}}}


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(_backend, "dispatch_tables", lambda: TABLE)


@pytest.fixture
def gpu(monkeypatch):
    """Both fused backends available, a GPU of architecture sm_90, CUDA verified there; `_auto` uncached."""
    monkeypatch.setattr(_backend, "availability", lambda name: (name in ("triton", "cuda"), "test"))
    monkeypatch.setattr(_backend, "_arch", lambda index: "sm_90")
    monkeypatch.setattr(_backend, "verified_runs", lambda: VERIFIED)
    return _backend._auto.__wrapped__


def test_choose_takes_the_nearest_measured_size(table):
    both = ["cuda", "triton"]
    assert _backend.choose("vq_fwd", (2000, 256, 8), "sm_90", both) == "triton"
    assert _backend.choose("vq_fwd", (65536, 8192, 256), "sm_90", both) == "cuda"
    assert _backend.choose("gaussian_fwd", (1 << 24,), "sm_90", both) == "cuda"


def test_choose_falls_back_to_the_default_order(table):
    # no entry for the op, no table for the architecture, or a measured winner that is not available here
    assert _backend.choose("vq_bwd", (1024, 512, 8), "sm_90", ["cuda", "triton"]) == "cuda"
    assert _backend.choose("vq_fwd", (1024, 512, 8), "sm_80", ["cuda", "triton"]) == "cuda"
    assert _backend.choose("vq_fwd", (1024, 512, 8), "sm_90", ["cuda"]) == "cuda"


def test_auto_on_cuda_tensors_reads_the_table(table, gpu, monkeypatch):
    auto = gpu
    assert auto("vq_fwd", torch.device("cuda", 0), (1024, 512, 8)) == "triton"
    assert auto("vq_fwd", torch.device("cuda", 0), (65536, 16384, 256)) == "cuda"
    assert auto("vq_fwd", torch.device("cpu"), (1024, 512, 8)) == "torch"
    monkeypatch.setattr(_backend, "availability", lambda name: (False, "test"))
    assert auto("vq_fwd", torch.device("cuda", 0), (1024, 512, 8)) == "torch"


@pytest.mark.parametrize("records", [{}, {"sm_80": VERIFIED["sm_90"]}, {"sm_90": {}}])
def test_auto_never_takes_an_unverified_cuda(table, gpu, monkeypatch, records):
    """No record for the GPU's architecture (none at all, another architecture's, none for cuda): Triton, even where
    the table measured CUDA faster, then the reference when Triton cannot run."""
    auto = gpu
    monkeypatch.setattr(_backend, "verified_runs", lambda: records)
    cuda = torch.device("cuda", 0)
    for op, size in [("vq_fwd", (65536, 16384, 256)), ("gaussian_fwd", (1 << 24,)), ("vq_bwd", (1024, 512, 8))]:
        assert auto(op, cuda, size) == "triton"
    monkeypatch.setattr(_backend, "availability", lambda name: (name == "cuda", "test"))
    assert auto("vq_fwd", cuda, (65536, 16384, 256)) == "torch"


def test_auto_without_a_table_takes_verified_cuda_then_triton(gpu, monkeypatch):
    monkeypatch.setattr(_backend, "dispatch_tables", lambda: {})
    cuda = torch.device("cuda", 0)
    assert gpu("vq_fwd", cuda, (1024, 512, 8)) == "cuda"
    monkeypatch.setattr(_backend, "_arch", lambda index: "sm_80")
    assert gpu("vq_fwd", cuda, (1024, 512, 8)) == "triton"


def test_info_says_what_auto_prefers_and_why(gpu, monkeypatch):
    assert cli.auto_summary("sm_90")[0] == ("auto on CUDA tensors: cuda: verified on sm_90 (test GPU, 2026-12-01, "
                                            "bench/results/test_GPU-20261201-gpu_check.log), auto prefers cuda")
    assert cli.auto_summary("sm_80")[0] == "auto on CUDA tensors: cuda: unverified on sm_80, auto prefers triton"
    no_gpu = cli.auto_summary(None)
    assert no_gpu[0].startswith("auto on CUDA tensors of sm_90: cuda (verified: test GPU, 2026-12-01")
    assert no_gpu[1].startswith("auto on CUDA tensors elsewhere: triton, then torch (cuda: unverified")
    monkeypatch.setattr(_backend, "availability", lambda name: (name == "triton", "test"))
    assert cli.auto_summary("sm_90")[0].endswith("but unavailable here, auto prefers triton")
    monkeypatch.setattr(_backend, "verified_runs", lambda: {})
    assert cli.auto_summary(None)[0].startswith("auto on CUDA tensors: triton, then torch (cuda: unverified")


def test_the_committed_table_is_well_formed():
    with open(_backend.DISPATCH_TABLE) as f:
        doc = json.load(f)
    for arch, records in doc["verified"].items():
        assert arch.startswith("sm_") and set(records) <= {"cuda"}, records
        for record in records.values():
            assert record["device"] and record["date"] and os.path.exists(os.path.join(ROOT, record["source"])), record
    for arch, table in doc["tables"].items():
        assert arch.startswith("sm_") and table["device"] and table["source"]
        for e in table["entries"]:
            assert e["backend"] in ("cuda", "triton"), e
            assert len(e["size"]) == len(_backend.DISPATCH_OPS[e["op"]]), e
            assert min(e["size"]) > 0 and set(e["ms"]) == {"cuda", "triton"}, e


def _row(op, mode, competitor, ms, shape="s", **extra):
    size = {"size": 1 << 20} if op in dispatch.VAE_OPS else {"size": 0, "dims": {"N": 4096, "K": 1024, "D": 64}}
    return {"op": op, "mode": mode, "set": "set", "shape": shape, "competitor": competitor, "status": "ok",
            "times_ms": {"median": ms}, **size, **extra}


def test_entries_pick_the_faster_backend_per_op_from_side_by_side_rows():
    rows = [
        _row("vector_quantize", "fwd", "vaekernels[cuda]", 1.0),
        _row("vector_quantize", "fwd", "vaekernels[triton]", 2.0),
        _row("vector_quantize", "fwdbwd", "vaekernels[cuda]", 4.0),  # backward: cuda 3.0 ms
        _row("vector_quantize", "fwdbwd", "vaekernels[triton]", 3.5),  # backward: triton 1.5 ms
        _row("vector_quantize", "fwd", "eager", 0.1),  # not a fused backend: ignored
        _row("reparameterize", "fwd", "vaekernels[cuda]", 0.30),
        _row("reparameterize", "fwd", "vaekernels[triton]", 0.25),
        _row("gaussian_kl", "fwd", "vaekernels[cuda]", 0.10),
        _row("gaussian_kl", "fwd", "vaekernels[triton]", 0.20),
        _row("nearest_code", "fwd", "vaekernels[triton]", 1.0),  # cuda not measured: no entry
    ]
    got = {(e["op"], tuple(e["size"])): e for e in dispatch.entries(rows)}
    assert set(got) == {("vq_fwd", (4096, 1024, 64)), ("vq_bwd", (4096, 1024, 64)), ("gaussian_fwd", (1 << 20,))}
    assert got["vq_fwd", (4096, 1024, 64)]["backend"] == "cuda"
    assert got["vq_bwd", (4096, 1024, 64)]["backend"] == "triton"
    assert got["vq_bwd", (4096, 1024, 64)]["ms"] == {"cuda": 3.0, "triton": 1.5}
    gaussian = got["gaussian_fwd", (1 << 20,)]  # both gaussian ops summed: cuda 0.40 ms, triton 0.45 ms
    assert gaussian["backend"] == "cuda" and gaussian["ms"] == pytest.approx({"cuda": 0.40, "triton": 0.45})


def test_update_merges_a_partial_run_into_the_table_file(tmp_path):
    path = tmp_path / "dispatch.json"
    path.write_text(json.dumps({"tables": {"sm_90": {"entries": [
        {"op": "vq_fwd", "size": [4096, 1024, 64], "backend": "triton", "ms": {"cuda": 9, "triton": 1}},
        {"op": "nearest_code", "size": [8, 8, 8], "backend": "triton", "ms": {"cuda": 9, "triton": 1}}]}}}))
    meta = {"kind": "cuda", "capability": "sm_90", "device": "test GPU", "date": "2026-11-25T00:00:00",
            "torch": "2.11", "triton": "3.6"}
    rows = [_row("vector_quantize", "fwd", "vaekernels[cuda]", 1.0),
            _row("vector_quantize", "fwd", "vaekernels[triton]", 2.0)]
    table = dispatch.update({"meta": meta, "results": rows}, str(path), "bench/results/run.json")
    saved = json.loads(path.read_text())["tables"]["sm_90"]
    assert saved == table and saved["source"] == "bench/results/run.json"
    assert {(e["op"], e["backend"]) for e in saved["entries"]} == {("vq_fwd", "cuda"), ("nearest_code", "triton")}
    with pytest.raises(SystemExit, match="needs a GPU run"):
        dispatch.update({"meta": {**meta, "kind": "cpu"}, "results": rows}, str(path), "x")


def test_a_passing_parity_run_is_recorded_and_read_back(tmp_path, monkeypatch):
    """bench/dispatch.py records CUDA verified under the run's architecture, keeping the tables; auto reads it."""
    path = tmp_path / "dispatch.json"
    path.write_text(json.dumps({"verified": {}, "tables": {"sm_90": {"entries": []}}}))
    meta = {"capability": "sm_90", "device": "test GPU", "date": "2026-12-01T10:00:00+00:00", "torch": "2.11",
            "triton": "3.6", "cuda": "13.0", "driver": "580"}
    record = dispatch.record_verified(str(path), meta, "bench/results/run-gpu_check.log", "abc123")
    doc = json.loads(path.read_text())
    assert doc["verified"] == {"sm_90": {"cuda": record}} and doc["tables"] == {"sm_90": {"entries": []}}
    assert record["source"] == "bench/results/run-gpu_check.log" and record["commit"] == "abc123"
    monkeypatch.setattr(_backend, "DISPATCH_TABLE", str(path))
    _backend._dispatch_file.cache_clear()
    try:
        assert _backend.trusted("cuda", "sm_90") and not _backend.trusted("cuda", "sm_80")
        assert _backend.trusted("triton", "sm_80")
    finally:
        monkeypatch.undo()
        _backend._dispatch_file.cache_clear()


def test_recording_refuses_without_a_usable_cuda_backend():
    if _backend.availability("cuda")[0]:
        pytest.skip("the cuda backend runs here")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "dispatch.py"), "--cuda-verified", "x.log"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--cuda-verified needs the cuda backend running on a GPU" in done.stderr


def test_bench_dispatch_command_writes_the_table_of_a_gpu_run(tmp_path):
    """`bench/run.py --from-json RUN --dispatch` end to end, on a GPU run made up from a CPU one, writing to the
    file VAEKERNELS_DISPATCH_TABLE names; a CPU run is refused."""
    with open(os.path.join(ROOT, "bench", "results", "cpu-2core-20261125.json")) as f:
        cpu = json.load(f)
    rows = []
    for r in cpu["results"]:
        if r["competitor"] == "vaekernels[torch]" and r["status"] == "ok" and r["op"] in dispatch.SOURCES:
            for backend, factor in (("cuda", 1.0), ("triton", 2.0 if r["op"] in dispatch.VAE_OPS else 0.5)):
                times = {**r["times_ms"], "median": r["times_ms"]["median"] * factor}
                rows.append({**r, "competitor": f"vaekernels[{backend}]", "backend": backend, "times_ms": times})
    gpu = {**cpu, "results": rows, "meta": {**cpu["meta"], "kind": "cuda", "capability": "sm_90", "device": "GPU",
                                             "cuda": "13.0", "driver": "test"}}
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    (tmp_path / "cpu.json").write_text(json.dumps(cpu))
    table = tmp_path / "table.json"
    env = {**os.environ, "VAEKERNELS_DISPATCH_TABLE": str(table)}

    def bench(run):
        return subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--from-json",
                               str(tmp_path / run), "--dispatch"], env=env, capture_output=True, text=True)

    refused = bench("cpu.json")
    assert refused.returncode != 0 and "needs a GPU run" in refused.stderr and not table.exists()
    done = bench("gpu.json")
    assert done.returncode == 0, done.stderr[-3000:]
    entries = json.loads(table.read_text())["tables"]["sm_90"]["entries"]
    assert entries and {e["backend"] for e in entries if e["op"].startswith("gaussian")} == {"cuda"}
    assert {e["backend"] for e in entries if e["op"] in ("vq_fwd", "nearest_code")} == {"triton"}
    # backward = fwdbwd - fwd, clipped at 0 (noisy runs): where the two tie at 0, the default order's cuda
    assert all(e["backend"] == ("triton" if e["ms"]["cuda"] > 0 else "cuda") for e in entries if e["op"] == "vq_bwd")
    assert "dispatch table for GPU" in done.stdout
