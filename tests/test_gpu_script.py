"""benchmarks/gpu/run.sh, the one-shot GPU run, checked on any machine: --dry-run lists every phase
and runs nothing; with a stand-in for python it runs each phase in order, reports a failing phase
without stopping, and writes summary.md and the archive."""

import os
import subprocess
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu", "run.sh")
PHASES = ("install", "info", "gpu-tests", "gpu-tests-rest", "bench-vitb-fp32", "bench-vitl-bf16",
          "bench-models-vitb-amp")

FAKE_PYTHON = """#!/usr/bin/env bash
case "$*" in
  *get_device_capability*) echo 9.0 ;;
  *"-m gpu tests --deselect"*) echo "1 failed, 3 passed"; exit 1 ;;
  *pytest*) echo "10 passed" ;;
  -) cat > /dev/null; echo "- device: Stand-in GPU" ;;
  *) echo "ran: $*" ;;
esac
"""


def _run(*args, env=None):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_dry_run_prints_every_phase_and_runs_nothing(tmp_path):
    r = _run("--dry-run", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    for phase in PHASES:
        assert f"[{phase}, budget" in r.stdout
    assert "--no-deps --no-build-isolation" in r.stdout and "NOISYNN_BUILD_CUDA=1" in r.stdout
    assert "--amp bfloat16" in r.stdout and "--batch-size 64" in r.stdout and "tar -czf" in r.stdout
    assert not (tmp_path / "out").exists()
    quick = _run("--dry-run", "--quick")
    assert quick.returncode == 0 and "[bench-quick, budget" in quick.stdout and "bench-vitb" not in quick.stdout


def test_bad_argument_is_an_error():
    r = _run("--nonsense")
    assert r.returncode == 2 and "unknown argument --nonsense" in r.stderr


def test_phases_run_in_order_and_a_failure_is_reported(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    r = _run("--out", str(out), env={"PYTHON": str(fake), "NOISYNN_COMMIT": "abc1234"})
    assert r.returncode == 0, r.stderr
    summary = (out / "summary.md").read_text()
    assert "Stand-in GPU" in summary and "commit: abc1234" in summary
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith("| phase")}
    assert list(rows) == list(PHASES)
    assert rows["gpu-tests-rest"] == "failed (exit 1)"
    assert all(status == "ok" for name, status in rows.items() if name != "gpu-tests-rest")
    assert "1 failed, 3 passed" in summary  # the test logs' last lines are in the summary
    with tarfile.open(out / "noisynn-gpu-results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"results/{p}.log" for p in PHASES} <= names and "results/summary.md" in names
