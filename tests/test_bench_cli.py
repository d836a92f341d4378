"""CPU smoke tests of the benchmark CLI (``python -m bench``), end to end on tiny shapes.

They check the plumbing (every requested row is reported, missing peers say so, JSON/markdown/PNG are
written, the numbers are the ones the JSON holds), not performance.
"""
import json
import os

import pytest
import torch

from bench import cli, report
from bench.shapes import resolve_shapes

TINY = ["--H", "32", "--V", "256", "--N", "64", "--seq-len", "16", "--group-size", "4"]


def _run(tmp_path, *extra):
    rc = cli.main([*TINY, "--iters", "2", "--warmup", "0", "--out", str(tmp_path), *extra])
    assert rc == 0
    return json.loads((tmp_path / "results.json").read_text())


def test_end_to_end_writes_every_row_and_file(tmp_path, capsys, monkeypatch):
    # Liger's cross-entropy kernel would run under the Triton interpreter here (slow): it has its
    # own test below; without the interpreter it reports n/a on CPU
    # (patch the check, not the variable: Triton decides interpreter-or-not when a kernel is defined)
    import bench.impls
    monkeypatch.setattr(bench.impls, "_interp", lambda: False)
    data = _run(tmp_path, "--ops", "logprobs,sft,grpo,hpt", "--impls", "ours,eager,liger,cce")
    rows = data["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {
        (op, impl) for op in ("logprobs", "sft", "grpo", "hpt") for impl in ("ours", "eager", "liger", "cce")}
    for r in rows:
        assert r["status"] == "ok" or r["status"].startswith(("n/a", "missing")), r["status"]
    by = {(r["op"], r["impl"]): r for r in rows}
    assert by[("grpo", "cce")]["status"].startswith("n/a")
    assert by[("logprobs", "liger")]["status"].startswith("n/a")
    if not torch.cuda.is_available():
        assert by[("sft", "cce")]["status"].startswith("n/a")
    for key in (("sft", "ours"), ("grpo", "ours"), ("hpt", "eager"), ("logprobs", "eager")):
        r = by[key]
        assert r["status"] == "ok", r
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["err_max"] is not None and r["err_max"] < 2e-2, r["err"]
        assert r["useful_flops"] == 6 * 64 * 32 * 256
    meta = data["meta"]
    for k in ("device", "torch", "triton", "git_commit", "date", "flop_model", "matmul_peak"):
        assert k in meta
    assert meta["matmul_peak"]["tflops"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "| sft | fwd+bwd |" in md and "n/a" in md
    assert (tmp_path / "results.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "TFLOP/s" in out and "results.json" in out


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="checks the Liger cross-entropy adapter under the Triton interpreter (CPU)")
def test_liger_cross_entropy_adapter_under_interpreter(tmp_path):
    data = _run(tmp_path, "--ops", "sft", "--impls", "liger", "--iters", "1", "--no-peak")
    (r,) = data["rows"]
    assert r["status"] == "ok", r["status"]
    assert r["err_max"] < 2e-2, r["err"]


def test_modes_and_fp32(tmp_path):
    data = _run(tmp_path, "--ops", "sft", "--impls", "ours,eager", "--modes", "fwd,bwd",
                "--dtype", "fp32", "--no-peak")
    rows = data["rows"]
    assert [(r["mode"], r["impl"]) for r in rows] == [
        ("fwd", "ours"), ("fwd", "eager"), ("bwd", "ours"), ("bwd", "eager")]
    for r in rows:
        assert r["status"] == "ok" and r["dtype"] == "fp32"
        assert r["err_max"] < 1e-4
        assert r["useful_flops"] == (2 if r["mode"] == "fwd" else 4) * 64 * 32 * 256
        assert r["frac_peak"] is None  # --no-peak


def test_missing_implementations_are_reported_not_dropped(tmp_path, monkeypatch):
    import sys
    import upg_kernels
    monkeypatch.setitem(sys.modules, "liger_kernel", None)        # import fails: not installed
    monkeypatch.delattr(upg_kernels, "unified_policy_loss")      # API not in this checkout
    data = _run(tmp_path, "--ops", "sft,grpo", "--impls", "ours,liger,eager", "--no-peak")
    by = {(r["op"], r["impl"]): r["status"] for r in data["rows"]}
    assert by[("sft", "liger")].startswith("missing: liger-kernel")
    assert by[("grpo", "ours")].startswith("missing: upg_kernels.unified_policy_loss")
    assert by[("grpo", "eager")] == "ok"


def test_deadline_reports_skipped_rows(tmp_path):
    data = _run(tmp_path, "--ops", "sft,grpo", "--impls", "ours,eager", "--deadline", "1e-9", "--no-peak")
    assert len(data["rows"]) == 4
    assert all(r["status"] == "skipped: time budget" for r in data["rows"])


def test_render_and_list(tmp_path, capsys):
    _run(tmp_path / "a", "--ops", "sft", "--impls", "eager", "--no-peak", "--no-ref")
    assert cli.main(["--render", str(tmp_path / "a" / "results.json"), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "results.md").exists()
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "llama3-8b" in out and "gemma2-2b" in out and "liger" in out


def test_shapes():
    s = resolve_shapes("llama3-8b,gemma2-2b")
    assert [(x.H, x.V, x.N) for x in s] == [(4096, 128256, 8192), (2304, 256000, 8192)]
    assert [x.N for x in resolve_shapes("qwen2.5-7b", N="table")] == [8192, 32768]
    assert [x.N for x in resolve_shapes("llama3-8b", N="1024,2048")] == [1024, 2048]
    c = resolve_shapes(None, H=8, V=16, N="32")
    assert [(x.H, x.V, x.N) for x in c] == [(8, 16, 32)]
    assert [x.name for x in resolve_shapes("all")] == ["llama3-8b", "qwen2.5-7b", "gemma2-2b",
                                                      "qwen2.5-0.5b", "qwen3.5-27b"]
    assert [(x.H, x.V, x.N) for x in resolve_shapes("qwen3.5-27b")] == [(5120, 248320, 8192)]
    with pytest.raises(ValueError):
        resolve_shapes("gpt5")
    with pytest.raises(ValueError):
        resolve_shapes(None, H=8)


def test_terminal_table_marks_non_ok_rows():
    rows = [{"op": "sft", "mode": "fwd+bwd", "shape": "x", "N": 1, "dtype": "bf16", "impl": "cce",
             "status": "missing: cut-cross-entropy not installed"}]
    table = report.terminal_table(rows)
    assert "missing: cut-cross-entropy not installed" in table


def test_gpu_run_script_is_valid_bash_and_its_wheels_are_there():
    import pathlib
    import shutil
    import subprocess
    root = pathlib.Path(__file__).resolve().parent.parent
    script = root / "bench" / "gpu_run.sh"
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    wheels = sorted(p.name for p in (root / "bench" / "wheels").glob("*.whl"))
    assert any(w.startswith("liger_kernel-") for w in wheels), wheels
    assert any(w.startswith("cut_cross_entropy-") for w in wheels), wheels


def test_missing_matplotlib_is_said_not_silent(tmp_path, capsys, monkeypatch):
    """Without matplotlib the markdown and JSON are still written and stderr says why no PNG."""
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # makes `import matplotlib` raise ImportError
    rows = [{"op": "sft", "mode": "fwd+bwd", "dtype": "fp32", "impl": "ours", "shape": "tiny", "N": 64,
             "status": "ok", "median_ms": 1.0, "mem_peak_bytes": 1}]
    assert report.plot({}, rows, tmp_path / report.PNG_NAME) is None
    err = capsys.readouterr().err
    assert "results.png" in err and "matplotlib" in err
    assert not (tmp_path / report.PNG_NAME).exists()


def test_cpu_rows_are_timed_interleaved(tmp_path, monkeypatch):
    """On CPU the impls of a row are timed in alternating rounds (a load change hits both), with the
    per-round ratio to the first impl in each row."""
    from bench import measure
    seen = []
    real_call = measure.call

    def spy(impl, op, x, mode):
        seen.append(impl.name)
        return real_call(impl, op, x, mode)
    monkeypatch.setattr(measure, "call", spy)
    data = _run(tmp_path, "--ops", "grpo", "--modes", "fwd", "--impls", "eager,ours", "--no-ref")
    # 2 rounds, the order alternating; then one traced memory call per impl
    assert seen[-6:] == ["eager", "ours", "ours", "eager", "eager", "ours"]
    rows = {r["impl"]: r for r in data["rows"]}
    assert rows["ours"]["timing"] == "interleaved" and len(rows["ours"]["pair_ratios"]) == 2
    assert rows["eager"]["pair_ratios"] == [1.0, 1.0]
    assert all(r["mem_peak_bytes"] > 0 for r in rows.values())          # traced on CPU
