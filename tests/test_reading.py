"""Reading .csv/.tsv files: quoting that cannot lose rows (--quoting auto|minimal|none), in training and the tools."""
import json

import pytest

from conftest import run_script, synthetic_rows, write_rows
from encoderfit import data
from encoderfit.cli import evaluate
from encoderfit.cli import predict
from encoderfit.utils import UserError

N = 200


def plain_csv(path, rows, delimiter=","):
    """Rows written by hand, one a line, with no quoting at all: what people make with an editor or a script."""
    path.write_text("text{0}label\n".format(delimiter)
                    + "".join(f"{r['text']}{delimiter}{r['label']}\n" for r in rows), encoding="utf-8")
    return path


def unclosed_quote_rows(close_later: bool = False) -> list:
    """200 rows; row 5 (line 7) begins with a quote it never closes. With ``close_later``, a text four rows
    on ends with a quote, so standard quoting reads lines 7-11 as one valid row: rows would vanish."""
    rows = synthetic_rows(N, seed=9)
    rows[5]["text"] = '"' + rows[5]["text"]
    if close_later:
        rows[9]["text"] = rows[9]["text"] + '"'
    return rows


def train(tmp_path, tiny_model_dir, path, *extra, run=run_script):
    return run("train_single.py", "--model", tiny_model_dir, "--train_file", path, "--epochs", 1,
               "--max_length", 32, "--checkpoint_dir", tmp_path / "ck", "--run_name", "r", *extra)


def one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_an_unclosed_quote_loses_no_row(tmp_path, tiny_model_dir, run_main):
    # pandas' parser (what datasets' csv builder runs) made 91 rows of these 200, without a word
    path = plain_csv(tmp_path / "train.csv", unclosed_quote_rows())
    proc = train(tmp_path, tiny_model_dir, path, run=run_main)
    assert proc.returncode == 0, proc.stderr
    # auto: standard quoting cannot read line 7, every line has 2 fields with plain quotes: read so, said so
    assert "note: " in proc.stdout and "line 7" in proc.stdout and "--quoting none" in proc.stdout
    info = json.loads((tmp_path / "ck" / "r" / "data.json").read_text())
    assert info["rows_read"] == {str(path): N} and info["quoting"] == {str(path): "none"}
    assert info["train_examples"] + info["validation_examples"] == N
    # minimal: standard quoting only, so the file is refused, naming the line and the other flag
    proc = train(tmp_path, tiny_model_dir, path, "--quoting", "minimal", "--run_name", "m", run=run_main)
    line = one_error_line(proc)
    assert "line 7" in line and "never closed" in line and "--quoting none" in line


def test_a_quote_that_would_swallow_rows_is_an_error_naming_the_line_and_both_flags(tmp_path, tiny_model_dir,
                                                                                    run_main):
    path = plain_csv(tmp_path / "train.csv", unclosed_quote_rows(close_later=True))
    line = one_error_line(train(tmp_path, tiny_model_dir, path, run=run_main))
    assert "line 7" in line and "line 11" in line and "--quoting none" in line and "--quoting minimal" in line
    # either flag settles it: none keeps every row, minimal reads lines 7-11 as one row, as asked
    assert len(data.read_delimited(path, "none").rows) == N
    assert len(data.read_delimited(path, "minimal").rows) == N - 4


def test_standard_quoting_with_line_breaks_and_delimiters_reads_right_under_auto(tmp_path):
    rows = synthetic_rows(40, seed=2)
    rows[1]["text"] = "a text, with a comma"
    rows[2]["text"] = 'she said "superb", then left\nand a second line'
    rows[3]["text"] = '"quoted from the start" and on'
    rows[4]["text"] = "three\n\nparagraphs\r\nhere"
    path = write_rows(tmp_path / "t.csv", rows)  # csv.writer: standard quoting
    assert len(path.read_text().splitlines()) > 41  # the line breaks are in the file
    table = data.read_delimited(path)
    assert table.quoting == "minimal" and table.notes == [] and len(table.rows) == 40
    assert [r[0] for r in table.rows] == [r["text"] for r in rows]
    assert table.lines[2] == 4 and table.lines[5] == 11  # where each record starts: line breaks counted


