"""bench/gpu_check.sh without a GPU, so that the GPU check cannot rot between GPU runs: the first-contact plan
(stage order, time limits, commands that name things that exist), the stage runner (time limits, summary, files
brought back) on a stand-in Python, and the smoke stage's code (bench/gpu_smoke.py) through Triton's interpreter."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from vaekernels import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
sys.path.insert(0, os.path.join(ROOT, "bench"))
STAGES = ["build", "smoke", "parity", "bench", "sanitizer"]


def _plan() -> list[tuple[str, int, str]]:
    """`bash bench/gpu_check.sh plan`, run without a usable Python: it needs none."""
    done = subprocess.run(["bash", SCRIPT, "plan"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": "/nonexistent/python"})
    assert done.returncode == 0 and not done.stderr, done.stderr
    rows = [line.split(" ", 2) for line in done.stdout.splitlines()]
    return [(stage, int(limit), command) for stage, limit, command in rows]


def test_plan_runs_the_stages_in_priority_order_within_nine_minutes():
    plan = _plan()
    assert [stage for stage, _, _ in plan] == STAGES
    assert all(limit > 0 for _, limit, _ in plan) and sum(limit for _, limit, _ in plan) <= 540


def _values_exist(script: str, option: str, value: str) -> None:
    """The values the plan passes to the bench scripts name things those scripts know."""
    if (script, option) == ("bench/run.py", "--competitors"):
        import run

        run._names(value, list(run.BY_NAME), "competitors")  # SystemExit on an unknown name
    elif (script, option) == ("bench/patch_memory.py", "--case"):
        import patch_memory

        assert value in patch_memory.CASES, value
    elif (script, option) == ("bench/overhead.py", "--sizes"):
        import shapes

        assert set(value.split(",")) <= set(shapes.OVERHEAD), value


def test_planned_commands_refer_to_things_that_exist():
    """Every `"$PY" -m MODULE` is importable, every script exists and accepts the options given to it, every
    path named exists (outputs under $NAME aside), and bench/run.py --first-contact's shapes are GPU-size cases."""
    helps = {}
    for stage, _, command in _plan():
        assert "$PY" in command, stage
        for part in re.split(r"\s*(?:&&|;)\s*", command):
            words = shlex.split(part)
            if "$PY" not in words:  # shell bookkeeping between the commands
                assert words[0] == "exit" or re.fullmatch(r"\w+=\$\?", words[0]), (stage, part)
                continue
            program = words[words.index("$PY") + 1:]
            if program[0] == "-m":
                assert importlib.util.find_spec(program[1]), (stage, program[1])
                continue
            script, args = program[0], program[1:]
            assert os.path.isfile(os.path.join(ROOT, script)), (stage, script)
            if script not in helps:
                done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                                      timeout=300)
                assert done.returncode == 0, done.stderr[-2000:]
                helps[script] = done.stdout
            for i, word in enumerate(args):
                if word.startswith("--"):
                    assert re.search(rf"{re.escape(word)}\b", helps[script]), (stage, script, word)
                    if i + 1 < len(args) and not args[i + 1].startswith("-"):
                        _values_exist(script, word, args[i + 1])
            for word in words:
                if "/" in word and not word.startswith("$NAME") and "$" not in word:
                    assert os.path.exists(os.path.join(ROOT, word)), (stage, word)

    import run
    import shapes

    cases = {(c.op, c.set.name, c.shape.label) for c in run.cases(shapes.shape_sets("gpu"), shapes.OPS)}
    assert set(shapes.FIRST_CONTACT) <= cases, set(shapes.FIRST_CONTACT) - cases


