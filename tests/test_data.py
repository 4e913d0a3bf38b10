"""Data sources, columns, labels, splits, subsets and the tokenize-once cache."""
import json

import pytest

from conftest import synthetic_rows, write_rows
from encoderfit import data
from encoderfit.data.batches import PadCollator, encode
from encoderfit.engine.distributed import ProcessContext
from encoderfit.utils import UserError

import torch


def load(tmp_path=None, **kw):
    source = data.DataSource.from_settings(**{k: kw.pop(k, None) for k in ("dataset", "train_file", "validation_file",
                                                                     "text_column", "label_column")})
    args = {"validation_fraction": 0.1, "split_seed": 42, "num_samples": None, **kw}
    return data.load_labelled_splits(source, **args)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_each_file_format_loads_with_string_labels(tmp_path, suffix):
    rows = synthetic_rows(60)
    path = write_rows(tmp_path / f"train{suffix}", rows)
    splits = load(train_file=str(path))
    assert splits.label_names == ["negative", "positive"]
    assert len(splits.train) + len(splits.validation) == 60
    assert splits.info["rows_read"] == {str(path): 60}  # what data.json records, to compare with the file
    # ids follow the sorted label names, row by row
    by_text = {r["text"]: r["label"] for r in rows}
    for row in splits.train:
        assert splits.label_names[row["labels"]] == by_text[row["text"]]


def test_integer_labels_are_mapped_to_contiguous_ids(tmp_path):
    rows = [{"text": r["text"], "label": 5 if r["label"] == "positive" else 2} for r in synthetic_rows(40)]
    splits = load(train_file=str(write_rows(tmp_path / "t.jsonl", rows)))
    assert splits.label_names == ["2", "5"]
    assert set(splits.train["labels"]) == {0, 1}


def test_columns_autodetected_and_named(tmp_path):
    rows = synthetic_rows(40)
    path = write_rows(tmp_path / "t.csv", rows, text_key="sentence", label_key="sentiment")
    assert len(load(train_file=str(path)).train) > 0
    path2 = write_rows(tmp_path / "u.csv", rows, text_key="body", label_key="verdict")
    with pytest.raises(UserError, match="no text column found.*--text_column"):
        load(train_file=str(path2))
    splits = load(train_file=str(path2), text_column="body", label_column="verdict")
    assert splits.label_names == ["negative", "positive"]


def test_split_is_deterministic_stratified_and_seeded(tmp_path):
    # three classes of unequal size (the default data's split is read by the next test)
    rows = synthetic_rows(1500, seed=3, labels=("a", "b", "c"))
    rows = [r for r in rows if r["label"] != "c"] + [r for r in rows if r["label"] == "c"][:150]
    path = str(write_rows(tmp_path / "t.csv", rows))
    a = load(train_file=path, split_seed=7)
    b = load(train_file=path, split_seed=7)
    c = load(train_file=path, split_seed=8)
    assert list(a.validation["text"]) == list(b.validation["text"])
    assert a.info["validation_sha256"] == b.info["validation_sha256"] != c.info["validation_sha256"]
    # stratified: the class ratio of the held-out part matches the whole within one example
    total = [x + y for x, y in zip(a.info["train_label_counts"], a.info["validation_label_counts"])]
    n_val = len(a.validation)
    for k, count in enumerate(a.info["validation_label_counts"]):
        assert abs(count - total[k] * n_val / sum(total)) <= 1


@pytest.mark.parametrize("n,classes,fraction,seed", [(1500, 3, 0.1, 7), (57, 3, 0.25, 0), (1001, 5, 0.5, 42)])
def test_the_split_holds_out_the_rows_datasets_stratified_split_does(n, classes, fraction, seed):
    """The labels are read in one go, but the split is datasets' own: the same rows, in the same order (what
    the seeded runs, their results and resume's data check rest on)."""
    import datasets
    gen = torch.Generator().manual_seed(seed)
    labels = list(range(classes)) * 2 + torch.randint(classes, (n - 2 * classes,), generator=gen).tolist()
    ds = datasets.Dataset.from_dict({"text": [f"text {i}" for i in range(n)], "labels": labels})
    ds = ds.cast_column("labels", datasets.ClassLabel(names=[str(k) for k in range(classes)]))
    want = ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column="labels")
    train, test = data._stratified_split(ds, fraction, seed)
    assert data.column(train, "text") == list(want["train"]["text"])
    assert data.column(test, "text") == list(want["test"]["text"])


