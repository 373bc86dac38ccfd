"""FedBPT task files load as they come (byte-order marks, header names with '#', spaces and
punctuation, headerless CSV with the names in config, quoted TSV), each failure names the
file, line and field; and causal LMs read templates with the answer after the text."""

import logging

import pytest

from fedtune import config as C
from fedtune.errors import ConfigError, DataError
from fedtune.fedbpt.table import TableFormat, read_table
from fedtune.fedbpt.tasks import ANSWER_SLOT, BUILTIN, for_model, load_examples, render, task_from_config


def _task(*sets):
    return task_from_config(C.load(None, ["run.algorithm='fedbpt'", *sets]).task)


def test_a_byte_order_mark_is_not_part_of_the_first_header_name(tmp_path):
    f = tmp_path / "q.csv"
    f.write_bytes("\ufeffQuality,#1 String\n1,good text\n0,bad text\n".encode("utf-8"))
    spec = _task("task.name='custom'", "task.text_columns=['#1 String']", "task.label_column='Quality'",
                 "task.template='<P> {#1 String} . It was <mask> .'", "task.verbalizer={0 = 'bad', 1 = 'great'}")
    rows = load_examples(spec, str(f))
    assert [r.texts for r in rows] == [("good text",), ("bad text",)] and [r.label for r in rows] == [1, 0]
    assert rows[0].source.endswith("q.csv:2")


def test_header_names_with_spaces_and_punctuation_fill_the_template():
    spec = _task("task.name='custom'", "task.text_columns=['Review (text), #1']", "task.label_column='y'",
                 "task.template='{Review (text), #1} . It was <mask> .'", "task.verbalizer={a = 'bad', b = 'great'}")
    assert render(spec, ["fine"]).before_answer == "fine . It was "


def test_a_missing_column_shows_the_fields_as_they_are_and_the_closest_one(tmp_path):
    f = tmp_path / "t.tsv"
    f.write_text("Sentence \tlabel\nhi\t0\n")  # a stray space in the header name
    spec = _task()
    with pytest.raises(DataError, match=r"t.tsv:2: missing text column 'sentence' \(fields: 'Sentence', 'label'\); "
                                        r"did you mean 'Sentence'\?"):
        load_examples(spec, str(f))


def test_a_headerless_csv_takes_its_column_names_from_the_config(tmp_path):
    f = tmp_path / "ag.csv"  # AG News as released: class index, title, description; no header
    f.write_text('"3","Wall St. Bears Claw Back","Reuters - Short-sellers, Wall Street\'s dwindling band"\n'
                 '"2","Sox win","Boston (AP) - the Red Sox won"\n')
    spec = _task("task.name='agnews'", "task.verbalizer={1 = 'World', 2 = 'Sports', 3 = 'Business', 4 = 'Tech'}")
    fmt = TableFormat(columns=("label", "title", "text"))  # naming the text column as the built-in task does
    rows = load_examples(spec, str(f), fmt)
    assert rows[0].texts == ("Reuters - Short-sellers, Wall Street's dwindling band",) and rows[0].label == 2
    assert rows[1].source.endswith("ag.csv:2")  # the first line is data, not a header
    f.write_text('"3","only two"\n')
    with pytest.raises(DataError, match=r"ag.csv:1: 2 fields, task.columns has 3 \(label, title, text\)"):
        load_examples(spec, str(f), fmt)
    with pytest.raises(DataError, match="appears more than once in the task.columns list"):
        read_table(f, TableFormat(columns=("a", "a")))


def test_quoted_tsv_is_read_as_quoted_and_glue_tsv_as_unquoted(tmp_path):
    quoted = tmp_path / "q.tsv"
    quoted.write_text('"sentence"\t"label"\n"a tab\there and a ""quote"""\t"1"\n"two\nlines"\t"0"\n')
    got = read_table(quoted)
    assert [r["sentence"] for _, r in got] == ['a tab\there and a "quote"', "two\nlines"]
    assert [w.rsplit(":", 1)[1] for w, _ in got] == ["2", "3"]  # the line each row starts on
    glue = tmp_path / "g.tsv"
    glue.write_text('sentence\tlabel\n"a film that starts with a quote \t1\n')
    assert read_table(glue)[0][1]["sentence"] == '"a film that starts with a quote '
    bad = tmp_path / "b.tsv"
    bad.write_text("sentence\tlabel\nonly one field\n")
    with pytest.raises(DataError, match=r"b.tsv:2: 1 fields, the header has 2 \(sentence, label\); if fields are "
                                        r"quoted, set task.quoting = 'csv'"):
        read_table(bad)
    plain = tmp_path / "p.tsv"
    plain.write_text('"sentence"\t"label"\n"hi"\t"1"\n')
    assert read_table(plain, TableFormat(quoting="none"))[0][1] == {'"sentence"': '"hi"', '"label"': '"1"'}
    assert read_table(plain)[0][1] == {"sentence": "hi", "label": "1"}


def test_every_builtin_task_has_a_causal_template_with_the_answer_after_every_text_field():
    for name, spec in BUILTIN.items():
        causal = for_model(spec, "causal")
        head = causal.template.split(ANSWER_SLOT)[0]
        assert all("{" + c + "}" in head for c in spec.text_columns), name
        assert for_model(spec, "masked").template == spec.template  # masked LMs keep BBT's
    assert for_model(BUILTIN["agnews"], "causal").template != BUILTIN["agnews"].template


