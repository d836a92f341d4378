"""Data loading, chat-template encoding, completion-only masking and packing isolation."""
import json

import pytest
import torch

from upg_trainer import task
from upg_trainer.data import (PromptSampler, build_rows, check_columns, encode_completion, encode_prompt,
                              load_rows, pack_rows)
from upg_trainer.model import get_head, hidden_states, load_model_and_tokenizer


@pytest.fixture(scope="module")
def mt():
    model, tok, _ = load_model_and_tokenizer("embedded", seed=0)
    torch.manual_seed(1)
    with torch.no_grad():  # move away from the init so attention patterns are not trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), tok


def test_load_formats(tmp_path):
    rows = task.make_dataset(5, seed=0)
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_rows(str(j)) == rows
    import datasets
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert load_rows(str(tmp_path / "d.parquet")) == rows
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert load_rows(str(tmp_path / "dd"), split="train") == rows
    with pytest.raises(ValueError, match="no split 'test'"):
        load_rows(str(tmp_path / "dd"), split="test")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": 1}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        load_rows(str(tmp_path / "bad.jsonl"))


def test_column_errors():
    rows = [{"question": "q", "answer": "1"}]
    with pytest.raises(ValueError, match="no column 'prompt'.*columns: \\['answer', 'question'\\]"):
        check_columns(rows, ["prompt"], "d.jsonl", "sft")
    with pytest.raises(ValueError, match="is empty"):
        check_columns([], ["prompt"], "d.jsonl", "sft")
    with pytest.raises(ValueError, match="row 1: column 'answer' is missing"):
        check_columns([{"answer": "1"}, {"answer": None}], ["answer"], "d.jsonl", "grpo")


def test_completion_only_mask(mt):
    _, tok = mt
    p = encode_prompt(tok, "Tom has 3 cups.")
    c = encode_completion(tok, "3+0=3. \\boxed{3}")
    assert c[-1] == tok.eos_token_id
    b = build_rows([p, p[:3]], [c, c[:2]], tok.pad_token_id)
    assert b.start == len(p) - 1
    # row 0: every completion token is a target, nothing of the prompt
    assert b.targets[0, :len(c)].tolist() == c and b.loss_mask[0].sum() == len(c)
    assert b.loss_mask[1].sum() == 2 and (b.targets[1, 2:] == -100).all()
    # the input column that predicts completion token j holds token j-1 of prompt+completion
    assert b.input_ids[0, b.start].item() == p[-1]
    pk = pack_rows([(p, c)], 64, tok.pad_token_id)
    assert pk.loss_mask.sum() == len(c)
    assert pk.targets[0][pk.loss_mask[0].bool()].tolist() == c


def _token_logps(model, b):
    w = get_head(model).weight
    with torch.no_grad():
        h = hidden_states(model, b.input_ids, b.attention_mask, b.position_ids)[:, b.start:]
        lp = torch.log_softmax(h @ w.T, -1)
    return lp.gather(-1, b.targets.clamp(min=0)[..., None])[..., 0]


def test_packing_isolation(mt):
    """A packed batch gives the same per-token log-probs as each sample run alone."""
    model, tok = mt
    rows = task.make_dataset(7, seed=5, levels=(1, 2, 3, 4))
    samples = [(encode_prompt(tok, r["prompt"]), encode_completion(tok, r["demonstration"])) for r in rows]
    pk = pack_rows(samples, 96, tok.pad_token_id)
    assert pk.input_ids.shape[0] < len(samples)          # really packed
    lp_packed = _token_logps(model, pk)
    for (p, c), (r, off, n) in zip(samples, pk.segments):
        alone = build_rows([p], [c], tok.pad_token_id)
        lp_alone = _token_logps(model, alone)[0, :len(c)]
        seg_mask = pk.loss_mask[r, off:off + n].bool()
        got = lp_packed[r, off:off + n][seg_mask]
        torch.testing.assert_close(got, lp_alone, atol=1e-5, rtol=1e-5)
    # and the isolation is real: without the block mask the log-probs change
    from upg_trainer.data import RowBatch
    leaky = RowBatch(pk.input_ids, None, torch.arange(pk.input_ids.shape[1]).expand_as(pk.input_ids), 0,
                     pk.targets, pk.loss_mask)
    assert not torch.allclose(_token_logps(model, leaky)[pk.loss_mask.bool()],
                              lp_packed[pk.loss_mask.bool()], atol=1e-3)


def test_left_padded_rows_match_alone(mt):
    model, tok = mt
    rows = task.make_dataset(4, seed=9, levels=(1, 3))
    P = [encode_prompt(tok, r["prompt"]) for r in rows]
    C = [encode_completion(tok, r["demonstration"]) for r in rows]
    lp = _token_logps(model, build_rows(P, C, tok.pad_token_id))
    for i, (p, c) in enumerate(zip(P, C)):
        alone = _token_logps(model, build_rows([p], [c], tok.pad_token_id))[0, :len(c)]
        torch.testing.assert_close(lp[i, :len(c)], alone, atol=1e-5, rtol=1e-5)


def test_sampler_is_a_function_of_position():
    s = PromptSampler(10, seed=3)
    first = s.take(25)
    s2 = PromptSampler(10, seed=3)
    s2.pos = 12
    assert s2.take(13) == first[12:]
    assert sorted(first[:10]) == list(range(10))
    with pytest.raises(ValueError, match="empty"):
        PromptSampler(0, seed=0)