def test_column_reads_selected_and_formatted_datasets_as_their_rows_do():
    import datasets
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * (i % 7 + 1) for i in range(50)], "labels": list(range(50))})
    picked = ds.select([9, 3, 41, 3]).with_format("torch")  # an indices mapping, a torch format
    assert data.column(picked, "labels") == [9, 3, 41, 3]
    assert data.column(picked, "input_ids") == [[1] * 3, [1] * 4, [1] * 7, [1] * 4]


def test_default_dataset_is_fresh_vs_rotten_deduplicated():
    splits = load()
    assert splits.label_names == ["fresh", "rotten"]
    n = len(splits.train) + len(splits.validation)
    assert n == 12752
    texts = list(splits.train["text"]) + list(splits.validation["text"])
    assert len(set(texts)) == n  # duplicates dropped, no overlap between splits
    fresh = splits.info["train_label_counts"][0] + splits.info["validation_label_counts"][0]
    assert 0.57 < fresh / n < 0.59
    assert len(splits.validation) == round(0.1 * n) or abs(len(splits.validation) - 0.1 * n) < 2


def test_num_samples_takes_a_seeded_subset_of_both_splits(tmp_path):
    path = write_rows(tmp_path / "t.csv", synthetic_rows(200))
    a = load(train_file=str(path), num_samples=50)
    b = load(train_file=str(path), num_samples=50)
    assert len(a.train) == 50 and len(a.validation) == 20  # validation had only 20
    assert list(a.train["text"]) == list(b.train["text"])


def test_validation_file_labels_must_exist_in_training(tmp_path):
    train = write_rows(tmp_path / "train.csv", synthetic_rows(40))
    val_rows = synthetic_rows(10)
    val_rows[0]["label"] = "neutral"
    val = write_rows(tmp_path / "val.csv", val_rows)
    with pytest.raises(UserError, match="neutral"):
        load(train_file=str(train), validation_file=str(val))


def test_empty_texts_are_dropped_and_counted(tmp_path):
    rows = synthetic_rows(40)
    rows[3]["text"] = "   "
    splits = load(train_file=str(write_rows(tmp_path / "t.jsonl", rows)))
    assert len(splits.train) + len(splits.validation) == 39
    assert any("dropped 1 row" in n for n in splits.info["notes"])


def test_invisible_only_texts_are_dropped_and_counted_like_empty_ones(tmp_path):
    rows = synthetic_rows(40)
    invisible = ["\u200b", "\u200b\u200d \ufeff", "\x00\x01\t", "\u00ad\u2028\u200e"]  # zero-width, controls, format
    for i, text in enumerate(invisible):
        rows[i]["text"] = text
    rows[5]["text"] = ""
    rows[6]["text"] = "\u200bgood"  # a visible character: kept
    splits = load(train_file=str(write_rows(tmp_path / "t.jsonl", rows)))
    assert len(splits.train) + len(splits.validation) == 35
    assert any("dropped 5 row(s)" in n and "4 of them only control, format or zero-width" in n
               for n in splits.info["notes"]), splits.info["notes"]
    assert data.is_blank_text("") and not data.is_blank_text("\u200b.")


def test_labels_that_differ_only_by_surrounding_whitespace_are_merged_with_a_note(tmp_path):
    rows = synthetic_rows(40)
    for i, r in enumerate(rows):
        r["label"] = {0: r["label"], 1: r["label"] + " ", 2: " " + r["label"] + "\t"}[i % 3]
    val = synthetic_rows(10, seed=3)
    val[0]["label"] += "  "
    splits = load(train_file=str(write_rows(tmp_path / "t.csv", rows)),
                  validation_file=str(write_rows(tmp_path / "v.csv", val)))
    assert splits.label_names == ["negative", "positive"]
    notes = " | ".join(splits.info["notes"])
    assert "differ only by surrounding whitespace" in notes, notes
    assert "'positive', ' positive\\t', 'positive ' -> 'positive'" in notes, notes  # each spelling named
    assert str(tmp_path / "t.csv") in notes
    assert str(tmp_path / "v.csv") in notes  # the validation file's labels are matched the same way
    assert len(splits.validation) == 10


