"""Path names and selection (kernels/paths.py, kernels/select.py): pins (argument, UPG_KERNELS_PATH,
deterministic), the selection with injected timings (fastest chosen, memory hit, disk round trip,
corrupted cache ignored with a warning, version mismatch, key buckets, a shipped table), the dz tile
(timed as backward parts, reaching the dz launch, pinned by UPG_KERNELS_TRITON_DZ_CONFIG, cached, in
the tuning table; format-1 caches ignored), the CPU's row-sample measuring, rank 0's choice in a
2-process gloo job, and every path against the float64 reference (torch backend, and the Triton
backends under the interpreter)."""
import json
import os

import pytest
import torch

from upg_kernels import LossConfig, token_logprobs, unified_policy_loss
from upg_kernels.kernels import paths, select
from upg_kernels.kernels.backends import triton_available

from _spawn import free_port
from test_losses import make_case


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """An empty cache directory and selection state for every test; measuring on."""
    monkeypatch.setenv("UPG_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    for v in ("UPG_KERNELS_PATH", "UPG_KERNELS_DETERMINISTIC", "UPG_KERNELS_PATH_TABLE",
              "UPG_KERNELS_GRAD_IN_FORWARD", "UPG_KERNELS_TRITON_DZ_CONFIG"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("UPG_KERNELS_AUTOTUNE", "measure")
    select.clear()
    yield
    select.clear()
    select.set_timer(None)
    select.force(None)


class FakeClock:
    """Injected timings: seconds per path; counts the timed runs (nothing is executed)."""
    def __init__(self, times):
        self.times, self.calls = dict(times), []

    def __call__(self, path, run):
        self.calls.append(path)
        return self.times[path]


def _loss_call(cfg_name="grpo", seed=4, dtype=torch.float64, backend="torch", **kw):
    cfg, hid, w, b, tgt, kwargs = make_case(cfg_name, seed, dtype=dtype)
    h = hid.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    out = unified_policy_loss(h, ww, tgt, config=cfg, backend=backend, **kwargs, **kw)
    out.loss.backward()
    return out, h.grad, ww.grad


# ------------------------------------------------------------------------------ names and pins
def test_every_path_name_has_one_row_and_its_docs(monkeypatch):
    """The names are upg_kernels/path_names.py; the table of kernels/paths.py has a row for each (no
    more, same order), UPG_KERNELS_PATH accepts them and `auto` (nothing else), and docs/kernels.md
    names each."""
    from upg_kernels import path_names, settings
    assert path_names.PATH_NAMES == ("two_pass", "two_pass_gemm_forward", "one_pass")
    assert tuple(paths.PATHS) == path_names.PATH_NAMES
    assert all(paths.PATHS[n].name == n for n in paths.PATHS)
    for n in ("auto",) + path_names.PATH_NAMES:
        monkeypatch.setenv("UPG_KERNELS_PATH", n.upper())
        assert settings.PATH.get() == n
    monkeypatch.setenv("UPG_KERNELS_PATH", "fast")
    with pytest.raises(ValueError, match="UPG_KERNELS_PATH"):
        settings.PATH.get()
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "kernels.md")).read()
    for n in path_names.PATH_NAMES:
        assert f"`{n}`" in doc


def test_bad_path_names_the_argument():
    with pytest.raises(ValueError, match="path must be None or one of"):
        _loss_call(path="fast")
    with pytest.raises(ValueError, match="needs a Triton backend"):
        _loss_call(path="two_pass_gemm_forward")
    with pytest.raises(ValueError, match="contradicts"):
        _loss_call(path="two_pass", grad_in_forward=True)
    h = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(ValueError, match="needs a loss with gradients"):
        token_logprobs(h, torch.randn(11, 8), torch.tensor([1, 2, 3]), backend="torch", path="one_pass")


