"""LSH self-attention (Reformer-style, non-causal) in plain PyTorch: the hashing, sorting and chunking every
backend shares, and the chunked attention of the "torch" backend (the test oracle in float64).

One call, per sequence and head (docs/lsh_attention.md):
  1. n_buckets = ceil(S / bucket_size), rounded up to an even number (at least 2), where S is the padded length
     (padded inputs) or max_seqlen (varlen inputs, which run as a padded batch with a key padding mask).
  2. Per hash round r, random rotations R_r (head_dim, n_buckets / 2) per head, drawn from a CPU
     torch.Generator seeded with `seed` (identical on every device) and rounded to float16's values;
     bucket(x) = argmax([x R_r, -x R_r]), computed in float32 from the input's values (so a float64 oracle
     hashes as the float16 call does; a float16 x R_r is exact in every product, and the Triton backend's
     hashing kernel sums in float32 too, on tensor cores for float16 inputs: only a near-tie within float32
     rounding, summed in another order, can put a token in another bucket than the reference's).
     Padding tokens get the bucket n_buckets: they sort after every real token.
  3. Sorting. Shared QK (k=None, Reformer's choice): keys are the L2-normalised queries; each token is one item,
     sorted by (bucket, position) (stable within a bucket), cut into chunks of C = bucket_size. Separate k:
     queries and keys (v following k) are hashed with the same rotations and sorted TOGETHER as 2S items by
     (bucket, position, query before key), cut into chunks of 2C slots: a query's chunk holds the keys of its
     own buckets (about C of them, the key budget of shared QK) whatever the two distributions are (sorting
     them separately would pair them by rank, not by bucket). The tail is padded with empty slots.
  4. The queries of chunk c attend to the keys of chunks c - 1 and c (Reformer's look-one-back; chunk 0 looks
     at itself only, there is no wrap-around, so one chunk covering the sequence is exactly full attention).
     With shared QK a token's score with itself is replaced by SELF_SCORE (-1e5): it attends to itself only
     when it has no other key.
  5. Each round gives (o_r, lse_r) per query; rounds are combined as sum_r softmax_r(lse_r) o_r. A (query, key)
     pair found in several rounds counts once per round (no de-duplication, unlike Reformer's optional
     correction): the combination is the attention over the multiset union of the rounds' keys. Identical
     rounds (one bucket covering all) give full attention exactly.
A query row that sees no real key gives zeros (lse -inf); padded query rows give zeros.

The hashing and sorting (`plan`, `unsort_combine`) run in torch for every backend; only the chunked attention
(`chunk_attention`) has a Triton kernel (kernels/lsh_attention.py). Memory is linear in S: per round the
scores are (S / C) chunks of C x 2C (shared QK), or (2S / 2C) chunks of 2C x 4C slots of which about a quarter
pair a query with a key (separate k: half the slots hold no query, half no key).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

SELF_SCORE = -1e5  # the scaled score of a token with itself under shared QK (Reformer's self-mask value)


def n_buckets(seqlen: int, bucket_size: int) -> int:
    """ceil(seqlen / bucket_size) rounded up to even, at least 2 (argmax over [xR, -xR] needs an even count)."""
    n = max(1, -(-seqlen // bucket_size))
    return n + (n % 2)


def rotations(seed: int, num_hashes: int, heads: int, head_dim: int, buckets: int, device) -> torch.Tensor:
    """(num_hashes, heads, head_dim, buckets // 2) float32 Gaussian rotations drawn on the CPU from `seed`, then
    moved to `device`: the same values on every device."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    r = torch.randn((num_hashes, heads, head_dim, buckets // 2), generator=g, dtype=torch.float32)
    return r.to(device)


@functools.lru_cache(maxsize=32)
def hash_matrix(seed: int, num_hashes: int, heads: int, head_dim: int, buckets: int, device) -> torch.Tensor:
    """[R, -R] (num_hashes, heads, head_dim, buckets) float32 of `rotations` rounded to float16's values (so a
    float16 x R is exact in every product, on tensor cores too), made once per (seed, sizes, device): a call
    draws nothing and copies nothing to the device; argmax(x [R, -R]) is the bucket."""
    r = rotations(seed, num_hashes, heads, head_dim, buckets, "cpu").half().float()  # values fp16 can hold
    return torch.cat([r, -r], dim=-1).to(device)


@functools.lru_cache(maxsize=32)
def _tiebreak(S: int, shared: bool, device) -> torch.Tensor:
    """The order of the items inside a bucket, made once per (S, layout, device): position (shared QK), else
    2 * position + (1 for a key), items being the S queries then the S keys."""
    pos = torch.arange(S, device=device)
    return pos if shared else torch.cat([2 * pos, 2 * pos + 1])


def hash_buckets(x: torch.Tensor, rot: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """x (B, S, H, D), rot [R, -R] (R, H, D, nb) (`hash_matrix`), valid bool (B, S) or None -> buckets int64
    (R, B, H, S) in [0, nb); invalid (padding) tokens get nb. One matmul and one argmax for every round."""
    b = torch.einsum("bshd,rhdn->rbhsn", x.detach().float(), rot).argmax(dim=-1)
    if valid is not None:
        b = torch.where(valid[None, :, None, :], b, rot.shape[-1])
    return b


def sort_keys(q, k, rot, key_padding_mask) -> torch.Tensor:
    """(R, B, H, items) int64 sort keys: bucket * items + tie-break (`_tiebreak`). Shared QK (k None): items
    are the S tokens. Separate k: the S queries then the S keys, hashed together (one matmul)."""
    S = q.shape[1]
    tie = _tiebreak(S, k is None, q.device)
    if k is None:
        return hash_buckets(q, rot, key_padding_mask) * S + tie
    mask = None if key_padding_mask is None else torch.cat([key_padding_mask, key_padding_mask], dim=1)
    return hash_buckets(torch.cat([q, k], dim=1), rot, mask) * (2 * S) + tie  # (R, B, H, 2S)


def sort_items(q, k, key_padding_mask, seed: int, num_hashes: int, nb: int, keys_fn=None):
    """The sort every backend shares: (sorted keys, perm), both (R, B, H, items), sorted by (bucket, position)
    with shared QK, by (bucket, position, query before key) with separate k. Padding items get bucket nb and
    sort last (after every real item of their row). keys_fn(q, k, rot, key_padding_mask) computes the keys
    (default `sort_keys`; the Triton backend passes its hashing kernel)."""
    B, S, H, D = q.shape
    rot = hash_matrix(int(seed), num_hashes, H, D, nb, q.device)
    return torch.sort((keys_fn or sort_keys)(q, k, rot, key_padding_mask), dim=-1)


class Plan(NamedTuple):
    """The sorted, chunked layout of one call: N = num_hashes * B * H rows of L slots in chunks of `chunk`."""

    qs: torch.Tensor  # (N, L, D) sorted queries (0 in slots that hold no real query)
    ks: torch.Tensor  # (N, L, D) sorted keys (0 where kvalid is False)
    vs: torch.Tensor  # (N, L, D) sorted values (0 where kvalid is False)
    kvalid: torch.Tensor  # (N, L) bool: a real key in that slot
    inv: torch.Tensor  # (R, B, H, S) int64: the slot of each query position
    kinv: torch.Tensor  # (R, B, H, S) int64: the slot of each key position
    chunk: int
    shared: bool


def plan(q, k, v, key_padding_mask, bucket_size: int, num_hashes: int, seed: int) -> Plan:
    """Hash, sort and chunk. q, v (B, S, H, D); k (B, S, H, D) or None (shared QK: keys are q / |q|);
    key_padding_mask bool (B, S) or None. Differentiable in q, k, v (gathers).

    Shared QK: one item per token (query and key together), sorted by (bucket, position), chunks of C.
    Separate k: queries and keys are 2S items of one sort by (bucket, position, query before key), chunks of
    2C slots, so a query's chunk holds the keys of its own buckets (about C of them: the same key budget as
    shared QK); a slot holds either a query or a key."""
    B, S, H, D = q.shape
    R, C = num_hashes, bucket_size
    shared = k is None
    nb = n_buckets(S, C)
    qh, vh = q.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
    valid = torch.ones(B, S, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
    vfull = valid[None, :, None, :].expand(R, B, H, S)
    perm = sort_items(q, k, key_padding_mask, seed, R, nb)[1]  # (R, B, H, items)
    if shared:
        real = qh if key_padding_mask is None else torch.where(key_padding_mask[:, None, :, None], qh, 0.0)
        kh = torch.nn.functional.normalize(real, dim=-1)  # padding zeroed: NaN there stays out of dq
        items, chunk = S, C
        qsrc, ksrc, vsrc = qh, kh, vh
        is_q = is_k = torch.gather(vfull, 3, perm)
    else:
        kh = k.transpose(1, 2)
        items, chunk = 2 * S, 2 * C
        zeros = qh.new_zeros(qh.shape)
        qsrc, ksrc, vsrc = torch.cat([qh, zeros], 2), torch.cat([zeros, kh], 2), torch.cat([zeros, vh], 2)
        item_valid = torch.cat([vfull, vfull], dim=-1)
        is_q = torch.gather(item_valid & (torch.arange(2 * S, device=q.device) < S), 3, perm)
        is_k = torch.gather(item_valid & (torch.arange(2 * S, device=q.device) >= S), 3, perm)
    L = max(1, -(-items // chunk)) * chunk

    def gather(x):  # x (B, H, items, D) -> (R * B * H, L, D) in sorted order, zero tail
        idx = perm.unsqueeze(-1).expand(*perm.shape, x.shape[-1])
        y = torch.gather(x.unsqueeze(0).expand(R, *x.shape), 3, idx).reshape(R * B * H, items, x.shape[-1])
        return torch.nn.functional.pad(y, (0, 0, 0, L - items)) if L > items else y

    def flags(t):  # (R, B, H, items) bool -> (N, L)
        t = t.reshape(R * B * H, items)
        return torch.nn.functional.pad(t, (0, L - items), value=False) if L > items else t

    qvalid, kvalid = flags(is_q), flags(is_k)
    # what a padding token holds (NaN, inf) never reaches a real row, in the forward or the backward
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    qs = torch.where(qvalid[..., None], gather(qsrc), zero)
    ks, vs = (torch.where(kvalid[..., None], gather(t), zero) for t in (ksrc, vsrc))
    slot = torch.argsort(perm, dim=-1)  # (R, B, H, items): the slot of each item
    inv = slot[..., :S]
    kinv = inv if shared else slot[..., S:]
    return Plan(qs, ks, vs, kvalid, inv, kinv, chunk, shared)


class Slots(NamedTuple):
    """The sorted, chunked layout as the sort's own indices (no sorted copies): N = num_hashes * B * H rows,
    row n = (r * B + b) * H + h, of `items` sorted items (S tokens with shared QK; S queries then S keys with
    separate k) in chunks of `chunk`. What the Triton backend's kernels read q, k, v through
    (kernels/lsh_attention.py): slot j of row n holds item perm[n, j]; the slots from nreal[b] on (padding
    sorts last) and from `items` on (the tail of the last chunk) hold nothing."""

    perm: torch.Tensor  # (N, items) int64
    nreal: torch.Tensor | None  # (B,) int32: real items per sequence; None without a key padding mask
    chunk: int
    shared: bool


def slots(q, k, key_padding_mask, bucket_size: int, num_hashes: int, seed: int, keys_fn=None) -> Slots:
    """The layout of `plan` (the same hashing, sort and chunks) as the sort's indices: the keys (one hashing
    matmul for every round, queries and keys together, or keys_fn), one sort. q (B, S, H, D); k like q or
    None."""
    B, S, H, D = q.shape
    shared = k is None
    perm = sort_items(q, k, key_padding_mask, seed, num_hashes, n_buckets(S, bucket_size), keys_fn)[1]
    nreal = None
    if key_padding_mask is not None:
        nreal = key_padding_mask.sum(dim=1, dtype=torch.int32)
    return Slots(perm.view(num_hashes * B * H, perm.shape[-1]), nreal, bucket_size if shared else 2 * bucket_size,
                 shared)


def chunk_attention(qs, ks, vs, kvalid, chunk: int, scale: float, shared: bool, *, same_dtype: bool = False):
    """The chunked attention on the sorted layout: (o (N, L, D) in qs' dtype, lse (N, L) float32 or float64).
    Chunk c's queries attend to the valid keys of chunks c - 1 and c. Math in float32 (float64 for float64);
    same_dtype=True computes the scores and p @ v in qs' dtype (the tests' eager-PyTorch yardstick)."""
    N, L, D = qs.shape
    nc = L // chunk
    acc = qs.dtype if same_dtype else (torch.float64 if qs.dtype == torch.float64 else torch.float32)
    qc, kc, vc = (t.to(acc).reshape(N, nc, chunk, D) for t in (qs, ks, vs))
    ok = kvalid.reshape(N, nc, chunk)

    def with_prev(t, fill):  # (N, nc, C, ...) -> (N, nc, 2C, ...): [chunk c - 1, chunk c]
        prev = torch.cat([torch.full_like(t[:, :1], fill), t[:, :-1]], dim=1)
        return torch.cat([prev, t], dim=2)

    kk, vv, okk = with_prev(kc, 0), with_prev(vc, 0), with_prev(ok, False)
    s = torch.matmul(qc, kk.transpose(-1, -2)).to(torch.float64 if acc == torch.float64 else torch.float32)
    s = s * scale  # (N, nc, C, 2C)
    if shared:
        eye = torch.eye(chunk, dtype=torch.bool, device=s.device)
        self_mask = torch.cat([torch.zeros_like(eye), eye], dim=1)  # (C, 2C): the own-chunk diagonal
        s = s.masked_fill(self_mask, SELF_SCORE)
    s = s.masked_fill(~okk[:, :, None, :], -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # (N, nc, C); -inf for a row without a valid key
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])  # exp(-inf) = 0 on dead rows
    o = torch.matmul(p.to(acc), vv)
    return o.reshape(N, L, D).to(qs.dtype), lse.reshape(N, L)


def unsort_combine(o, lse, p: Plan, key_padding_mask, shape) -> torch.Tensor:
    """o (N, L, D), lse (N, L) on the sorted layout -> (B, S, H, D): back to positions, rounds combined by
    softmax over their lse (rows where every round has lse -inf, and padded query rows, give zeros)."""
    B, S, H, D = shape
    R = p.inv.shape[0]
    L = o.shape[1]
    o = o.reshape(R, B, H, L, D)
    lse = lse.reshape(R, B, H, L)
    o = torch.gather(o, 3, p.inv.unsqueeze(-1).expand(R, B, H, S, D))
    lse = torch.gather(lse, 3, p.inv)
    if R == 1:
        out = o[0]
        dead = torch.isinf(lse[0])
    else:
        m = lse.max(dim=0).values
        dead = torch.isinf(m)
        w = torch.exp(lse - torch.where(dead, 0.0, m)[None])  # (R, B, H, S); dead rows: all 0
        w = w / torch.where(dead, 1.0, w.sum(dim=0))[None]
        out = (w[..., None].to(o.dtype if o.dtype == torch.float64 else torch.float32) * o).sum(dim=0)
    keep = ~dead
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, :]
    out = torch.where(keep[..., None], out, 0.0)
    return out.transpose(1, 2).to(o.dtype)  # (B, S, H, D)


def lsh_attention(q, k, v, key_padding_mask=None, bucket_size=64, num_hashes=2, seed=0, scale=None,
                  chunk_fn=None):
    """The whole op on padded inputs (B, S, H, D) (k may be None); chunk_fn(qs, ks, vs, kvalid, C, scale,
    shared) -> (o, lse) is the chunked attention (default: `chunk_attention`, this file's torch version)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = plan(q, k, v, key_padding_mask, bucket_size, num_hashes, seed)
    fn = chunk_fn or chunk_attention
    o, lse = fn(p.qs, p.ks, p.vs, p.kvalid, p.chunk, scale, p.shared)
    return unsort_combine(o, lse, p, key_padding_mask, q.shape)


def to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int):
    """(T, H, D) packed -> ((B, max_seqlen, H, D) padded with zeros, mask bool (B, max_seqlen), index (T',) of
    the packed rows in the flattened padded batch), T' = cu_seqlens[-1]."""
    B = cu_seqlens.numel() - 1
    starts = cu_seqlens[:-1].long()
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ar = torch.arange(max_seqlen, device=x.device)
    mask = ar[None, :] < lens[:, None]  # (B, S)
    flat = (torch.arange(B, device=x.device)[:, None] * max_seqlen + ar[None, :])[mask]  # (T',)
    src = (starts[:, None] + ar[None, :])[mask]
    out = x.new_zeros((B * max_seqlen, *x.shape[1:]))
    out = out.index_copy(0, flat, x.index_select(0, src))
    return out.view(B, max_seqlen, *x.shape[1:]), mask, flat


def varlen_via_padded(q, k, v, cu_seqlens, max_seqlen, padded_fn):
    """The op on packed inputs (T, H, D) through padded_fn(q, k, v, key_padding_mask) on the padded batch
    (B, max_seqlen), so each sequence is hashed, sorted and chunked on its own (n_buckets from max_seqlen).
    Rows past cu_seqlens[-1] are zeros."""
    T = q.shape[0]
    B = cu_seqlens.numel() - 1
    if B == 0 or max_seqlen == 0:
        return q.new_zeros(q.shape) + 0 * (q.sum() + v.sum() + (0 if k is None else k.sum()))
    qp, mask, flat = to_padded(q, cu_seqlens, max_seqlen)
    kp = None if k is None else to_padded(k, cu_seqlens, max_seqlen)[0]
    vp = to_padded(v, cu_seqlens, max_seqlen)[0]
    o = padded_fn(qp, kp, vp, mask)
    rows = o.reshape(-1, *o.shape[2:]).index_select(0, flat)
    n = rows.shape[0]
    return rows if n == T else torch.cat([rows, rows.new_zeros((T - n, *rows.shape[1:]))])


def lsh_attention_varlen(q, k, v, cu_seqlens, max_seqlen, bucket_size=64, num_hashes=2, seed=0, scale=None,
                         chunk_fn=None):
    """The op on packed inputs (T, H, D), as `lsh_attention` on the padded batch with its key padding mask."""
    return varlen_via_padded(q, k, v, cu_seqlens, max_seqlen, lambda a, b, c, m: lsh_attention(
        a, b, c, m, bucket_size, num_hashes, seed, scale, chunk_fn))


def attended(q, k, key_padding_mask=None, bucket_size=64, num_hashes=2, seed=0) -> torch.Tensor:
    """bool (B, H, S, S): the (query, key) pairs some hash round lets attend (for measuring what the
    approximation keeps, e.g. the share of the exact attention mass it covers; O(S^2) memory: analysis only).
    Same layout as `lsh_attention` (`plan`); k=None is shared QK (the self pair then counts as kept)."""
    p = plan(q, k, q, key_padding_mask, bucket_size, num_hashes, seed)
    qchunk, kchunk = p.inv // p.chunk, p.kinv // p.chunk  # (R, B, H, S)
    diff = qchunk[..., :, None] - kchunk[..., None, :]  # (R, B, H, S, S)
    seen = ((diff == 0) | (diff == 1)).any(dim=0)
    if key_padding_mask is not None:
        seen = seen & key_padding_mask[:, None, None, :]
    return seen
