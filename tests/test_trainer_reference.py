"""KL to a frozen reference model: ref log-probs, the KL metric, chi2/hellinger SFT, resume."""
import copy
import json
import math

import pytest
import torch

from upg_trainer.checkpoint import read_metrics

from test_trainer_steps import make_trainer
from trainer_fakes import AnswerEngine, spy  # noqa: F401  (spy: a fixture)

KL = {"loss.overrides": "{kl_coef: 0.1}", "train.lr": 5e-2}


def _capture_rows(tr):
    """The row batches whose reference log-probs the trainer computes."""
    seen = []
    real = tr.fill_logprobs

    def fill(micro, key, *a, **kw):
        if key == "ref_logprobs":
            seen.extend(mb for mb, _ in micro)
        return real(micro, key, *a, **kw)
    tr.fill_logprobs = fill
    return seen


@torch.no_grad()
def _direct_logprobs(model, mb, temperature):
    """log_softmax(model(...).logits / T) gathered at the targets: the full-logits reference computation."""
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                   position_ids=mb.position_ids).logits[:, mb.start:].float()
    t = mb.targets.clamp(min=0)
    return torch.log_softmax(logits / temperature, -1).gather(-1, t[..., None])[..., 0]


def test_grpo_kl_uses_initial_model(tmp_path, spy):
    tr = make_trainer(tmp_path, "grpo", **KL, **{"rollout.temperature": 0.7})
    assert tr.ref is not None and tr.ref is not tr.lm
    assert all(not p.requires_grad for p in tr.ref.parameters()) and not tr.ref.training
    tr.engine = AnswerEngine(tr, correct=[0, 1, 2, 4])
    init = copy.deepcopy(tr.lm).eval()
    rows = _capture_rows(tr)
    kls = []
    for step in range(4):
        m = tr.train_step()
        kls.append(m["kl_mean"])
        c = spy[-1]
        assert c["config"].kl_coef == 0.1 and c["ref_logprobs"] is not None
        # the reference log-probs are the initial model's, at the loss's temperature, every step
        want = _direct_logprobs(init, rows[-1], 0.7)
        mask = rows[-1].loss_mask.bool()
        torch.testing.assert_close(c["ref_logprobs"].cpu()[mask], want[mask], atol=1e-5, rtol=1e-5)
        if step == 0:   # policy == reference before the first update
            torch.testing.assert_close(c["out"].logprobs.cpu()[mask], want[mask], atol=1e-5, rtol=1e-5)
    assert kls[0] == pytest.approx(0.0, abs=1e-7)
    assert all(k > 1e-6 for k in kls[1:]), kls
    for a, b in zip(init.parameters(), tr.ref.parameters()):   # the reference never moves
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(init.parameters(), tr.lm.parameters()))


def test_kl_off_builds_no_reference(tmp_path, spy):
    tr = make_trainer(tmp_path, "grpo")
    tr.engine = AnswerEngine(tr, correct=[0, 1, 2, 4])
    tr.train_step()
    assert tr.ref is None and spy[0].get("ref_logprobs") is None


@pytest.mark.parametrize("preset", ["chi2_sft", "hellinger_sft"])
def test_fdiv_sft_step(tmp_path, spy, preset):
    tr = make_trainer(tmp_path, "sft", **{"loss.preset": preset, "train.lr": 1e-2})
    rows = _capture_rows(tr)
    init = copy.deepcopy(tr.lm).eval()
    losses = [tr.train_step()["loss"] for _ in range(3)]
    assert all(math.isfinite(x) for x in losses)
    c = spy[-1]
    assert c["config"].likelihood == preset.split("_")[0] and c["ref_logprobs"] is not None
    mask = rows[-1].loss_mask.bool()   # packed rows (4D mask): the reference sees the same layout
    torch.testing.assert_close(c["ref_logprobs"].cpu()[mask], _direct_logprobs(init, rows[-1], 1.0)[mask],
                               atol=1e-5, rtol=1e-5)


def test_resume_keeps_reference(tmp_path):
    flags = dict(KL, **{"train.max_steps": 2, "output.save_every": 1})
    tr = make_trainer(tmp_path, "grpo", **flags)
    tr.engine = AnswerEngine(tr, correct=[0, 1, 2, 4])
    ref0 = {k: v.clone() for k, v in tr.ref.state_dict().items()}
    tr.train()
    rows = [r for r in read_metrics(str(tmp_path / "grpo" / "metrics.jsonl")) if r["kind"] == "train"]
    assert rows[0]["kl_mean"] == pytest.approx(0.0, abs=1e-7) and rows[1]["kl_mean"] > 0
    assert (tmp_path / "grpo" / "reference.json").exists()

    more = dict(flags, **{"train.max_steps": 3, "output.resume": "true"})
    tr2 = make_trainer(tmp_path, "grpo", **more)
    assert tr2.step == 2
    for k, v in tr2.ref.state_dict().items():
        assert torch.equal(v, ref0[k]), k
    # the policy resumed from the checkpoint, the reference did not
    assert any(not torch.equal(v, ref0[k]) for k, v in tr2.lm.state_dict().items())

    # a reference that no longer matches the one recorded at the start is an error
    f = tmp_path / "grpo" / "reference.json"
    rec = json.loads(f.read_text())
    key = next(iter(rec["fingerprint"]))
    rec["fingerprint"][key][0] += 1.0
    f.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="differs from the one this run started with"):
        make_trainer(tmp_path, "grpo", **more)


def test_ref_path(tmp_path):
    """model.ref_path: the reference is that model (here the trained policy of a first run), not the initial one."""
    tr = make_trainer(tmp_path / "a", "sft", **{"train.max_steps": 2, "train.lr": 1e-2})
    tr.train()
    final = str(tmp_path / "a" / "sft" / "final")
    tr2 = make_trainer(tmp_path / "b", "grpo", **KL, **{"model.ref_path": final})
    for k, v in tr2.ref.state_dict().items():
        assert torch.equal(v, tr.lm.state_dict()[k]), k
    assert any(not torch.equal(v, tr2.lm.state_dict()[k]) for k, v in tr2.ref.state_dict().items())
    with pytest.raises(RuntimeError, match="could not build the reference model"):
        make_trainer(tmp_path / "c", "grpo", **KL, **{"model.ref_path": str(tmp_path / "missing")})