def test_parquet_labels_that_are_nan_are_missing_labels(tmp_path):
    import pandas as pd

    rows = synthetic_rows(20)
    labels = [float(i % 2) for i in range(20)]
    labels[3] = labels[7] = float("nan")  # how pandas stores a missing number: as NaN, not None
    path = tmp_path / "t.parquet"
    pd.DataFrame({"text": [r["text"] for r in rows], "label": labels}).to_parquet(path)
    with pytest.raises(UserError, match=r"2 row\(s\) in .*t.parquet have no label \(first: row 4\)"):
        load(train_file=str(path))
    labels[3] = labels[7] = 0.5
    pd.DataFrame({"text": [r["text"] for r in rows], "label": labels}).to_parquet(path)
    # numbers with a fraction are a score: a regression unless the run asks for classes
    assert load(train_file=str(path)).info["task"] == "regression"
    with pytest.raises(UserError, match=r"numbers with a fraction \(found: 0.5\), and --task single_label"):
        load(train_file=str(path), task="single_label")


def _bad_columns(tmp_path):
    rows = synthetic_rows(30)
    write_rows(tmp_path / "t.csv", rows)
    numbers = tmp_path / "ids.csv"
    numbers.write_text("id,text,label\n" + "".join(f"{i},{r['text']},{r['label']}\n" for i, r in enumerate(rows)))
    return {
        "same text and label column": (["--train_file", tmp_path / "t.csv", "--text_column", "label",
                                        "--label_column", "label"],
                                       "the text column and the label column are both 'label'"),
        "text column given as the label column's": (["--train_file", tmp_path / "t.csv", "--text_column", "label"],
                                                    "--text_column and --label_column"),
        "a text column of numbers": (["--train_file", numbers, "--text_column", "id"],
                                     "the text column 'id' of"),
    }


@pytest.mark.parametrize("case", ["same text and label column", "text column given as the label column's",
                                  "a text column of numbers"])
def test_wrong_columns_are_one_error_line_that_says_what_is_wrong(tmp_path, tiny_model_dir, run_main, case):
    args, expected = _bad_columns(tmp_path)[case]
    proc = run_main("train_single.py", "--model", tiny_model_dir, *args, "--checkpoint_dir", tmp_path / "ck")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0]
    if case == "a text column of numbers":
        assert "holds only numbers (first: 0)" in lines[0] and "--text_column" in lines[0]


@pytest.mark.parametrize("mode, note", [
    ("truncate", "note: truncated 1 training and 1 validation text(s) to --max_length 8 tokens"),
    ("head_tail", "note: 1 training and 1 validation text(s) longer than --max_length 8 tokens: kept their head"),
])
def test_the_truncation_count_is_exact(tmp_path, tiny_model_dir, run_main, mode, note):
    # [CLS] + 6 words + [SEP] is exactly --max_length 8: not truncated; 7 words is
    rows = [{"text": t, "label": lab} for t, lab in [("good film", "pos"), ("bad film", "neg")] * 19]
    rows += [{"text": "good " * 6, "label": "pos"}, {"text": "bad " * 7, "label": "neg"}]
    path = write_rows(tmp_path / "t.csv", rows)
    proc = run_main("train_single.py", "--model", tiny_model_dir, "--train_file", path, "--validation_file", path,
                    "--epochs", 1, "--max_length", 8, "--checkpoint_dir", tmp_path / "ck", "--run_name", "r",
                    "--long_texts", mode)
    assert proc.returncode == 0, proc.stderr
    assert note in proc.stdout
    info = json.loads((tmp_path / "ck" / "r" / "data.json").read_text())
    assert info["train_tokens"]["truncated"] == 1 and info["train_tokens"]["max"] == 8


def test_mixed_label_types_are_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"t {i}", "label": i if i % 2 else "x"}) + "\n" for i in range(10)))
    with pytest.raises(UserError, match="all integers or all strings"):
        load(train_file=str(path))