def test_first_contact_benchmark_runs(tmp_path):
    """bench/run.py --first-contact end to end: on the CPU, the one FIRST_CONTACT shape that CPU sizes share."""
    out = tmp_path / "run.json"
    done = subprocess.run([sys.executable, "bench/run.py", "--first-contact", "--no-progress", "--competitors",
                           "eager,vaekernels", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {(r["op"], r["set"], r["shape"]) for r in rows} == {("reparameterize_kl", "mlp-vae", "64x128")}
    assert {r["mode"] for r in rows} == {"fwd", "fwdbwd"}
    assert all(r["status"] == "ok" for r in rows if r["competitor"] in ("eager", "vaekernels[torch]")), rows


FAKE_PYTHON = r"""#!/usr/bin/env bash
# stands in for Python: answers the device query, fails the smoke test, hangs in pytest, writes --json/--markdown files
case "$*" in
  *"import torch"*) echo "Test_GPU 90"; exit 0 ;;
  *gpu_smoke.py*) echo "FAILED triton vq_forward(z=float32[2, 8, 5, 7])"; exit 1 ;;
  *pytest*) sleep 300 & echo $! > "$HUNG"; wait; exit 0 ;;
esac
previous=""
for word in "$@"; do
  case $previous in --json|--markdown) echo '{}' > "$word" ;; esac
  previous=$word
done
"""


@pytest.fixture
def checkout(tmp_path):
    """A copy of bench/gpu_check.sh in a bare tree, the parity stage's limit cut to 2 s, and a stand-in Python."""
    (tmp_path / "bench").mkdir()
    text = open(SCRIPT).read()
    assert '"parity 150 ' in text
    (tmp_path / "bench" / "gpu_check.sh").write_text(text.replace('"parity 150 ', '"parity 2 '))
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    (tmp_path / "out").mkdir()
    return tmp_path


def _run(checkout, *args):
    env = {**os.environ, "PYTHON": str(checkout / "python"), "OUT": str(checkout / "out"),
           "HUNG": str(checkout / "hung.pid")}
    env.pop("CUDA_HOME", None)
    return subprocess.run(["bash", str(checkout / "bench" / "gpu_check.sh"), *args], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=120)


def test_first_contact_runs_every_stage_under_its_limit_and_reports_each(checkout):
    done = _run(checkout, "first-contact")
    assert done.returncode == 1, done.stdout + done.stderr
    results = checkout / "bench" / "results"
    (summary_path,) = results.glob("Test_GPU-*-first-contact-summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["device"] == "Test_GPU" and summary["capability"] == "sm_90"
    by = {s["stage"]: s for s in summary["stages"]}
    assert [s["stage"] for s in summary["stages"]] == STAGES
    assert by["build"]["status"] == "passed" and by["bench"]["status"] == "passed"
    assert by["smoke"]["status"] == "failed" and by["smoke"]["exit"] == 1
    # the hung stage is cut at its limit, with the processes it started, and the later stages still run
    assert by["parity"]["status"] == "timed out" and by["parity"]["exit"] == 124 and by["parity"]["seconds"] <= 4
    assert not _alive(int((checkout / "hung.pid").read_text()))
    assert by["sanitizer"]["exit"] is not None
    if not any(os.access(os.path.join(d, "compute-sanitizer"), os.X_OK)
               for d in os.environ["PATH"].split(os.pathsep) + ["/usr/local/cuda/bin"]):
        assert by["sanitizer"]["status"] == "failed" and "compute-sanitizer not found" in done.stdout
    assert "FAILED: smoke parity" in done.stdout and "FAILED triton vq_forward" in done.stdout
    # OUT has the log, the summary and what the stages wrote: at most 8 files
    brought = sorted(p.name for p in (checkout / "out").iterdir())
    assert len(brought) <= 8 and summary_path.name in brought
    assert {f"{summary_path.name[:-len('first-contact-summary.json')]}{n}"
            for n in ("gpu_check.log", "first-contact-bench.json", "first-contact-patch.json",
                      "first-contact-overhead.json", "first-contact-roofline.json")} <= set(brought)
    assert json.loads((checkout / "out" / summary_path.name).read_text()) == summary
    # the summary carries the search's measured-against-predicted times the bench stage wrote (the stand-in's {})
    assert summary["roofline"] == {}


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie that nobody reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stages_can_be_chosen_and_unknown_ones_are_refused(checkout):
    done = _run(checkout, "first-contact", "bench", "build")
    assert done.returncode == 0, done.stdout + done.stderr
    (summary_path,) = (checkout / "bench" / "results").glob("*-first-contact-summary.json")
    assert [s["stage"] for s in json.loads(summary_path.read_text())["stages"]] == ["build", "bench"]
    refused = _run(checkout, "first-contact", "tests")
    assert refused.returncode == 2 and "unknown first-contact stage 'tests' (build smoke parity bench sanitizer)" \
        in refused.stderr
    refused = _run(checkout, "no-such-stage")
    assert refused.returncode == 2 and "unknown stage 'no-such-stage'" in refused.stderr
    for stage in ("install", "info", "tests", "bench", "compile", "sanitizer", "first-contact", "plan"):
        assert stage in refused.stderr


def test_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck is not installed (apt-get install shellcheck)")
def test_script_passes_shellcheck():
    done = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


# ---------------------------------------------------------------------------------- the smoke stage's code


@pytest.mark.skipif(not _backend.availability("triton")[0], reason="needs Triton (its interpreter on the CPU)")
def test_smoke_checks_every_variant_against_the_reference(capsys):
    import gpu_smoke

    assert gpu_smoke.main([]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^triton: \d+ calls, every kernel variant, agree with the reference", out, re.M), out
    if not _backend.availability("cuda")[0]:
        assert "cuda: skipped (" in out


def test_smoke_warm_up_runs_its_shard_of_the_calls_and_ignores_errors(monkeypatch):
    """A warm-up process (GPU only: it fills Triton's cache) runs every n-th call on Triton, whatever fails."""
    import gpu_smoke

    ran = []

    class Failing:
        def __getattr__(self, name):
            def run(*args):
                ran.append(name)
                raise RuntimeError("a compile error")

            return run

    monkeypatch.setattr(_backend, "_module", lambda name: Failing())
    calls = []
    monkeypatch.setattr(gpu_smoke.kernel_variants, "run", lambda call, device: calls.extend(
        call("nearest_code", torch.randn(6, 3), torch.randn(5, 3), 1, "exact") for _ in range(7)))
    gpu_smoke.warm(1, 3, torch.device("cpu"))
    assert len(ran) == 2 and len(calls) == 7 and all(c.shape == (6,) for c in calls)


@pytest.mark.skipif(not _backend.availability("triton")[0], reason="needs Triton (its interpreter on the CPU)")
def test_smoke_stops_at_the_first_wrong_op_and_names_it(monkeypatch, capsys):
    import gpu_smoke

    import vaekernels.triton as vkt

    calls, forward = [], vkt.gaussian_forward

    def wrong_kl_sums(*args):
        calls.append(args[5])
        z, kl = forward(*args)
        return z, (kl + 1 if args[5] == "sum" else kl)

    monkeypatch.setattr(vkt, "gaussian_forward", wrong_kl_sums)
    assert gpu_smoke.main(["--backends", "triton"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^FAILED triton gaussian_forward\(mu=float32\[3, 50\], .*kl_mode='sum'.*\): kl ", out, re.M), out
    assert calls == ["none", "elementwise", "sum"]  # nothing after it ran
