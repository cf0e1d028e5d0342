"""Sentence embeddings at scale (docs/embedding.md).

    embedder.py    Embedder: from_pretrained(path), encode(texts) (sorted, token-budget batches built on the host,
                   tokenization overlapped with the device work, results in input order)
    io.py          streaming input (text lines, jsonl field, csv / parquet column) and chunked output (.npy,
                   parquet) with a manifest, --resume and the bad-line rule
    job.py         the `roberta-fast embed` command and `python -m roberta_fast.embed` (torchrun sharding, merge)
    ray.py         EmbedBatch: a callable class for Ray Data's Dataset.map_batches (extra roberta_fast[ray])
"""

from .embedder import Embedder, SentenceConfig, read_sentence_config  # noqa: F401