def test_pins(monkeypatch):
    """The argument wins, then UPG_KERNELS_DETERMINISTIC, then UPG_KERNELS_PATH; nothing is timed."""
    clock = FakeClock({"two_pass": 1.0, "one_pass": 2.0})
    select.set_timer(clock)
    monkeypatch.setenv("UPG_KERNELS_PATH", "one_pass")
    assert paths.pinned(None) == ("one_pass", "UPG_KERNELS_PATH")
    assert paths.pinned("two_pass") == ("two_pass", "path=")
    monkeypatch.setenv("UPG_KERNELS_DETERMINISTIC", "1")
    assert paths.pinned(None) == ("two_pass", "UPG_KERNELS_DETERMINISTIC")
    monkeypatch.delenv("UPG_KERNELS_DETERMINISTIC")
    _loss_call()
    assert clock.calls == []
    # a pin that does not apply to a call (no one-pass for token_logprobs) runs two_pass
    assert paths.fit("one_pass", paths.eligible(triton=False, loss=False, grads=True)) == "two_pass"


def test_bad_env_path_names_the_variable(monkeypatch):
    monkeypatch.setenv("UPG_KERNELS_PATH", "fastest")
    with pytest.raises(ValueError, match="UPG_KERNELS_PATH"):
        _loss_call()


def test_grad_in_forward_alias_matches_path(monkeypatch):
    """grad_in_forward=True is path='one_pass': the same values and gradients."""
    o1, h1, w1 = _loss_call(grad_in_forward=True)
    o2, h2, w2 = _loss_call(path="one_pass")
    assert torch.equal(o1.loss, o2.loss) and torch.equal(h1, h2) and torch.equal(w1, w2)


# ------------------------------------------------------------------------------ selection
def _choose(clock, k="dev|k", options=("two_pass", "one_pass")):
    select.set_timer(clock)
    runs = {p: (lambda: None) for p in options}
    return select.choose(k, options, lambda: runs)


def test_fastest_chosen_then_memory_hit():
    clock = FakeClock({"two_pass": 3.0, "one_pass": 1.0})
    assert _choose(clock) == "one_pass"
    n = len(clock.calls)
    assert 2 <= n <= 2 * select.ITERS      # bounded: stops once the budget is spent
    assert _choose(clock) == "one_pass" and len(clock.calls) == n      # memory: nothing timed


def test_budget_stops_early():
    clock = FakeClock({"two_pass": 0.8, "one_pass": 0.9})
    _choose(clock)
    assert clock.calls == ["two_pass", "one_pass"]     # one round: 1.7 s > BUDGET_S


def test_disk_round_trip(tmp_path):
    clock = FakeClock({"two_pass": 1e-3, "one_pass": 2e-3})
    assert _choose(clock) == "two_pass"
    data = json.loads(select.cache_file().read_text())
    assert data["versions"] == select.versions()
    assert data["entries"]["dev|k"]["path"] == "two_pass"
    assert set(data["entries"]["dev|k"]["times_ms"]) == {"two_pass", "one_pass"}
    select.clear()
    clock2 = FakeClock({"two_pass": 9.0, "one_pass": 1.0})
    assert _choose(clock2) == "two_pass" and clock2.calls == []     # read from disk, not measured
    assert not list(select.cache_file().parent.glob(".paths-*"))    # no temporary file left


def test_corrupted_cache_is_ignored_with_a_warning():
    f = select.cache_file()
    f.parent.mkdir(parents=True)
    f.write_text('{"format": 1, "entries": [')
    clock = FakeClock({"two_pass": 2.0, "one_pass": 1.0})
    with pytest.warns(RuntimeWarning, match="unreadable path file"):
        assert _choose(clock) == "one_pass"
    assert json.loads(f.read_text())["entries"]["dev|k"]["path"] == "one_pass"   # rewritten


def test_other_versions_measure_again():
    f = select.cache_file()
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"format": 1, "versions": "upg_kernels 0.0.0; torch 1.0; triton none",
                             "entries": {"dev|k": {"path": "two_pass"}}}))
    clock = FakeClock({"two_pass": 2.0, "one_pass": 1.0})
    assert _choose(clock) == "one_pass" and clock.calls


