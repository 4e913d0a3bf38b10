"""Texts longer than --max_length: truncate, head_tail, windows (training/long_texts.py).

Through the real CLI with the tiny model on synthetic documents whose label is decided by one word placed
after the first --max_length tokens; pooling and the head-and-tail cut checked against direct computations."""
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import FILLER, NEGATIVE, POSITIVE, made_once, run_script, run_scripts_in_one_process
from test_resume import env_with, hooks, records, weights  # noqa: F401 (hooks: the STOP_AT_STEP fixture)
from encoderfit.modeling.long_texts import DOC, LongTexts, pool
from encoderfit.utils import UserError

MAX_LENGTH = 32


def long_rows(n: int, seed: int, words=(40, 70)) -> list:
    """Filler, then the one word that decides the label, then a few more filler words: the word comes after
    token 32 (every filler word is one token), so a model that reads only the first 32 tokens cannot see it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % 2
        text = rng.choices(FILLER, k=rng.randint(*words))
        text.append(rng.choice(POSITIVE if y else NEGATIVE))
        text += rng.choices(FILLER, k=rng.randint(0, 4))
        rows.append({"text": " ".join(text), "label": ["negative", "positive"][y]})
    return rows


def window_ids(tok, text: str, max_length: int = MAX_LENGTH, stride: int = MAX_LENGTH // 4,
               first: str | None = None) -> list:
    """The windows of ``text`` (the second text of a pair with ``first``), built here from its tokens:
    [CLS] (first [SEP]) stretch [SEP], each stretch as long as fits and starting ``stride`` tokens before the
    previous one ends. Independent of the tokenizer's own ``return_overflowing_tokens``, which tokenizers
    0.23.2 gets wrong (two windows a text at most); 0.23.3, the pinned version, gives these."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    head = [tok.cls_token_id]
    if first is not None:
        head += tok(first, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    room = max_length - len(head) - 1
    out, start = [], 0
    while True:
        out.append(head + ids[start:start + room] + [tok.sep_token_id])
        if start + room >= len(ids):
            return out
        start += room - stride


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(model, base: Path, mode: str, *extra, name=None) -> list:
    return ["--model", model, "--train_file", base / "train.jsonl", "--validation_file", base / "val.jsonl",
            "--max_length", MAX_LENGTH, "--long_texts", mode, "--epochs", 4, "--batch_size", 16,
            "--learning_rate", 2e-3, "--warmup_ratio", 0, "--no_progress", "--checkpoint_dir", base / "ck",
            "--cache_dir", base / "cache", "--run_name", name or mode, *extra]


def _records(run: Path, event: str) -> list:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == event]


@pytest.fixture(scope="module")
def mode_runs(tiny_model_dir, tmp_path_factory):
    """One run per mode on the same data (once per test session); {mode: (run dir, output)}."""
    def make(base: Path) -> None:
        write_jsonl(base / "train.jsonl", long_rows(240, seed=1))
        write_jsonl(base / "val.jsonl", long_rows(40, seed=2))
        modes = ("truncate", "head_tail", "windows")
        runs = run_scripts_in_one_process("train_single.py", *(_args(tiny_model_dir, base, m) for m in modes))
        assert [r.returncode for r in runs] == [0, 0, 0], runs[-1].stderr
        for mode, proc in zip(modes, runs):
            (base / f"{mode}.out").write_text(proc.stdout)

    base = made_once(tmp_path_factory, "long-text-modes", make)
    return base, {m: (base / "ck" / m, (base / f"{m}.out").read_text()) for m in ("truncate", "head_tail", "windows")}


def test_a_word_past_max_length_is_learned_by_windows_and_head_tail_not_by_truncate(mode_runs):
    base, runs = mode_runs
    last = {mode: _records(run, "epoch")[-1] for mode, (run, _) in runs.items()}
    assert last["truncate"]["val_accuracy"] <= 0.6, last["truncate"]
    assert last["head_tail"]["val_accuracy"] >= 0.9, last["head_tail"]
    assert last["windows"]["val_accuracy"] >= 0.9, last["windows"]
    # windows: training counts windows, evaluation counts documents, and both are said
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(runs["windows"][0] / "final")
    texts = [json.loads(x)["text"] for x in (base / "val.jsonl").read_text().splitlines()]
    windows = [w for t in texts for w in window_ids(tok, t)]
    assert last["windows"]["val_examples"] == 40 and last["windows"]["val_windows"] == len(windows) > 80
    assert last["windows"]["train_documents"] == 240 and last["windows"]["train_examples"] > 480
    out = runs["windows"][1]
    assert f"240 train, 40 validation texts in {last['windows']['train_examples']} and {len(windows)} windows" in out
    assert f"(40 documents in {len(windows)} windows)" in out and "documents/s" in out
    assert "note: 240 training and 40 validation text(s) longer than --max_length 32 tokens: kept" in runs["head_tail"][1]
    assert "note: truncated 240 training and 40 validation text(s)" in runs["truncate"][1]
    # the checkpoint says what it was trained with
    config = json.loads((runs["windows"][0] / "final" / "config.json").read_text())
    assert config["long_texts"] == {"mode": "windows", "head_tokens": None, "stride": None, "pooling": "mean"}


