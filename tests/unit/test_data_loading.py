from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitflow.config import DataSource, PrepareSection
from logitflow.data.load import fingerprint, load_corpus, load_pool, load_preferences, split_indices
from logitflow.data.schemas import BadRows
from logitflow.errors import DataError

GOOD = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}


def _section(path: Path, **kwargs) -> PrepareSection:
    source = DataSource(type="local", path=str(path))
    return PrepareSection(corpus=source, preferences=source, **kwargs)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_bytes(b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n")
    return path


MALFORMED = [
    ({"prompt": "q", "rejected": "5"}, "field 'chosen': missing field"),
    ({"prompt": "q", "chosen": 4, "rejected": "5"}, "field 'chosen': not text (int)"),
    ({"prompt": "q", "chosen": ["a"], "rejected": "5"}, "field 'chosen': message 0 is not"),
    ({"prompt": "q", "chosen": "   ", "rejected": "5"}, "field 'chosen': empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "field 'rejected': chosen and rejected are the same"),
    ({"prompt": "", "chosen": "4", "rejected": "5"}, "field 'prompt': empty"),
    ({"prompt": None, "chosen": "4", "rejected": "5"}, "field 'prompt': missing field"),
    ({"prompt": [{"role": "user"}], "chosen": "4", "rejected": "5"}, "field 'prompt': message 0"),
    ({"prompt": "q", "chosen": True, "rejected": "5"}, "field 'chosen': not text (bool)"),
    (b'{"prompt": "q", "chosen": "\xff\xfe", "rejected": "5"}', "undecodable bytes (not UTF-8)"),
    (b'{"prompt": "q", "chosen": ', "not valid JSON"),
    (b"[1, 2]", "expected a JSON object, got list"),
]


@pytest.mark.parametrize(("bad", "expected"), MALFORMED, ids=[e for _, e in MALFORMED])
def test_malformed_preference_row_is_named(tmp_path: Path, bad: object, expected: str) -> None:
    path = _write_jsonl(tmp_path / "prefs.jsonl", [GOOD, {**GOOD, "chosen": "four"}, bad])
    with pytest.raises(DataError) as err:
        load_preferences(_section(path), BadRows())
    assert f"prefs.jsonl line 3{',' if 'field' in expected else ':'}" in str(err.value)
    assert expected in str(err.value)


def test_skip_counts_every_bad_row(tmp_path: Path) -> None:
    rows = [GOOD] + [bad for bad, _ in MALFORMED] + [{**GOOD, "chosen": "four"}]
    path = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    bad_rows = BadRows()
    prefs, key = load_preferences(_section(path, on_bad_rows="skip"), bad_rows)
    assert len(prefs) == 2 and key is None
    assert bad_rows.total == len(MALFORMED)
    assert bad_rows.as_dict()["by_reason"]["missing field"] == 2
    assert any("line 11" in example for example in bad_rows.examples)


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q"}])
    with pytest.raises(DataError, match="no usable preference rows"):
        load_preferences(_section(path, on_bad_rows="skip"), BadRows())


def test_hh_rlhf_and_ultrafeedback_normalise_to_the_same_pair(tmp_path: Path) -> None:
    hh = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2 + 2?\n\nAssistant: 4",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2 + 2?\n\nAssistant: 5",
    }
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    question = {"role": "user", "content": "What is 2 + 2?"}
    uf = {
        "prompt": "What is 2 + 2?",
        "chosen": [*convo, question, {"role": "assistant", "content": "4"}],
        "rejected": [*convo, question, {"role": "assistant", "content": "5"}],
    }
    expected = {"prompt": [*convo, question], "chosen": "4", "rejected": "5"}
    for name, row in (("hh", hh), ("uf", uf)):
        path = _write_jsonl(tmp_path / f"{name}.jsonl", [row])
        prefs, _ = load_preferences(_section(path), BadRows())
        got = prefs[0]
        assert {k: got[k] for k in expected} == expected, name


def test_hh_rlhf_with_different_prompts_is_refused(tmp_path: Path) -> None:
    row = {"chosen": "\n\nHuman: A?\n\nAssistant: yes", "rejected": "\n\nHuman: B?\n\nAssistant: no"}
    path = _write_jsonl(tmp_path / "hh.jsonl", [row])
    with pytest.raises(DataError, match="field 'rejected': the rejected transcript has a different prompt"):
        load_preferences(_section(path), BadRows())


def test_json_csv_parquet_load_the_same_rows(tmp_path: Path) -> None:
    rows = [GOOD, {"prompt": "Say hi", "chosen": "hi", "rejected": "bye"}]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\n" + "\n".join(",".join(r.values()) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    loaded = []
    for name in ("p.json", "p.csv", "p.parquet"):
        prefs, _ = load_preferences(_section(tmp_path / name), BadRows())
        loaded.append([(r["prompt"][0]["content"], r["chosen"], r["rejected"]) for r in prefs])
    assert loaded[0] == loaded[1] == loaded[2] == [("What is 2 + 2?", "4", "5"), ("Say hi", "hi", "bye")]


def test_csv_empty_cell_and_undecodable_file(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\nq,4,5\nq2,,5\n")
    with pytest.raises(DataError, match=r"p.csv line 3, field 'chosen': empty"):
        load_preferences(_section(tmp_path / "p.csv"), BadRows())
    (tmp_path / "b.csv").write_bytes(b"prompt,chosen,rejected\nq,4,5\nq,\xff,5\n")
    with pytest.raises(DataError, match=r"b.csv line 3: undecodable bytes"):
        load_preferences(_section(tmp_path / "b.csv"), BadRows())


def test_parquet_non_text_value_is_named(tmp_path: Path) -> None:
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "q", "chosen": b"\x00\x01", "rejected": "5"}]), tmp_path / "b.parquet"
    )
    with pytest.raises(DataError, match=r"b.parquet row 1, field 'chosen': not text \(bytes\)"):
        load_preferences(_section(tmp_path / "b.parquet"), BadRows())


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [("missing.jsonl", None, "data file not found"), ("p.txt", "x", "unsupported file type '.txt'")],
)
def test_unusable_files(tmp_path: Path, name: str, content: str | None, expected: str) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=expected):
        load_preferences(_section(tmp_path / name), BadRows())


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "p.jsonl", [{**GOOD, "id": "a"}, {**GOOD, "id": "a", "chosen": "four"}])
    with pytest.raises(DataError, match="id 'a' appears twice"):
        load_preferences(_section(path), BadRows())