def test_tsv_quotes_that_belong_to_the_text_are_kept(tmp_path, trained, capsys):
    # datasets' builder turned '"of" course ...' into 'of course ...'
    rows = synthetic_rows(6, seed=1, labels=("alpha", "beta", "gamma"))
    rows[2]["text"] = '"of" course topic1'
    path = plain_csv(tmp_path / "in.tsv", rows, delimiter="\t")
    out = tmp_path / "out.jsonl"
    assert predict.main(["--device", "cpu", "--checkpoint", str(trained / "final"), "--input", str(path), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: " in err and "line 4" in err and "--quoting none" in err
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == [r["text"] for r in rows]
    # minimal: the same reader as training, the same refusal
    assert predict.main(["--device", "cpu", "--checkpoint", str(trained / "final"), "--input", str(path), "--quoting", "minimal"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "line 4" in err and "--quoting none" in err and len(err.splitlines()) == 1


def test_evaluate_reads_as_training_reads(tmp_path, trained, capsys):
    rows = synthetic_rows(30, seed=4, labels=("alpha", "beta", "gamma"))
    rows[3]["text"] = '"' + rows[3]["text"]
    path = plain_csv(tmp_path / "test.csv", rows)
    out = tmp_path / "eval.json"
    assert evaluate.main(["--device", "cpu", "--checkpoint", str(trained / "final"), "--validation_file", str(path),
                          "--output", str(out)]) == 0
    assert "--quoting none" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["examples"] == 30 and result["data"]["rows_read"] == {str(path): 30}
    assert evaluate.main(["--device", "cpu", "--checkpoint", str(trained / "final"), "--validation_file", str(path),
                          "--quoting", "minimal"]) == 2
    assert "line 5" in capsys.readouterr().err


def test_integer_labels_stay_integers_sorted_numerically(tmp_path):
    rows = [{"text": r["text"], "label": [10, 2, 1][i % 3]} for i, r in enumerate(synthetic_rows(30))]
    path = plain_csv(tmp_path / "t.csv", rows)
    splits = data.load_labelled_splits(data.DataSource.from_settings(train_file=str(path)),
                                       validation_fraction=0.2, split_seed=1, num_samples=None)
    assert splits.label_names == ["1", "2", "10"]  # not "1", "10", "2"
    assert splits.info["rows_read"] == {str(path): 30}


@pytest.mark.parametrize("quoting", ["auto", "minimal", "none"])
def test_a_row_with_a_field_too_many_names_its_line(tmp_path, quoting):
    path = tmp_path / "t.csv"
    path.write_text("text,label\na,pos\nb,neg,extra\nc,neg\n")
    with pytest.raises(UserError, match="line 3") as err:
        data.read_delimited(path, quoting)
    assert "3 fields" in str(err.value) or "saw 3" in str(err.value)


def test_a_file_that_quotes_fields_is_not_read_with_plain_quotes(tmp_path):
    # a stray quote in a file that uses quoting elsewhere: reading quotes as text would change those fields too
    path = tmp_path / "t.csv"
    path.write_text('text,label\n"a, quoted text",pos\n"a stray quote,neg\nplain,pos\n')
    with pytest.raises(UserError, match=r"line 3 .*never closed.*--quoting none"):
        data.read_delimited(path)


def test_duplicate_header_names_are_an_error(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label,text\na,pos,b\n")
    with pytest.raises(UserError, match="column 'text' appears twice in the header"):
        data.read_delimited(path)


def test_the_quoting_flag_is_training_s_everywhere():
    from encoderfit.config import TrainConfig, build_parser, fields_marked

    assert "quoting" in fields_marked("data") and "quoting" in fields_marked("must_match")
    assert TrainConfig().quoting == "auto"
    for parser in (build_parser(), evaluate.build_parser(), predict.build_parser()):
        action = next(a for a in parser._actions if a.dest == "quoting")
        assert tuple(action.choices) == data.QUOTING_MODES


def test_csv_written_by_pandas_with_its_index_column_reads(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(synthetic_rows(12))
    frame.to_csv(tmp_path / "t.csv")  # a first column with an empty name
    table = data.read_delimited(tmp_path / "t.csv")
    assert table.columns == ["Unnamed: 0", "text", "label"] and len(table.rows) == 12
    assert table.column("Unnamed: 0") == list(range(12))  # a column of integers comes back as integers