def test_hub_dataset_offline_gives_a_clear_error(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # the libraries read those when imported (earlier, here): offline at once, as in a process started so,
    # not 20 s of retries to reach the hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    with pytest.raises(UserError, match="cannot load dataset 'someone/no-such-set' from the Hugging Face Hub"):
        load(dataset="someone/no-such-set")


def test_prepare_data_tokenizes_once_and_reuses_the_cache(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = write_rows(tmp_path / "t.csv", synthetic_rows(80))
    source = data.DataSource.from_settings(train_file=str(path))
    ctx = ProcessContext(0, 0, 1, torch.device("cpu"))
    kw = dict(cache_dir=tmp_path / "cache", max_length=16, cache_key={"max_length": 16}, validation_fraction=0.25,
              split_seed=1, num_samples=None)
    first = data.prepare_data(source, tok, ctx, **kw)
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1
    stamp = (entries[0] / "meta.json").stat().st_mtime_ns
    second = data.prepare_data(source, tok, ctx, **kw)
    assert (entries[0] / "meta.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert list(first.train["input_ids"][0]) == list(second.train["input_ids"][0])
    assert max(len(x) for x in first.train["input_ids"]) <= 16  # truncated, not padded
    kw["max_length"], kw["cache_key"] = 32, {"max_length": 32}
    data.prepare_data(source, tok, ctx, **kw)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # a different setting, a different cache


def test_shard_sampler_covers_every_index_once():
    lengths = [5, 3, 9, 1, 7, 7, 2, 8, 4, 6, 10]
    for world in (1, 2, 3):
        seen = [i for r in range(world) for i in data.ShardSampler(lengths, r, world)]
        assert sorted(seen) == list(range(11))


@pytest.mark.parametrize("group", [False, True])
def test_train_batches_across_ranks_equal_one_process_with_the_global_batch(group):
    import random
    lengths = [random.Random(i).randint(1, 60) for i in range(1000)]
    single = data.TrainBatchSampler(lengths, 8, 0, 1, seed=3, group_by_length=group)
    ranks = [data.TrainBatchSampler(lengths, 4, r, 2, seed=3, group_by_length=group) for r in range(2)]
    for epoch in (1, 2):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        one = list(single)
        per_rank = [list(s) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(one) == len(single)
        for t, batch in enumerate(one):
            assert sorted(per_rank[0][t] + per_rank[1][t]) == sorted(batch)
        assert sorted(i for b in one for i in b) == list(range(1000))  # every example once an epoch
        assert [len(b) for b in per_rank[0]] == ranks[0].batch_sizes()
    single.set_epoch(1)
    first = list(single)
    single.set_epoch(2)
    assert first != list(single)  # reshuffled every epoch


def test_each_seed_and_epoch_has_its_own_data_order():
    lengths = [(i * 7) % 30 + 1 for i in range(120)]

    def order(seed, epoch):
        sampler = data.TrainBatchSampler(lengths, 8, 0, 1, seed=seed, group_by_length=False)
        sampler.set_epoch(epoch)
        return tuple(i for batch in sampler for i in batch)

    assert order(42, 2) != order(43, 1)  # seeding with seed + epoch made these two the same order
    assert order(42, 1) == order(42, 1)  # and still repeatable
    assert len({order(seed, epoch) for seed in (41, 42, 43) for epoch in (0, 1, 2)}) == 9


@pytest.mark.parametrize("group", [False, True])
def test_accumulated_micro_batches_equal_one_large_batch(group):
    lengths = [(i * 37) % 50 + 1 for i in range(204)]
    big = data.TrainBatchSampler(lengths, 8, 0, 1, seed=5, group_by_length=group)
    ranks = [data.TrainBatchSampler(lengths, 2, r, 2, seed=5, group_by_length=group, grad_accum_steps=2)
             for r in range(2)]
    micro = [list(s) for s in ranks]
    big_batches = list(big)
    # 204 examples: 102 per rank = 25 steps of 2x2 micro-batches and a last, partial step of one
    assert ranks[0].batch_sizes() == [2] * 51
    for t, batch in enumerate(big_batches):
        together = sum((micro[r][2 * t:2 * t + 2] for r in range(2)), [])
        assert sorted(i for b in together for i in b) == sorted(batch)


def test_length_grouping_cuts_padding_and_pads_ranks_evenly():
    import random
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(2001)]

    def padded(group):
        s = data.TrainBatchSampler(lengths, 32, 0, 1, seed=0, group_by_length=group)
        return sum(len(b) * max(lengths[i] for i in b) for b in s)

    assert padded(True) < 0.7 * padded(False)
    ranks = [list(data.TrainBatchSampler(lengths, 32, r, 3, seed=0, group_by_length=True)) for r in range(3)]
    assert len({sum(map(len, b)) for b in ranks}) == 1  # 2001 -> 667 each; same batch count on every rank
    assert len({i for b in ranks for batch in b for i in batch}) == 2001


@pytest.mark.parametrize("group", [False, True])
def test_uneven_data_differs_from_one_process_only_in_the_padded_last_step(group):
    lengths = [(i * 13) % 40 + 1 for i in range(101)]  # 101 examples on 2 ranks: one is repeated
    single = list(data.TrainBatchSampler(lengths, 8, 0, 1, seed=1, group_by_length=group))
    ranks = [list(data.TrainBatchSampler(lengths, 4, r, 2, seed=1, group_by_length=group)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 13
    for t in range(12):
        assert sorted(ranks[0][t] + ranks[1][t]) == sorted(single[t])
    last = ranks[0][12] + ranks[1][12]
    assert len(last) == 6 and set(single[12]) <= set(last)  # the 5 real ones plus one repeat


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("multiple", [None, 8, 32])
@pytest.mark.parametrize("with_types", [True, False])
@pytest.mark.parametrize("variant", ["bert", "type pad id 3", "no attention mask"])
@pytest.mark.parametrize("rows_from", ["encode", "the tokenizer"])
def test_pad_collator_builds_what_transformers_collator_builds(tiny_model_dir, side, multiple, with_types, variant,
                                                               rows_from):
    from transformers import AutoTokenizer, DataCollatorWithPadding
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = side
    if variant == "type pad id 3":  # as XLNet's tokenizer pads token types
        tokenizer._pad_token_type_id = 3  # what its property reads; there is no setter
    elif variant == "no attention mask":  # as FNet's tokenizer, whose model takes no mask
        tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n != "attention_mask"]
    texts = ["a", "a much longer text than the first one, with words", "middle sized text", "x y"]
    rows = [dict(enc, labels=i % 2) for i, enc in
            enumerate(tokenizer(t, return_token_type_ids=with_types) for t in texts)]
    rows = [{k: list(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
    # rows as the data pipeline tokenizes them (without the attention mask, which the padder rebuilds), or as the
    # tokenizer gives them (a row's own mask is used)
    enc = encode(tokenizer, texts, 512)
    assert "attention_mask" not in enc
    ours_rows = rows if rows_from == "the tokenizer" else [
        {**{k: enc[k][i] for k in enc if with_types or k != "token_type_ids"}, "labels": i % 2} for i in range(len(texts))]
    batch = PadCollator(tokenizer, multiple)(ours_rows)
    ours = batch.tensors()
    theirs = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)(rows)
    assert batch.num_examples == len(texts)
    assert batch.num_tokens == sum(len(r["input_ids"]) for r in rows)  # real tokens, not pads
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype == torch.long, key
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["input_ids"].shape[1] % (multiple or 1) == 0


def test_pad_collator_needs_a_padding_token(tiny_model_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    with pytest.raises(UserError, match="no padding token"):
        PadCollator(tokenizer)


def test_dataset_split_flags_choose_the_splits_and_a_stand_in_is_said(tiny_model_dir, tmp_path, capsys):
    """--train_split / --validation_split / --test_split on a dataset datasets.load_dataset reads (a local folder
    of split files: the Hub's loader, offline)."""
    from encoderfit import UserError, fit
    from conftest import synthetic_rows, write_rows

    folder = tmp_path / "ds"
    folder.mkdir()
    write_rows(folder / "train.csv", synthetic_rows(120, seed=1))
    write_rows(folder / "test.csv", synthetic_rows(40, seed=2))
    common = dict(model=str(tiny_model_dir), epochs=1, batch_size=16, max_length=24, device="cpu", no_progress=True,
                  checkpoint_dir=tmp_path / "ck", dataset=str(folder))
    fit(run_name="stand-in", **common)
    out = capsys.readouterr().out
    info = json.loads((tmp_path / "ck" / "stand-in" / "data.json").read_text())
    assert info["validation_examples"] == 40 and info["train_examples"] == 120
    assert f"dataset {str(folder)!r} has no 'validation' split: its test split validates the run" in out
    assert any("has no 'validation' split" in n for n in info["notes"])
    # none: a split of the training data is held out; the test split scored once at the end
    result = fit(run_name="held-out", validation_split="none", test_split="test", **common)
    info = json.loads((tmp_path / "ck" / "held-out" / "data.json").read_text())
    assert info["validation_examples"] == 12 and info["train_examples"] == 108
    assert result.summary["test"]["examples"] == 40
    assert result.summary["test"]["data"] == f"the 'test' split of dataset {folder}"
    assert set(result.test_metrics) == {"accuracy", "macro_f1", "loss"}
    # the test split is never the validation's stand-in: with it named, a split of the training data validates
    kept = fit(run_name="kept-apart", test_split="test", **common)
    assert json.loads((tmp_path / "ck" / "kept-apart" / "data.json").read_text())["validation_examples"] == 12
    assert kept.summary["test"]["examples"] == 40
    with pytest.raises(UserError, match="--test_split train is the split the run trains or validates on"):
        fit(run_name="bad", test_split="train", **common)
    with pytest.raises(UserError, match=r"has no 'dev' split \(it has: train, test\): give --validation_split one"):
        fit(run_name="bad", validation_split="dev", **common)
    with pytest.raises(UserError, match="--train_split names a split of --dataset: give --dataset"):
        fit(train_split="train", device="cpu")
