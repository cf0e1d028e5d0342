"""Ray Data: a callable class for `Dataset.map_batches` (extra `pip install 'roberta_fast[ray]'`).

    import ray
    from roberta_fast.embed.ray import EmbedBatch

    ds = ray.data.read_parquet("s3://bucket/corpus/")                 # a column "text"
    ds = ds.map_batches(EmbedBatch, fn_constructor_kwargs={"model_dir": "/models/all-MiniLM-L6-v2"},
                        concurrency=8, num_gpus=1, batch_size=4096)  # one model per actor, one GPU each
    ds.write_parquet("s3://bucket/embeddings/")                       # every column kept, plus "embedding"

Ray does the scheduling, the retries of failed tasks and actors, and the autoscaling; this class only loads one
Embedder per actor (on the GPU Ray gave it, else the CPU) and encodes each batch of texts (the whole batch goes
through Embedder.encode: sorted, token-budget batches inside). Nothing here imports ray: the class works with any
engine that calls it with a dict of columns or a pandas DataFrame.
"""

from __future__ import annotations

import numpy as np

from .embedder import Embedder


class EmbedBatch:
    """fn(batch) -> batch with an `output_column` of float32 embeddings (one row per text, in order).

    model_dir: the model folder (sentence-transformers or transformers); text_column: the batch column holding
    str; output_column: the new column's name (default "embedding"); other keyword arguments go to
    Embedder.from_pretrained (dtype, device, pooling, normalize, max_length, cuda_graphs); encode_kwargs go to
    encode() (batch_tokens, ...). A missing column, or a value that is not a str (None, a number), raises
    ValueError naming the column and the row in the batch: Ray then retries or fails the task, as configured."""

    def __init__(self, model_dir: str, *, text_column: str = "text", output_column: str = "embedding",
                 encode_kwargs: dict | None = None, **kwargs):
        self.embedder = Embedder.from_pretrained(model_dir, **kwargs)
        self.text_column = text_column
        self.output_column = output_column
        self.encode_kwargs = dict(encode_kwargs or {})

    def __call__(self, batch):
        if self.text_column not in batch:
            cols = list(batch.keys()) if isinstance(batch, dict) else list(batch.columns)
            raise ValueError(f"EmbedBatch: the batch has no column {self.text_column!r} (columns: {cols}); "
                             "set text_column=")
        texts = list(batch[self.text_column])
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"EmbedBatch: column {self.text_column!r} row {i} of this batch is "
                                 f"{type(t).__name__}, not a str")
        emb = self.embedder.encode(texts, output="numpy", **self.encode_kwargs)  # (n, dim) float32
        if isinstance(batch, dict):
            out = dict(batch)
            out[self.output_column] = emb
            return out
        out = batch.copy()  # a pandas DataFrame
        out[self.output_column] = list(np.asarray(emb))
        return out