def test_a_causal_template_whose_answer_comes_before_the_text_is_refused(caplog):
    mine = _task("task.name='agnews'", "task.template='<P> . <mask> News: {text}'")
    assert for_model(mine, "masked").template == "<P> . <mask> News: {text}"
    with pytest.raises(ConfigError, match=r"no text field \(text\) comes before it"):
        for_model(mine, "causal")
    with pytest.raises(ConfigError, match=r"\[task\]: .*no text field"):  # an explicit model_kind fails at config time
        C.load(None, ["run.algorithm='fedbpt'", "task.name='agnews'", "fedbpt.model_kind='causal'",
                      "task.template='<P> . <mask> News: {text}'"])
    pair = _task("task.name='rte'", "task.template='<P> . {sentence1} ? <mask> , {sentence2}'")
    with caplog.at_level(logging.WARNING, logger="fedtune.fedbpt"):
        for_model(pair, "causal")
    assert "does not see sentence2" in caplog.text


def test_glue_and_snli_release_files_load_under_the_builtin_tasks(tmp_path):
    # GLUE's RTE TSV holds label words, its MRPC TSV "#1 String" / "Quality" columns after a
    # byte-order mark, and SNLI's own release sentence1 / sentence2 / gold_label with "-" for no gold label
    rte = tmp_path / "rte.tsv"
    rte.write_text("index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tA man rests.\tentailment\n"
                   "1\tA man sleeps.\tA man runs.\tnot_entailment\n")
    assert [r.label for r in load_examples(_task("task.name='rte'"), str(rte))] == [0, 1]  # BUILTIN's 0 = entailment
    mrpc = tmp_path / "msr_paraphrase_train.txt"
    mrpc.write_bytes("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t7\t8\tHe said so.\tHe said it.\n"
                     "0\t9\t10\tIt rained.\tShe left.\n".encode("utf-8"))
    rows = load_examples(_task("task.name='mrpc'"), str(mrpc))
    assert [(r.texts, r.label) for r in rows] == [(("He said so.", "He said it."), 1), (("It rained.", "She left."), 0)]
    (tmp_path / "notes.txt").write_text("Quality,#1 String\n1,hi\n")
    with pytest.raises(DataError, match=r"notes.txt: a .txt file is read as tab-separated values"):
        load_examples(_task("task.name='mrpc'"), str(tmp_path / "notes.txt"))
    snli = tmp_path / "snli_1.0_dev.jsonl"
    snli.write_text('{"gold_label": "contradiction", "sentence1": "A dog.", "sentence2": "A cat."}\n'
                    '{"gold_label": "-", "sentence1": "A dog.", "sentence2": "An animal?"}\n'
                    '{"gold_label": "neutral", "sentence1": "A dog.", "sentence2": "A big dog."}\n')
    rows = load_examples(_task("task.name='snli'"), str(snli))
    assert [(r.texts, r.label) for r in rows] == [(("A dog.", "A cat."), 2), (("A dog.", "A big dog."), 1)]


def test_a_label_map_reads_the_files_values_and_an_ambiguous_one_is_refused(tmp_path):
    f = tmp_path / "qnli.tsv"
    f.write_text("index\tquestion\tsentence\tlabel\n0\tWho?\tHe did.\tentailment\n1\tWhen?\tBlue.\tnot_entailment\n"
                 "2\tWhy?\tNo.\tmaybe\n")
    spec = _task("task.name='custom'", "task.text_columns=['sentence', 'question']",
                 "task.template='<P> {sentence} Question: {question} Answer: <mask>'",
                 "task.verbalizer={yes = 'Yes', no = 'No'}", "task.label_map={entailment = 'yes', not_entailment = 'no'}")
    with pytest.raises(DataError, match=r"qnli.tsv:4: label 'maybe' is not in task.verbalizer or task.label_map"):
        load_examples(spec, str(f))
    f.write_text("\n".join(f.read_text().splitlines()[:3]) + "\n")
    assert [r.label for r in load_examples(spec, str(f))] == [0, 1]
    # a user's verbalizer keyed by the file's own words is read as it is, not through the built-in map
    rte = tmp_path / "rte.tsv"
    rte.write_text("index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n1\tA.\tC.\tnot_entailment\n")
    spec = _task("task.name='rte'", "task.verbalizer={not_entailment = 'No', entailment = 'Yes'}")
    assert [r.label for r in load_examples(spec, str(rte))] == [1, 0]
    with pytest.raises(ConfigError, match=r"task.label_map: '1' is itself a label of task.verbalizer"):
        _task("task.name='agnews'", "task.label_map={1 = '0'}")
    with pytest.raises(ConfigError, match=r"task.label_map: 'pos' maps to 'positive', which is not a label"):
        _task("task.label_map={pos = 'positive'}")


def test_own_skip_labels_keep_the_builtin_label_map_valid():
    # SNLI's built-in map sends "-" to "-1", a skip label; with the user's own skip labels the map keeps
    # only what still names a label, instead of refusing a map the user never wrote
    spec = _task("task.name='snli'", "task.skip_labels=['9']")
    assert dict(spec.label_map) == {"entailment": "0", "neutral": "1", "contradiction": "2"}