def test_table_wins_and_bad_table_is_refused(tmp_path, monkeypatch):
    t = tmp_path / "table.json"
    t.write_text(json.dumps({"entries": {"dev|k": {"path": "two_pass"}}}))
    monkeypatch.setenv("UPG_KERNELS_PATH_TABLE", str(t))
    clock = FakeClock({"two_pass": 2.0, "one_pass": 1.0})
    assert _choose(clock) == "two_pass" and clock.calls == []
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"entries": {"dev|k": "three_pass"}}))
    with pytest.raises(ValueError, match="unknown paths"):
        select.load_table(bad)


def test_key_buckets():
    cpu = torch.device("cpu")
    k = [select.key(cpu, torch.float32, 64, 1000, m, "hw", False, "torch", True) for m in (33, 64, 65)]
    assert k[0] == k[1] != k[2]
    assert "M64" in k[0] and "M128" in k[2]
    assert select.key(cpu, torch.float32, 64, 1000, 64, "hw", True, "torch", True) != k[0]
    assert select.key(cpu, torch.float32, 64, 1000, 64, "", False, "torch", True) != k[0]
    assert select.key(cpu, torch.bfloat16, 64, 1000, 64, "hw", False, "torch", True) != k[0]
    bf = select.key(cpu, torch.bfloat16, 64, 1000, 64, "hw", False, "torch", True)
    assert select.key(cpu, torch.bfloat16, 64, 1000, 64, "hw", False, "torch", True, torch.bfloat16) == bf
    assert select.key(cpu, torch.bfloat16, 64, 1000, 64, "hw", False, "torch", True, torch.float32) != bf
    assert select.m_bucket(0) == 0 and select.m_bucket(1) == 1 and select.m_bucket(1025) == 2048


def test_one_pass_plan_settings_make_another_key(monkeypatch):
    """Another one-pass budget or dW mode gives other chunks, hence another time: another key."""
    from upg_kernels.kernels import one_pass
    cpu = torch.device("cpu")
    base = one_pass.plan_key(cpu)
    try:
        one_pass.set_one_pass_bytes(1 << 20)
        assert one_pass.plan_key(cpu) != base
    finally:
        one_pass.set_one_pass_bytes(None)
    assert one_pass.plan_key(cpu) == base
    monkeypatch.setenv("UPG_KERNELS_ONE_PASS_DW", "compensated")
    assert one_pass.plan_key(cpu) != base


def test_call_measures_each_eligible_path_once_per_key():
    """A loss call on the torch backend: two_pass and one_pass timed (no gemm forward on torch);
    the second call with the same key measures nothing; no gradients: nothing to choose."""
    clock = FakeClock({"two_pass": 2.0, "one_pass": 1.0})
    select.set_timer(clock)
    _loss_call()
    assert set(clock.calls) == {"two_pass", "one_pass"}
    assert list(select.choices().values()) == ["one_pass"]
    n = len(clock.calls)
    _loss_call()
    assert len(clock.calls) == n
    cfg, hid, w, b, tgt, kw = make_case("grpo", 4, dtype=torch.float64)
    with torch.no_grad():
        unified_policy_loss(hid, w, tgt, config=cfg, backend="torch", **kw)
    assert len(clock.calls) == n