def test_windows_pool_the_same_in_training_evaluate_and_predict(mode_runs, tmp_path, run_main):
    """evaluate.py reports training's last validation metrics (the same pooling), predict.py's probabilities
    are the softmax of the mean of each text's window logits computed here, and the tools' flags override."""
    base, runs = mode_runs
    run = runs["windows"][0]
    last = _records(run, "epoch")[-1]
    proc = run_main("evaluate.py", "--checkpoint", run / "final", "--validation_file", base / "val.jsonl",
                    "--output", tmp_path / "eval.json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "eval.json").read_text())
    assert got["examples"] == 40 and got["long_texts"]["mode"] == "windows"
    assert got["accuracy"] == last["val_accuracy"] and abs(got["loss"] - last["val_loss"]) < 1e-5

    rows = [json.loads(x) for x in (base / "val.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows]
    proc = run_main("predict.py", "--checkpoint", run / "final", "--input", base / "val.jsonl",
                    "--output", tmp_path / "p.jsonl")
    assert proc.returncode == 0, proc.stderr
    predicted = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(run / "final")
    model = AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    direct = []
    with torch.no_grad():
        for text in texts:
            logits = model(**tok.pad({"input_ids": window_ids(tok, text)}, return_tensors="pt")).logits
            assert len(logits) >= 2
            direct.append(torch.softmax(logits.mean(dim=0), dim=-1))
    names = model.config.id2label
    for row, want in zip(predicted, direct):
        got = torch.tensor([row["probabilities"][names[i]] for i in range(2)])
        assert torch.allclose(got, want, atol=1e-5), (got, want)
    # max pooling instead of the checkpoint's mean: other probabilities, those of the max of the logits
    proc = run_main("predict.py", "--checkpoint", run / "final", "--input", base / "val.jsonl",
                    "--window_pooling", "max", "--output", tmp_path / "max.jsonl")
    assert proc.returncode == 0, proc.stderr
    first = json.loads((tmp_path / "max.jsonl").read_text().splitlines()[0])["probabilities"]
    with torch.no_grad():
        logits = model(**tok.pad({"input_ids": window_ids(tok, texts[0])}, return_tensors="pt")).logits
        want = torch.softmax(logits.max(dim=0).values, dim=-1)
    assert torch.allclose(torch.tensor([first[names[0]], first[names[1]]]), want, atol=1e-5)
    # the truncating tool on the windows checkpoint sees only the first 32 tokens: chance
    proc = run_main("evaluate.py", "--checkpoint", run / "final", "--validation_file", base / "val.jsonl",
                    "--long_texts", "truncate", "--output", tmp_path / "cut.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "cut.json").read_text())["accuracy"] <= 0.65


def test_pool_is_the_mean_or_max_over_each_documents_windows():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 3, generator=gen)
    docs = torch.tensor([4, 1, 4, 7, 1, 4, 7, 7, 7])
    for mode, reduce in (("mean", lambda x: x.mean(dim=0)), ("max", lambda x: x.max(dim=0).values)):
        ids, pooled, first = pool(logits, docs, mode)
        assert ids.tolist() == [1, 4, 7] and first.tolist() == [1, 0, 3]
        for row, d in zip(pooled, ids.tolist()):
            assert torch.allclose(row, reduce(logits[docs == d]), atol=1e-6)


def test_head_tail_and_windows_cut_as_documented_and_keep_a_pairs_first_text_whole(tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    words = [f"w{i}" for i in range(40)]
    text = " ".join(words)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    setting = LongTexts("head_tail", head_tokens=5)
    enc = setting.encode(tok, [text, "short text"], 20)
    assert enc["input_ids"][0] == [tok.cls_token_id, *ids[:5], *ids[-13:], tok.sep_token_id]
    assert enc["input_ids"][1] == tok("short text")["input_ids"]  # a text that fits is not touched
    assert all(len(v[0]) == 20 for v in enc.values())
    # a pair: the question whole, the passage cut to its head and tail
    q = tok("is it w3", add_special_tokens=False)["input_ids"]
    pair = setting.encode(tok, ["is it w3"], 20, [text])
    assert pair["input_ids"][0] == [tok.cls_token_id, *q, tok.sep_token_id, *ids[:5], *ids[-(20 - 3 - len(q) - 5):],
                                    tok.sep_token_id]
    assert pair["token_type_ids"][0] == [0] * (len(q) + 2) + [1] * (20 - len(q) - 2)
    # default head: a quarter of what fits; windows of a pair repeat the first text
    assert LongTexts("head_tail").encode(tok, [text], 18)["input_ids"][0][1:5] == ids[:4]
    windows = LongTexts("windows", stride=2).encode(tok, ["is it w3"], 16, [text])
    assert len(windows["input_ids"]) > 3 and set(windows[DOC]) == {0}
    assert all(w[:len(q) + 2] == [tok.cls_token_id, *q, tok.sep_token_id] for w in windows["input_ids"])
    # the windows, token ids, segment ids and documents, built independently: a text and a pair
    ours = LongTexts("windows", stride=3).encode(tok, [text, "short"], 16)
    assert ours["input_ids"] == window_ids(tok, text, 16, 3) + window_ids(tok, "short", 16, 3)
    assert ours[DOC] == [0] * len(window_ids(tok, text, 16, 3)) + [1] and len(ours[DOC]) > 4
    assert all(set(t) == {0} for t in ours["token_type_ids"])
    ours = LongTexts("windows", stride=3).encode(tok, ["is it w3", "short"], 16, [text, "x"])
    want = window_ids(tok, text, 16, 3, first="is it w3") + window_ids(tok, "x", 16, 3, first="short")
    assert ours["input_ids"] == want and len(want) > 4
    assert ours["token_type_ids"][0] == [0] * (len(q) + 2) + [1] * (16 - len(q) - 2)
    with pytest.raises(UserError, match="keeps the first text of a pair whole"):
        setting.encode(tok, [text], 20, ["a passage"])
    # a pair that fits is not touched, however long its first text (only cut rows need room)
    question = " ".join(words[:12])
    fits = LongTexts("windows").encode(tok, [question, "is it w3"], 32, ["ok", text])  # 24 + 1 + 3 tokens
    assert fits["input_ids"][0] == tok(question, "ok")["input_ids"] and fits[DOC][0] == 0 and len(fits[DOC]) > 2
    # auto: head_tail for single texts, truncate (longest first) for pairs
    auto = LongTexts("auto")
    assert auto.encode(tok, [text], 20)["input_ids"] == LongTexts("head_tail").encode(tok, [text], 20)["input_ids"]
    assert auto.encode(tok, [text], 20, [text])["input_ids"] == tok([text], [text], truncation=True, max_length=20)["input_ids"]
    # no room for text, or for a tail: errors, not an endless loop or a silent truncation
    with pytest.raises(UserError, match="--max_length 3 leaves no room for text beside 2 special tokens and --stride 1"):
        LongTexts("windows", stride=1).encode(tok, [text], 3)
    with pytest.raises(UserError, match="--head_tokens 18 leaves no tail"):
        LongTexts("head_tail", head_tokens=18).encode(tok, [text], 20)
    with pytest.raises(UserError, match="--head_tokens 13 leaves no tail: beside its first text"):  # 20 - 3 - 4 = 13
        LongTexts("head_tail", head_tokens=13).encode(tok, ["is it w3"], 20, [text])
    with pytest.raises(UserError, match="--max_length 3 leaves no room for text beside 3 special tokens"):
        LongTexts("auto").encode(tok, [text], 3, [text])  # auto on pairs: truncate, which would not cut at all
    # a pair's default head: a quarter of what its second text keeps (13: 3 from the start, 10 from the end)
    pair = LongTexts("head_tail").encode(tok, ["is it w3"], 20, [text])["input_ids"][0]
    assert len(q) == 4 and pair[len(q) + 2:] == [*ids[:3], *ids[-10:], tok.sep_token_id]


@pytest.mark.parametrize("flags, message", [
    (["--stride", 4], "--stride applies to --long_texts windows, not --long_texts auto"),  # the default
    (["--long_texts", "windows", "--stride", 16], "--stride (the tokens neighbouring windows share) must be"),
    (["--long_texts", "windows", "--head_tokens", 4], "--head_tokens applies to --long_texts head_tail"),
    (["--long_texts", "head_tail", "--head_tokens", 32], "--head_tokens must be from 0 to less than"),
    (["--long_texts", "everything"], "--long_texts: invalid choice"),
    (["--max_length", 4096], "is more than --model"),
])
def test_long_text_mistakes_are_one_line_errors(tiny_model_dir, tmp_path, flags, message, run_main):
    write_jsonl(tmp_path / "train.jsonl", long_rows(20, seed=3))
    write_jsonl(tmp_path / "val.jsonl", long_rows(6, seed=4))
    args = [a for a in _args(tiny_model_dir, tmp_path, "truncate", name="r") if a not in ("--long_texts", "truncate")]
    assert "--long_texts" not in args
    proc = run_main("train_single.py", *args, *flags)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_windows_over_three_gloo_ranks_count_each_document_once(tiny_model_dir, tmp_path, run_main):
    """29 documents of 1 to 4 windows: 3 processes at batch 4 train as 1 at batch 12, and each rank pools
    whole documents, so the validation metrics are those of one process, over exactly 29 documents."""
    from test_ddp import assert_same_run, torchrun

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def windows(rows):
        return [len(window_ids(tok, r["text"])) for r in rows]

    train = long_rows(64, seed=5, words=(5, 80))
    while sum(windows(train)) % 3:  # no wrap-around padding of the last step: then 3 x 4 is exactly 1 x 12
        train.pop()
    write_jsonl(tmp_path / "train.jsonl", train)
    val = long_rows(29, seed=6, words=(5, 80))
    write_jsonl(tmp_path / "val.jsonl", val)
    common = [a for a in _args(tiny_model_dir, tmp_path, "windows") if a not in ("--batch_size", 16)]
    common = [*common[:common.index("--run_name")], "--epochs", 2, "--log_every", 1, "--precision", "fp32",
              "--learning_rate", 1e-3]  # AdamW turns the ranks' other summation order into lr-sized steps
    one = run_main("train_single.py", *common, "--batch_size", 12, "--run_name", "one")
    assert one.returncode == 0, one.stderr
    three = torchrun(3, *common, "--batch_size", 4, "--run_name", "three")
    assert three.returncode == 0, three.stderr
    a, b = tmp_path / "ck" / "one", tmp_path / "ck" / "three"
    # one element in 8,192 of a weight was seen 1.8e-6 off on a 2-core machine; a wrong step moves them all
    assert_same_run(a, b, skip=".attention.self.key.bias", stray=1e-3)
    ra, rb = _records(a, "epoch")[-1], _records(b, "epoch")[-1]
    per_doc = windows(val)
    assert min(per_doc) == 1 and max(per_doc) >= 3
    assert ra["val_examples"] == rb["val_examples"] == 29
    assert ra["val_windows"] == rb["val_windows"] == sum(per_doc)
    assert ra["val_accuracy"] == rb["val_accuracy"] and abs(ra["val_loss"] - rb["val_loss"]) < 1e-5


def test_windows_resume_at_the_exact_next_batch(mode_runs, tiny_model_dir, hooks, run_main):
    """SIGTERM in epoch 2 of the windows run, then --resume auto (in this process): the uninterrupted run's weights, step
    losses and per-document epoch metrics, bitwise."""
    base, runs = mode_runs
    run = runs["windows"][0]
    args = _args(tiny_model_dir, base, "windows", name="stopped-windows")
    assert len(records(run, "step")) >= 2  # the uninterrupted run logged at steps 50, 100, ...
    stopped = run_script("train_single.py", *args, env=env_with(hooks, STOP_AT_STEP=55))
    assert stopped.returncode == 143, stopped.stderr
    resumed = run_main("train_single.py", *args, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch 2, step 55" in resumed.stdout
    a, b = weights(base / "ck" / "stopped-windows"), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert [r["loss"] for r in records(base / "ck" / "stopped-windows", "step")] == [r["loss"] for r in records(run, "step")]
    ea, eb = records(base / "ck" / "stopped-windows", "epoch"), records(run, "epoch")
    for key in ("train_loss", "val_loss", "val_accuracy", "val_examples", "val_windows", "train_examples"):
        assert [r[key] for r in ea] == [r[key] for r in eb], key


def test_a_checkpoint_from_before_long_texts_resumes_only_truncating():
    """Such a checkpoint truncated: resuming it under today's default (head_tail) would change its inputs."""
    import dataclasses

    from encoderfit.config import TrainConfig
    from encoderfit.run.resume import check_compatible

    config = dataclasses.asdict(TrainConfig())
    old = {k: v for k, v in config.items() if k not in ("long_texts", "head_tokens", "stride", "window_pooling")}
    tokenizer = {"class": "BertTokenizer", "name": "m", "vocab": 10, "hash": "h"}
    state = {"loop": {"sums": None}, "config": old, "world_size": 1, "label_names": ["a", "b"], "tokenizer": tokenizer}
    run = {"config": config, "world_size": 1, "label_names": ["a", "b"], "tokenizer": tokenizer}
    # auto is head_tail on single texts: refused, and said as what it is
    with pytest.raises(UserError, match="trained with --long_texts truncate, this run has --long_texts head_tail"):
        check_compatible(state, run, where="ckpt")
    check_compatible(state, {**run, "config": {**config, "long_texts": "truncate"}}, where="ckpt")
    check_compatible(state, {**run, "text_columns": ["question", "passage"]}, where="ckpt")  # auto on pairs: truncate
