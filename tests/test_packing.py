"""Unpadded (packed) batches on the CPU: the collator's rows, and the model glue (positions, per-example
attention, first-token outputs) against padded batches, with a per-example reference for the flash kernel
(which runs on CUDA only; tests/test_gpu.py checks the kernel itself against padded batches)."""
from types import SimpleNamespace

import pytest
import torch

from encoderfit.modeling import packing
from encoderfit.data.batches import PadCollator
from encoderfit.utils import UserError

TOKENIZER = SimpleNamespace(pad_token_id=0, pad_token_type_id=0, padding_side="right",
                            model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def _rows(lengths, seed=0, pairs=False, vocab=200):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = [101] + torch.randint(1000, 1000 + vocab, (n - 2,), generator=g).tolist() + [102]
        types = [0] * (n // 2) + [1] * (n - n // 2) if pairs else [0] * n
        rows.append({"input_ids": ids, "token_type_ids": types, "attention_mask": [1] * n, "labels": i % 3})
    return rows


def test_packed_rows_restart_positions_and_end_in_a_tail_segment():
    rows = _rows([5, 3, 7], pairs=True)
    batch = packing.PackCollator(TOKENIZER, max_length=128, position_offset=2)(rows)
    ids, pos, types = (batch.inputs[k][0].tolist() for k in ("input_ids", "position_ids", "token_type_ids"))
    assert len(ids) == 64 and batch.num_tokens == 15 and batch.num_examples == 3  # 15 + 1 rounded to 64
    assert ids[:15] == rows[0]["input_ids"] + rows[1]["input_ids"] + rows[2]["input_ids"] and set(ids[15:]) == {0}
    assert pos[:15] == [2, 3, 4, 5, 6, 2, 3, 4, 2, 3, 4, 5, 6, 7, 8] and pos[15:] == [2 + i for i in range(49)]
    assert types[:15] == sum((r["token_type_ids"] for r in rows), []) and set(types[15:]) == {0}
    assert batch.inputs["cu_seq_lens_q"].tolist() == [0, 5, 8, 15, 64]
    assert batch.inputs["cu_seq_lens_q"].dtype == torch.int32 and batch.labels.tolist() == [0, 1, 2]
    assert "attention_mask" not in batch.inputs
    assert batch.model_inputs()["max_length_q"] == 128 and batch.key[-1] == 128
    # a max_length of 16: the same rounding, the tail in segments of at most 16 tokens, positions from 0 in each
    short = packing.PackCollator(TOKENIZER, max_length=16)(rows)
    assert short.inputs["input_ids"].shape == (1, 64)
    assert short.inputs["cu_seq_lens_q"].tolist() == [0, 5, 8, 15, 25, 35, 45, 55, 64]
    assert short.inputs["position_ids"][0, 15:].tolist() == [*range(10)] * 4 + [*range(9)]
    assert short.model_inputs()["packed_examples"] == 3


def test_prepare_twice_cuts_the_output_once():
    rows = _rows([9, 4, 17], seed=3)
    model = _model("bert")
    packing.prepare(model)
    packing.prepare(model)  # e.g. a bench that prepares each variant's model again
    batch = packing.PackCollator(TOKENIZER, max_length=32)(rows)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(packing, "varlen", _reference_varlen)
        assert model(**batch.model_inputs()).logits.shape == (3, 3)


def test_unfit_refuses_a_bert_configured_as_a_decoder(monkeypatch):
    model = _model("bert")
    model.config.is_decoder = True
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    why = packing.unfit(model, torch.device("cuda"), torch.bfloat16)
    assert why == f"an encoder of the families {', '.join(packing.FAMILIES)} (this one is bert, configured as a decoder)"
    model.config.is_decoder = False
    assert packing.unfit(model, torch.device("cuda"), torch.bfloat16) is None


def test_packed_layouts_round_up_by_at_most_an_eighth_and_split_the_tail_within_max_length():
    for max_length in (2, 3, 16, 40, 128, 200, 512):
        cap = 1 << (max_length.bit_length() - 1)
        for tokens in list(range(1, 3000, 7)) + [1023, 1024, 16383, 16384, 30000]:
            total, tail = packing.packed_layout(tokens, max_length)
            step = max(packing.MIN_ROUNDING, 1 << max(0, tokens.bit_length() - 4))
            assert total % step == 0 and sum(tail) == total - tokens, (tokens, max_length)
            assert all(1 <= n <= cap for n in tail), (tokens, max_length, tail)  # the kernel's bound, positions
            assert max(tail) - min(tail) <= 1  # split evenly
            assert total - tokens < step + len(tail)  # the rounding: one step at most, beside a token a segment
            if cap >= 16:
                assert len(tail) == -(-(step - 1) // (cap - 1))  # the fewest segments of at most cap
    # few shapes: about eight row lengths an octave of token counts, at short and at long lengths alike
    def shapes(tokens, max_length):  # what a graph is keyed on: the row's length and its number of segments
        return {(total, len(tail)) for total, tail in (packing.packed_layout(t, max_length) for t in tokens)}
    for max_length in (128, 512):
        assert len(shapes(range(640, 1281), max_length)) <= 10
        assert len(shapes(range(2048, 4096), max_length)) <= 9  # before the split: 16 at max_length 128
    # 3,000 tokens: steps of 256, a tail of 72 (3,072 - 3,000) in 3 segments, as 2 of 128 could overflow
    assert packing.packed_layout(3000, 128) == (3072, [24, 24, 24])


def test_unpadded_needs_a_max_length_of_two():
    with pytest.raises(UserError, match="--unpadded needs a --max_length of at least 2"):
        packing.PackCollator(TOKENIZER, max_length=1)


def _reference_varlen(q, k, v, cu, max_length, *, dropout, scale):
    """Each segment attends to itself, by PyTorch's SDPA on the CPU (what the flash kernel computes)."""
    assert dropout == 0.0
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert 0 < b - a <= max_length, (a, b, max_length)  # the flash kernel's bound holds, the tail's too
        seg = [t[a:b].transpose(0, 1) for t in (q, k, v)]  # (heads, length, dim)
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(*seg, scale=scale).transpose(0, 1)
    return out


def _model(kind):
    import transformers

    common = dict(vocab_size=1300, num_labels=3, max_position_embeddings=40)
    if kind == "distilbert":
        config = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, dropout=0.0,
                                               attention_dropout=0.0, seq_classif_dropout=0.0, **common)
    else:
        cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[kind]
        config = cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0, type_vocab_size=2,
                     **common)
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_config(config).train()


def _loss_and_grads(model, batch):
    model.zero_grad()
    logits = model(**batch.model_inputs()).logits
    loss = torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum")
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_packed_batches_give_the_padded_batches_logits_and_gradients(kind, monkeypatch):
    monkeypatch.setattr(packing, "varlen", _reference_varlen)
    rows = _rows([9, 4, 17, 30, 6], seed=1, pairs=kind == "bert")
    if kind == "distilbert":
        rows = [{k: v for k, v in r.items() if k != "token_type_ids"} for r in rows]
    model = _model(kind)
    padded = PadCollator(TOKENIZER)(rows)
    want_logits, want_grads = _loss_and_grads(model, padded)
    packing.prepare(model)
    offset = packing.position_offset(model)
    assert offset == (1 if kind == "roberta" else 0)  # RoBERTa counts positions from padding_idx + 1
    packed = packing.PackCollator(TOKENIZER, max_length=32, position_offset=offset)(rows)
    got_logits, got_grads = _loss_and_grads(model, packed)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # padded batches (evaluation) still run as before on the switched model
    torch.testing.assert_close(model(**padded.model_inputs()).logits.detach(), want_logits, rtol=1e-5, atol=1e-6)
    # a wrong position offset is caught: the glue's positions matter
    if kind == "roberta":
        wrong = packing.PackCollator(TOKENIZER, max_length=32, position_offset=0)(rows)
        assert not torch.allclose(_loss_and_grads(model, wrong)[0], want_logits, atol=1e-3)


def test_unfit_says_why_and_the_cli_refuses_unpadded_on_where_it_cannot_run(tmp_path, tiny_model_dir,
                                                                          synthetic_csv, run_main):
    model = _model("bert")
    assert packing.unfit(model, torch.device("cpu"), torch.bfloat16) == "a CUDA device"
    proc = run_main("train_single.py", "--model", tiny_model_dir, "--train_file", synthetic_csv, "--epochs", "1",
                    "--unpadded", "on", "--checkpoint_dir", tmp_path / "runs")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --unpadded on needs a CUDA device", proc.stderr
    proc = run_main("train_single.py", "--model", tiny_model_dir, "--train_file", synthetic_csv, "--epochs", "1",
                    "--num_samples", "40", "--unpadded", "auto", "--checkpoint_dir", tmp_path / "runs")
    assert proc.returncode == 0 and "batches: padded (unpadded needs a CUDA device)" in proc.stdout, proc.stdout


def test_the_packed_attention_hands_the_kernel_views_and_copies_nothing_back(monkeypatch):
    """The projections' layout as transformers makes it ((1, tokens, heads x dim) viewed and transposed to (1,
    heads, tokens, dim)) reaches the kernel as views of the same memory, and the backward through the glue
    neither allocates the whole input (select's backward) nor clones it (the projection's reshape): on an H200
    these copies were 1.5 of 26 ms of a BERT-base step."""
    seen = []

    def kernel(q, k, v, cu, max_length, *, dropout, scale):  # copy-free stand-in: records what it is handed
        seen.append((q, k, v))
        return q * k + v

    monkeypatch.setattr(packing, "varlen", kernel)
    tokens, heads, dim = 12, 2, 4
    proj = [torch.randn(1, tokens, heads * dim, requires_grad=True) for _ in range(3)]
    query, key, value = (p.view(1, tokens, heads, dim).transpose(1, 2) for p in proj)
    cu = torch.tensor([0, 5, tokens], dtype=torch.int32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out, _ = packing._attention(None, query, key, value, None, scaling=1.0, cu_seq_lens_q=cu, max_length_q=7)
        out.reshape(1, tokens, heads * dim).sum().backward()
    for t, p in zip(seen[0], proj):
        assert t.shape == (tokens, heads, dim) and t.data_ptr() == p.data_ptr() and t.is_contiguous()
    def inside(event, name):
        return event is not None and (name in event.name or inside(event.cpu_parent, name))
    copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::select_backward")
              and not inside(e, "AccumulateGrad")]  # (storing a .grad may copy: not the glue's doing)
    assert copies == [], copies
    q, k, _ = (p.detach().view(tokens, heads, dim) for p in proj)
    torch.testing.assert_close(proj[0].grad.view(tokens, heads, dim), k)  # d(q*k+v)/dq = k, in the projection's layout
    torch.testing.assert_close(proj[1].grad.view(tokens, heads, dim), q)
    torch.testing.assert_close(proj[2].grad, torch.ones_like(proj[2]))