def test_model_mode_rule(monkeypatch):
    """Without timing: one_pass for a loss with gradients at N x V >= MODEL_MIN_LOGITS, else two_pass."""
    monkeypatch.setenv("UPG_KERNELS_AUTOTUNE", "model")
    from upg_kernels.kernels.contract import LogprobParams
    p = LogprobParams()
    for N, want in ((4, "two_pass"), (select.MODEL_MIN_LOGITS // 16, "one_pass")):
        h = torch.empty(N, 2)
        w = torch.empty(16, 2)
        t = torch.zeros(N, dtype=torch.long)
        got = select.resolve(None, backend="torch", hidden=h, weight=w, bias=None, targets=t, p=p,
                             loss=True, grads="hw", entropy=False)
        assert got == (want, None)
        got = select.resolve(None, backend="torch", hidden=h, weight=w, bias=None, targets=t, p=p,
                             loss=False, grads="hw", entropy=False)
        assert got == ("two_pass", None)


# ------------------------------------------------------------------------------ every path, float64
def _ref_loss(cfg_name, N):
    """The float64 reference: the torch backend's two-pass path in float64 (itself checked against
    materialized logits in test_losses.py)."""
    return _loss_call(cfg_name, N, path="two_pass")


@pytest.mark.parametrize("cfg_name", ["grpo", "gspo", "sft"])
@pytest.mark.parametrize("path", ["two_pass", "one_pass"])
def test_torch_paths_equal_float64(cfg_name, path):
    ref = _ref_loss(cfg_name, 5)
    got = _loss_call(cfg_name, 5, path=path)
    assert torch.allclose(got[0].loss, ref[0].loss, rtol=1e-10, atol=1e-12)
    for a, r in zip(got[1:], ref[1:]):
        assert torch.allclose(a, r, rtol=1e-9, atol=1e-11)


needs_triton = pytest.mark.skipif(not triton_available() or (not torch.cuda.is_available()
                                  and os.environ.get("TRITON_INTERPRET") != "1"),
                                  reason="the Triton backends need CUDA or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("path", paths.PATH_NAMES)
def test_triton_paths_equal_float64(path):
    """float32 Triton paths (interpreter on the CPU) against the float64 torch reference, within the
    documented float32 tolerance (docs/kernels.md: 2e-4 relative)."""
    cfg, hid, w, b, tgt, kw = make_case("grpo", 3, dtype=torch.float64)
    ref = _ref_loss("grpo", 3)
    h = hid.float().clone().requires_grad_(True)
    ww = w.float().clone().requires_grad_(True)
    kw32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.float64 else v)
            for k, v in kw.items()}
    out = unified_policy_loss(h, ww, tgt, config=cfg, backend="triton", path=path, **kw32)
    out.loss.backward()
    assert float((out.loss.detach().double() - ref[0].loss.detach()).abs()) <= 2e-4 * max(1.0, float(ref[0].loss.detach().abs()))
    for a, r in ((h.grad, ref[1]), (ww.grad, ref[2])):
        assert float((a.double() - r).abs().max()) <= 2e-4 * float(r.abs().max())


@needs_triton
@pytest.mark.parametrize("path", ["two_pass", "two_pass_gemm_forward"])
def test_token_logprobs_paths(path):
    torch.manual_seed(0)
    h = torch.randn(7, 32, dtype=torch.float64)
    w = torch.randn(67, 32, dtype=torch.float64) * 0.3
    t = torch.randint(0, 67, (7,))
    t[2] = -100
    ref = torch.log_softmax(h @ w.T, -1).gather(1, t.clamp(min=0)[:, None])[:, 0] * (t != -100)
    got = token_logprobs(h.float(), w.float(), t, backend="triton", path=path)
    assert float((got.double() - ref).abs().max()) <= 2e-4 * float(ref.abs().max())


# ------------------------------------------------------------------------------ distributed
def _worker(rank, port, out_dir):
    import torch.distributed as dist
    os.environ["UPG_KERNELS_CACHE_DIR"] = os.path.join(out_dir, f"cache{rank}")
    os.environ["UPG_KERNELS_AUTOTUNE"] = "measure"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # each rank's timings disagree: rank 0 finds one_pass fastest, rank 1 two_pass
    times = {"two_pass": 2.0, "one_pass": 1.0} if rank == 0 else {"two_pass": 1.0, "one_pass": 2.0}
    clock = FakeClock(times)
    select.set_timer(clock)
    got = select.choose("dev|k", ("two_pass", "one_pass"),
                        lambda: {p: (lambda: None) for p in ("two_pass", "one_pass")})
    k = select.key(torch.device("cpu"), torch.float32, 8, 16, 123, "hw", False, "torch", True)
    # the dz tile too: rank 0 finds 128x64 fastest, rank 1 128x128
    tiles = {"fwd:two_pass": 1.0, "bwd:128x128": 2.0 if rank == 0 else 0.5,
             "bwd:128x64": 0.5 if rank == 0 else 2.0, "one_pass": 9.0}
    select.set_timer(FakeClock(tiles))
    got2 = select.choose("dev|t", ("two_pass@128x128", "two_pass@128x64", "one_pass"),
                         lambda: {p: (lambda: None) for p in tiles})
    with open(os.path.join(out_dir, f"r{rank}.json"), "w") as f:
        json.dump({"choice": got, "timed": len(clock.calls), "key": k, "tile_choice": got2}, f)
    dist.destroy_process_group()


def test_rank0_choice_is_broadcast(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    assert r[0]["choice"] == r[1]["choice"] == "one_pass"
    assert r[0]["tile_choice"] == r[1]["tile_choice"] == "two_pass@128x64"     # rank 0's tile
    assert r[0]["timed"] > 0 and r[1]["timed"] == 0        # only rank 0 measures
    assert "Many" in r[0]["key"] and "Many" in r[1]["key"]                         # distributed keys drop M's bucket


def _worker_rank_local(rank, port, out_dir):
    """Rank 1's call cannot take the one-pass path (its budget at its M says no): before, rank 1 had
    one option and returned while rank 0 waited in the broadcast. Now both reach it."""
    import torch.distributed as dist
    from upg_kernels.kernels.contract import LogprobParams
    os.environ["UPG_KERNELS_CACHE_DIR"] = os.path.join(out_dir, f"cache{rank}")
    os.environ["UPG_KERNELS_AUTOTUNE"] = "measure"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=__import__("datetime").timedelta(seconds=60))
    clock = FakeClock({"two_pass": 2.0, "one_pass": 1.0})
    select.set_timer(clock)
    g = torch.Generator().manual_seed(rank)
    N = 24 + 8 * rank                       # the ranks' calls differ in rows too
    h, w = torch.randn(N, 8, generator=g), torch.randn(40, 8, generator=g)
    t = torch.randint(0, 40, (N,), generator=g)
    got = [select.resolve(None, backend="torch", hidden=h, weight=w, bias=None, targets=t, p=LogprobParams(),
                          loss=True, grads="hw", entropy=False, one_pass_ok=lambda M: rank == 0)
           for _ in range(2)]               # the second call: from memory on both ranks
    timed = len(clock.calls)
    # a rank without rows at the first call of a key (another V: another key) reaches the broadcast too;
    # rank 0 without rows has nothing to time: the rule (two_pass for no rows) for every rank
    empty = {}
    for V, rows0, rows1 in ((41, 24, 0), (42, 0, 24)):
        n = rows0 if rank == 0 else rows1
        h, w = torch.randn(n, 8, generator=g), torch.randn(V, 8, generator=g)
        t = torch.randint(0, V, (n,), generator=g)
        empty[str(V)] = select.resolve(None, backend="torch", hidden=h, weight=w, bias=None, targets=t,
                                       p=LogprobParams(), loss=True, grads="hw", entropy=False)
    with open(os.path.join(out_dir, f"l{rank}.json"), "w") as f:
        json.dump({"got": got, "timed": timed, "empty": empty}, f)
    dist.destroy_process_group()


def test_rank_local_eligibility_reaches_the_same_broadcast(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_worker_rank_local, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [json.loads((tmp_path / f"l{i}.json").read_text()) for i in range(2)]
    assert r[0]["got"] == [["one_pass", None]] * 2          # rank 0 measured and took its fastest
    assert r[1]["got"] == [["two_pass", None]] * 2          # rank 1 cannot take it: two-pass
    assert r[0]["timed"] > 0 and r[1]["timed"] == 0
    assert r[0]["empty"]["41"] == ["one_pass", None] and r[1]["empty"]["41"] == ["two_pass", None]
    assert r[0]["empty"]["42"] == r[1]["empty"]["42"] == ["two_pass", None]


# ------------------------------------------------------------------------------ the tuning CLI
def test_tune_cli_writes_a_loadable_table(tmp_path, monkeypatch):
    from upg_kernels import tune
    clock = FakeClock({"two_pass": 2.0, "one_pass": 1.0})
    select.set_timer(clock)
    out = tmp_path / "table.json"
    assert tune.main(["--shapes", "16x37", "--N", "9", "--dtype", "fp32", "--device", "cpu",
                      "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    (k, v), = data["entries"].items()
    assert "H16|V37|M16" in k and v["path"] == "one_pass" and set(v["times_ms"]) == {"two_pass", "one_pass"}
    select.clear()
    assert select.load_table(out) == 1
    with pytest.raises(ValueError, match="neither HxV"):
        tune.parse_shape("huge")


# ------------------------------------------------------------------------------ the dz tile
TILE_TIMES = {"fwd:two_pass": 1.0, "fwd:two_pass_gemm_forward": 1.5, "bwd:128x128": 2.0,
              "bwd:128x64": 1.0, "one_pass": 5.0}


def _bf16_triton_loss(N=9, H=64, V=37):
    """A bf16 GRPO loss on the triton backend (interpreter): the dz tile applies (H % 64 == 0)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(V, H, generator=g) * 0.1).bfloat16().requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g)
    out = unified_policy_loss(h, w, t, config=LossConfig.preset("grpo"), backend="triton",
                              advantages=torch.randn(N, generator=g))
    out.loss.backward()
    return out, h.grad, w.grad


@pytest.fixture
def dz_spy(monkeypatch):
    """The dz tile in effect at every dz launch of the GEMM backward."""
    from upg_kernels.kernels import gemm_backward, triton_dz
    seen, orig = [], gemm_backward.dz_block

    def spy(*a, **k):
        seen.append(triton_dz.scoped_tile())
        return orig(*a, **k)
    monkeypatch.setattr(gemm_backward, "dz_block", spy)
    return seen


def test_totals_sum_the_parts():
    parts = {"fwd:two_pass": 1.0, "bwd:128x128": 2.0, "bwd:128x64": 0.5, "one_pass": 3.0}
    got = select.totals(parts, ("two_pass@128x128", "two_pass@128x64",
                                "two_pass_gemm_forward@128x64", "one_pass"))
    assert got == {"two_pass@128x128": 3.0, "two_pass@128x64": 1.5, "one_pass": 3.0}   # no gemm fwd part


@needs_triton
def test_faster_tile_wins_and_reaches_the_dz_launch(dz_spy):
    """bf16 on the triton backend: the forwards, each tile's backward and the one-pass path are
    timed as parts; the fastest sum wins; the chosen tile is in effect at every dz launch."""
    from upg_kernels.kernels import triton_dz
    clock = FakeClock(TILE_TIMES)
    select.set_timer(clock)
    _bf16_triton_loss()
    assert set(clock.calls) == set(TILE_TIMES)
    (k, c), = select.choices().items()
    assert c == "two_pass@128x64" and "|bfloat16|H64|" in k
    assert dz_spy and set(dz_spy) == {"128x64"}
    with triton_dz.dz_tile_scope("128x64"):
        assert triton_dz.dz_config(torch.bfloat16, 4096, gpu=True) == triton_dz.DZ_TILES["128x64"]
    assert triton_dz.dz_config(torch.bfloat16, 4096, gpu=True) == triton_dz.DZ_TILES[triton_dz.DZ_DEFAULT]
    # the other tile faster: it wins (fresh selection)
    select.clear()
    dz_spy.clear()
    select.set_timer(FakeClock({**TILE_TIMES, "bwd:128x128": 0.5}))
    select.force("measure", select.cache_file().parent / "other")
    _bf16_triton_loss()
    assert list(select.choices().values()) == ["two_pass@128x128"] and set(dz_spy) == {"128x128"}


@needs_triton
def test_token_logprobs_times_no_one_pass(dz_spy):
    """token_logprobs with gradients (bf16, triton): the forwards and the tiles are timed, never the
    one-pass path it cannot take (the injected clock has no time for it: a timed run would raise)."""
    clock = FakeClock({k: v for k, v in TILE_TIMES.items() if k != "one_pass"})
    select.set_timer(clock)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(9, 64, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(37, 64, generator=g) * 0.1).bfloat16()
    token_logprobs(h, w, torch.randint(0, 37, (9,), generator=g), backend="triton").sum().backward()
    assert set(clock.calls) == set(TILE_TIMES) - {"one_pass"}
    assert list(select.choices().values()) == ["two_pass@128x64"] and set(dz_spy) == {"128x64"}
    assert select.parts_of(("two_pass@128x64", "one_pass", "two_pass")) == {
        "fwd:two_pass", "bwd:128x64", "one_pass", "two_pass"}


@needs_triton
def test_tile_gradients_equal_the_default(monkeypatch):
    """The tile is a scheduling choice: the chosen tile's values and gradients equal those of the
    pinned two_pass path (default tile)."""
    select.set_timer(FakeClock(TILE_TIMES))
    got = _bf16_triton_loss()
    assert list(select.choices().values()) == ["two_pass@128x64"]
    monkeypatch.setenv("UPG_KERNELS_PATH", "two_pass")
    pinned = _bf16_triton_loss()
    assert torch.equal(got[0].loss, pinned[0].loss)
    assert torch.equal(got[1], pinned[1]) and torch.equal(got[2], pinned[2])


@needs_triton
def test_tile_pin_skips_timing_the_tile(monkeypatch, dz_spy):
    """UPG_KERNELS_TRITON_DZ_CONFIG pins the tile: only the paths are timed (whole), no tile rides
    on the call, and dz_config takes the pinned tile."""
    from upg_kernels.kernels import triton_dz
    monkeypatch.setenv("UPG_KERNELS_TRITON_DZ_CONFIG", "128x64")
    clock = FakeClock({"two_pass": 2.0, "two_pass_gemm_forward": 3.0, "one_pass": 4.0})
    select.set_timer(clock)
    _bf16_triton_loss()
    assert set(clock.calls) == {"two_pass", "two_pass_gemm_forward", "one_pass"}
    assert list(select.choices().values()) == ["two_pass"]
    assert dz_spy and set(dz_spy) == {None}
    assert triton_dz.dz_config(torch.bfloat16, 4096, gpu=True) == triton_dz.DZ_TILES["128x64"]
    with triton_dz.dz_tile_scope("128x128"):      # the pin wins over a scoped choice
        assert triton_dz.dz_config(torch.bfloat16, 4096, gpu=True) == triton_dz.DZ_TILES["128x64"]
    with pytest.raises(ValueError, match="dz tile must be"):
        with triton_dz.dz_tile_scope("64x64"):
            pass


def test_tile_cache_round_trip():
    options = ("two_pass@128x128", "two_pass@128x64", "one_pass")
    parts = {"fwd:two_pass": 1.0, "bwd:128x128": 1.0, "bwd:128x64": 0.3, "one_pass": 2.0}
    clock = FakeClock(parts)
    select.set_timer(clock)
    assert select.choose("dev|t", options, lambda: {p: (lambda: None) for p in parts}) == "two_pass@128x64"
    data = json.loads(select.cache_file().read_text())
    assert data["format"] == select.CACHE_FORMAT == 2
    e = data["entries"]["dev|t"]
    assert e["path"] == "two_pass" and e["dz_tile"] == "128x64"
    assert e["times_ms"] == {"two_pass@128x128": 2000.0, "two_pass@128x64": 1300.0, "one_pass": 2000.0}
    select.clear()
    clock2 = FakeClock({p: 1.0 for p in parts})
    assert select.choose("dev|t", options, lambda: {p: (lambda: None) for p in parts}) == "two_pass@128x64"
    assert clock2.calls == [] and clock.calls          # read from disk, not measured
    # with the tile pinned (no tiles in the options) the cached entry gives its path
    select.clear()
    assert select.choose("dev|t", ("two_pass", "one_pass"), lambda: {}) == "two_pass"


def test_format_1_cache_is_ignored():
    """A cache of format 1 (no dz tiles), even of these versions, is measured again and rewritten."""
    f = select.cache_file()
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"format": 1, "versions": select.versions(),
                             "entries": {"dev|k": {"path": "two_pass"}, "dev|j": {"path": "two_pass"}}}))
    clock = FakeClock({"two_pass": 2.0, "one_pass": 1.0})
    assert _choose(clock) == "one_pass" and clock.calls
    data = json.loads(f.read_text())
    assert data["format"] == 2 and set(data["entries"]) == {"dev|k"}      # old entries dropped


@needs_triton
def test_tune_table_round_trips_the_tile(tmp_path):
    from upg_kernels import tune
    select.set_timer(FakeClock(TILE_TIMES))
    out = tmp_path / "table.json"
    assert tune.main(["--shapes", "64x37", "--N", "9", "--dtype", "bf16", "--device", "cpu",
                      "--backend", "triton", "--out", str(out)]) == 0
    (k, v), = json.loads(out.read_text())["entries"].items()
    assert v["path"] == "two_pass" and v["dz_tile"] == "128x64"
    select.clear()
    select.set_timer(FakeClock({}))        # a timed run would raise KeyError
    assert select.load_table(out) == 1
    opts = ("two_pass@128x128", "two_pass@128x64", "one_pass")
    assert select.choose(k, opts, lambda: {}) == "two_pass@128x64"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"entries": {k: {"path": "two_pass", "dz_tile": 64}}}))
    with pytest.raises(ValueError, match="not a table"):
        select.load_table(bad)


# ------------------------------------------------------------------------------ the CPU: row samples
def test_cpu_auto_measures_large_calls_on_a_row_sample(monkeypatch):
    """auto on the CPU: tiny calls take the rule (nothing timed); from CPU_MEASURE_MIN_WORK the
    paths are timed (injected timings: on one sample, no probe run), the times scaled to the call."""
    monkeypatch.setenv("UPG_KERNELS_AUTOTUNE", "auto")
    clock = FakeClock({"two_pass": 2.0, "one_pass": 1.0})
    select.set_timer(clock)
    _loss_call()
    assert clock.calls == [] and not select.measured()
    monkeypatch.setattr(select, "CPU_MEASURE_MIN_WORK", 1)
    select.clear()
    out = _loss_call()
    assert set(clock.calls) == {"two_pass", "one_pass"}
    (k, e), = select.measured().items()
    assert k.startswith(f"cpu{torch.get_num_threads()}t|") and e["path"] == "one_pass"
    M = int((make_case("grpo", 4, dtype=torch.float64)[4] != -100).sum())
    R = M if M <= 2 * select.PROBE_ROWS else 2 * select.PROBE_ROWS
    assert e["sample_rows"] == R and e["times_ms"]["one_pass"] == pytest.approx(1e3 * M / R)
    assert torch.isfinite(out[0].loss)


def test_cpu_sample_is_sized_by_the_probe(monkeypatch):
    """Real timing on the CPU: the probe runs each part once on PROBE_ROWS rows and sizes the sample
    (2 x PROBE_ROWS .. M rows), timed without another warm-up and scaled by M / rows; a probe over
    PROBE_MAX_S stops measuring: the rule, kept in memory only."""
    from upg_kernels.kernels.backends import get_backend
    from upg_kernels.kernels.contract import LogprobParams
    g = torch.Generator().manual_seed(1)
    N, H, V = 300, 32, 200
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.2
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -100
    M = int((t != -100).sum())
    p = LogprobParams()
    be = get_backend("torch")
    monkeypatch.setattr(select, "PROBE_MAX_S", 60.0)     # a loaded machine: never too slow here
    for run_s, R in ((1e-6, 2 * select.PROBE_ROWS), (1e3, M)):
        monkeypatch.setattr(select, "SAMPLE_RUN_S", run_s)
        s = select.sample_runners(be, h, w, None, t, p, t != -100, M, grads="hw", entropy=True)
        assert s.rows == R and s.M == M and s.warmed and set(s.runners) == {"two_pass", "one_pass"}
    assert s.estimate({"two_pass": 0.5}) == {"two_pass": 0.5}
    assert select.Sample({}, 16, 64).estimate({"two_pass": 0.5}) == {"two_pass": 2.0}
    monkeypatch.setattr(select, "PROBE_MAX_S", 0.0)
    assert select.sample_runners(be, h, w, None, t, p, t != -100, M, grads="hw", entropy=True) is None
    got = select.resolve(None, backend="torch", hidden=h.requires_grad_(True), weight=w, bias=None,
                         targets=t, p=p, loss=True, grads="h", entropy=True)
    assert got == ("two_pass", None)            # the rule (N x V < MODEL_MIN_LOGITS)
    assert not select.measured() and not select.cache_file().exists()