def test_corpus_rows_and_text_field(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "c.jsonl", [{"body": "one"}, {"body": "two"}, {"text": "no body"}])
    with pytest.raises(DataError, match="c.jsonl line 3, field 'body': missing field"):
        load_corpus(_section(path, text_field="body"), BadRows())
    bad_rows = BadRows()
    corpus = load_corpus(_section(path, text_field="body", on_bad_rows="skip"), bad_rows)
    assert corpus["text"] == ["one", "two"] and bad_rows.total == 1


def test_pool_rows(tmp_path: Path) -> None:
    rows = [
        {"prompt": "q", "response_a": "x", "response_b": "y"},
        {"prompt": "q", "response_a": "x", "response_b": "x"},
    ]
    path = _write_jsonl(tmp_path / "pool.jsonl", rows)
    source = DataSource(type="local", path=str(path))
    with pytest.raises(
        DataError, match="pool.jsonl line 2, field 'response_b': response_a and response_b are the same"
    ):
        load_pool(source, "error", BadRows())
    assert len(load_pool(source, "skip", BadRows())) == 1


def test_hub_source_offline_gives_a_clear_error() -> None:
    section = PrepareSection(preferences=DataSource(type="hub", name="no-such-org/no-such-dataset"))
    with pytest.raises(DataError, match=r"hub:no-such-org/no-such-dataset\[train\]: cannot load the hub dataset"):
        load_preferences(section, BadRows())


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, heldout = split_indices(100, 0.1, seed=3)
    assert len(heldout) == 10 and sorted(train + heldout) == list(range(100))
    assert (train, heldout) == split_indices(100, 0.1, seed=3)
    assert heldout != split_indices(100, 0.1, seed=4)[1]
    assert split_indices(2, 0.01, seed=0)[1] and split_indices(2, 0.99, seed=0)[0]
    with pytest.raises(DataError, match="at least 2 rows"):
        split_indices(1, 0.5, seed=0)


def test_fingerprint_tracks_content() -> None:
    import datasets

    a = datasets.Dataset.from_list([{"text": "x"}, {"text": "y"}])
    b = datasets.Dataset.from_list([{"text": "x"}, {"text": "y"}])
    c = datasets.Dataset.from_list([{"text": "x"}, {"text": "z"}])
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
