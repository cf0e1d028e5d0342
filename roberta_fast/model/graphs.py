"""CUDA graphs of the padding-free forward (`cuda_graphs=`), captured lazily per bucket and replayed.

    model = RobertaModel.from_pretrained(path, dtype=torch.float16, device="cuda", cuda_graphs=True)
    model = roberta_fast.optimize(hf_model, cuda_graphs=CudaGraphs(max_graphs=8))
    with torch.inference_mode():
        out = model(input_ids, attention_mask=mask)  # first batch of a bucket: capture, then replay; later: replay

One forward with graphs:
  1. the usual input checks and the forward's ONE host sync (model/checks.py): range checks, the number of
     real tokens T and the longest sequence L; the real tokens are packed (padding.Layout.packed);
  2. the bucket (`choose_bucket`): the batch B, T and L each rounded up to the smallest of CudaGraphs'
     batch_edges, token_edges, seqlen_edges (L's bucket at most T's: no sequence is longer than T). A batch
     past the last batch or token edge runs without graphs;
  3. the bucket's static buffers, owned by its graph, are filled (`fill_rows`, `fill_cu_seqlens`): ids,
     positions (and token types) (Tb,) int64 get the T packed rows, cu_seqlens (Bb + 1,) int32 gets the B + 1
     real bounds, then T for every batch slot past B (empty sequences). The Tb - T extra rows belong to no
     sequence: attention_varlen writes zeros there (its contract: rows past cu_seqlens[-1] are zeros) and every
     other op is row-wise, so they cannot change a real row; they hold range-checked ids of an earlier batch
     (or zeros), so they compute finite values;
  4. replay (the embeddings and every layer on Tb rows; the bucket's L as max_seqlen), then the T real rows of
     the static (Tb, hidden) output are scattered into a FRESH zero-filled (B, S, hidden) tensor
     (`unpack_output`; a copy when the batch has no padding): a result never aliases graph memory that the next
     replay overwrites. That repad is the eager path's own; the pooler runs eagerly on it. Outside the graph a
     forward launches the input checks, the packing, about five small copies and the repad.

Capture (first use of a bucket): `warmup` forwards on a side stream (Triton compiles and autotunes, cuBLAS
sets up), one more with torch.cuda.set_sync_debug_mode("error") (a forward that synchronizes cannot be
captured: graphs are switched off with a warning, e.g. for backend="torch", whose attention_varlen reads
cu_seqlens), then torch.cuda.graph on that side stream into ONE memory pool shared by all graphs of the model
(torch.cuda.graph_pool_handle). Sharing is safe in any replay order because each graph's static inputs are
ordinary allocations outside the pool and its static output is read right after its own replay, before any
other replay can reuse that memory.

At most `max_graphs` graphs are kept (least recently used evicted). Evicting a graph frees its static inputs
and its CUDA graph; its static output and temporaries go back to the shared pool, reused by the next capture.
The pool itself goes back to PyTorch's caching allocator when the last graph is gone (`clear(model)`,
`cuda_graphs=False`, a recapture of everything); torch.cuda.empty_cache() then returns it to the driver.

Without graphs (the eager forward, counted in `stats(model).fallbacks` by reason): inputs not on a CUDA
device (warned once per model), grad mode on, train mode, autocast, output_hidden_states / output_attentions,
inputs_embeds, padding_free=False with a padded batch, an empty batch, no bucket large enough, inside
torch.compile or a CUDA graph capture of the caller's, graphs switched off after a failed check.

What replays see: the parameters' storage. In-place updates (p.copy_(...), load_state_dict into the same
tensors, an optimizer step) are seen: the graphs read the parameters themselves, and the fused QKV weight they
read is a copy this module owns, refreshed in place before the replay when any parameter's version counter
moved. Everything else drops every graph (recaptured lazily): a parameter with new storage (.to(), .half(),
.cuda(), `p.data = ...`, resize_token_embeddings), a parameter or submodule replaced (load_state_dict(assign=
True), set_input_embeddings; seen through torch.nn's global registration hooks, installed on first use), a
new backend. Parameters created inside inference_mode have no version counter: in-place updates of the query,
key and value weights are then not seen (call clear(model)). Forward hooks on submodules run at capture only.
One forward at a time per model (graphs and their buffers are not thread-safe; set_sync_debug_mode is global).
"""

from __future__ import annotations

import bisect
import contextlib
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..padding import Layout
from .checks import reads_blocked

BATCH_EDGES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_EDGES = (16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
SEQLEN_EDGES = (16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class CudaGraphs:
    """Options of `cuda_graphs=` (True means CudaGraphs()).

    max_graphs    graphs kept at once (least recently used evicted first)
    batch_edges   bucket edges of the batch size B (sequences); a larger B runs without graphs
    token_edges   bucket edges of the number of real tokens T; a larger T runs without graphs
    seqlen_edges  bucket edges of the longest real length (max_seqlen of attention_varlen); past the last edge
                  (or past the token bucket) the token bucket is used
    warmup        forwards on a side stream before each capture (plus one that checks for host syncs)
    """

    max_graphs: int = 16
    batch_edges: tuple = BATCH_EDGES
    token_edges: tuple = TOKEN_EDGES
    seqlen_edges: tuple = SEQLEN_EDGES
    warmup: int = 1

    def __post_init__(self):
        for name in ("max_graphs", "warmup"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CudaGraphs: {name} must be an int >= 1, got {v!r}")
        for name in ("batch_edges", "token_edges", "seqlen_edges"):
            object.__setattr__(self, name, _edges(name, getattr(self, name)))


def _edges(name: str, edges) -> tuple:
    """A non-empty strictly increasing tuple of ints >= 1, else ValueError naming the field."""
    edges = tuple(edges) if isinstance(edges, (list, tuple, range)) else edges
    ok = isinstance(edges, tuple) and len(edges) > 0 and \
        all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in edges)
    if not ok or any(a >= b for a, b in zip(edges, edges[1:])):
        raise ValueError(f"CudaGraphs: {name} must be a non-empty increasing sequence of ints >= 1, got {edges!r}")
    return edges


def as_options(value) -> CudaGraphs | None:
    """cuda_graphs= as given (bool, None, CudaGraphs, or a dict of CudaGraphs' fields) -> CudaGraphs, or None (off)."""
    if value is None or value is False:
        return None
    if value is True:
        return CudaGraphs()
    if isinstance(value, CudaGraphs):
        return value
    if isinstance(value, dict):
        return CudaGraphs(**value)
    raise TypeError(f"cuda_graphs must be a bool, a roberta_fast.CudaGraphs or a dict of its fields, "
                    f"got {type(value).__name__}")


# ------------------------------------------------------------------------------------------- bucketing


class Bucket(NamedTuple):
    """The static shapes of one graph."""

    batch: int  # sequences: cu_seqlens has batch + 1 entries
    tokens: int  # rows of every activation
    seqlen: int  # max_seqlen given to attention_varlen


def round_up(n: int, edges: tuple) -> int | None:
    """The smallest edge >= n, or None past the last one."""
    i = bisect.bisect_left(edges, n)
    return edges[i] if i < len(edges) else None


def choose_bucket(options: CudaGraphs, batch: int, tokens: int, max_seqlen: int) -> Bucket | None:
    """The bucket of a packed batch (batch >= 1 sequences, 1 <= max_seqlen <= tokens real tokens), or None
    (no graph: batch or tokens past the last edge)."""
    b, t = round_up(batch, options.batch_edges), round_up(tokens, options.token_edges)
    if b is None or t is None:
        return None
    s = round_up(max_seqlen, options.seqlen_edges)
    return Bucket(b, t, t if s is None else min(s, t))


def fill_rows(buf: torch.Tensor, x: torch.Tensor, indices: torch.Tensor | None, tokens: int):
    """buf (Tb,) <- the `tokens` real entries of x (B, S): those named by indices (T,) in the flattened batch,
    or all B*S in order (indices None). buf[tokens:] is left as it is."""
    flat = x.reshape(-1)  # (B*S,)
    if indices is None:
        buf[:tokens].copy_(flat)
    elif flat.dtype == buf.dtype:
        torch.index_select(flat, 0, indices, out=buf[:tokens])  # one launch, no temporary
    else:
        buf[:tokens].copy_(flat.index_select(0, indices))


def fill_cu_seqlens(buf: torch.Tensor, cu_seqlens: torch.Tensor | None, batch: int, seqlen: int, tokens: int):
    """buf int32 (Bb + 1,) <- the batch's cu_seqlens (B + 1,) (None: B sequences of seqlen tokens), then `tokens`
    for each slot past B (empty sequences): rows tokens.. of the bucket lie past cu_seqlens[-1], in no sequence."""
    if cu_seqlens is None:
        torch.arange(0, (batch + 1) * seqlen, seqlen, out=buf[:batch + 1])
    else:
        buf[:batch + 1].copy_(cu_seqlens)
    buf[batch + 1:].fill_(tokens)


def unpack_output(rows: torch.Tensor, indices: torch.Tensor | None, batch: int, seqlen: int) -> torch.Tensor:
    """rows (T, hidden), the real rows of a static output -> a new (B, S, hidden) tensor, zeros at padded
    positions (indices (T,) as in fill_rows; None: every position real, a copy)."""
    if indices is None:
        return rows.reshape(batch, seqlen, rows.shape[-1]).clone()
    out = rows.new_zeros(batch * seqlen, rows.shape[-1])  # (B*S, hidden)
    out.index_copy_(0, indices, rows)
    return out.view(batch, seqlen, rows.shape[-1])


class LRU:
    """At most `capacity` values by key; put() returns the values it evicted, least recently used first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items = OrderedDict()

    def get(self, key):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key, value) -> list:
        self._items[key] = value
        self._items.move_to_end(key)
        evicted = []
        while len(self._items) > self.capacity:
            evicted.append(self._items.popitem(last=False)[1])
        return evicted

    def pop_all(self) -> list:
        values = list(self._items.values())
        self._items.clear()
        return values

    def keys(self) -> list:
        return list(self._items)

    def __len__(self):
        return len(self._items)


# ------------------------------------------------------------------------------------------- invalidation

_GENERATION = [0]  # bumped whenever a parameter or submodule is registered anywhere, or our modules convert
_HOOKS = []


def structure_changed(*_args):
    """Called on any parameter / submodule registration (torch.nn's global hooks) and by our modules' _apply:
    the parameter lists of every cache are collected again at their next forward (graphs kept if nothing
    they read changed)."""
    _GENERATION[0] += 1


def generation() -> int:
    """The registration counter: changes whenever a parameter or submodule is registered anywhere (once
    install_hooks() ran) or one of our attention modules converts (.to(), .half(), ...)."""
    return _GENERATION[0]


def install_hooks():
    """Count registrations from now on (torch.nn's global registration hooks; installed once per process)."""
    _install_hooks()


def _install_hooks():
    if not _HOOKS:
        _HOOKS.append(torch.nn.modules.module.register_module_parameter_registration_hook(structure_changed))
        _HOOKS.append(torch.nn.modules.module.register_module_module_registration_hook(structure_changed))


def param_key(params: list, versioned: list) -> tuple:
    """What a replay depends on: the data_ptr of every parameter the graphs read (new storage: recapture) and the
    version counters of the query / key / value parameters (moved: refresh the fused QKV copies in place)."""
    return tuple(p.data_ptr() for p in params), tuple(t._version for t in versioned)


# ------------------------------------------------------------------------------------------- the cache


@dataclass
class GraphStats:
    """Counters of one model's graphs (stats(model) sums them over the encoders inside a module)."""

    captures: int = 0
    replays: int = 0
    evictions: int = 0
    invalidations: int = 0  # every graph dropped: parameters moved or replaced, or a new backend
    graphs: int = 0  # graphs held now
    fallbacks: Counter = field(default_factory=Counter)  # reason -> forwards run without graphs

    def __add__(self, other: GraphStats) -> GraphStats:
        return GraphStats(self.captures + other.captures, self.replays + other.replays,
                          self.evictions + other.evictions, self.invalidations + other.invalidations,
                          self.graphs + other.graphs, self.fallbacks + other.fallbacks)


class _Entry:
    """One bucket: its static inputs, layout, graph and static output."""

    def __init__(self, bucket: Bucket, typed: bool, device):
        with torch.inference_mode(False):  # ordinary tensors: filled in place under no_grad or inference_mode
            self.ids = torch.zeros(bucket.tokens, dtype=torch.int64, device=device)
            self.positions = torch.zeros_like(self.ids)
            self.types = torch.zeros_like(self.ids) if typed else None
            self.cu_seqlens = torch.zeros(bucket.batch + 1, dtype=torch.int32, device=device)
        self.layout = Layout(bucket.batch, bucket.seqlen, cu_seqlens=self.cu_seqlens, max_seqlen=bucket.seqlen)
        self.graph = self.out = None

    def fill(self, inputs, layout: Layout, tokens: int):
        fill_rows(self.ids, inputs.input_ids, layout.indices, tokens)
        fill_rows(self.positions, inputs.position_ids, layout.indices, tokens)
        if self.types is not None:
            fill_rows(self.types, inputs.token_type_ids, layout.indices, tokens)
        fill_cu_seqlens(self.cu_seqlens, layout.cu_seqlens, inputs.batch, inputs.seqlen, tokens)


class _Bound:
    """A cache's view of one model: the modules, the parameters its graphs read and their key, the fused QKV
    copies the graphs read, the side stream and the memory pool."""

    def __init__(self, embeddings, encoder, backend, device, capture: bool):
        self.embeddings, self.encoder, self.backend, self.device = embeddings, encoder, backend, device
        self.collect()
        self.key = param_key(self.params, self.versioned)
        self.disabled = None  # why graphs are off for this model state, after a failed check
        with torch.inference_mode(False), torch.no_grad():
            self.qkv = [(torch.cat(s[:3]), torch.cat(s[3:])) for s in (m.qkv_sources() for m in self.attn)]
        cuda = capture and device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if cuda else None
        self.pool = torch.cuda.graph_pool_handle() if cuda else None

    def collect(self):
        """The parameters (and attention modules) the graphs read, as the modules hold them now."""
        self.generation = _GENERATION[0]
        self.params = list(self.embeddings.parameters()) + list(self.encoder.parameters())
        self.attn = [m for m in self.encoder.modules() if hasattr(m, "qkv_sources")]
        # inference tensors (parameters made under inference_mode) have no version counter
        self.versioned = [t for m in self.attn for t in m.qkv_sources() if not t.is_inference()]

    def same_params(self, embeddings, encoder, backend, device) -> bool:
        """Same modules, backend and device, and the same parameter objects (collected again after any
        registration)."""
        if self.embeddings is not embeddings or self.encoder is not encoder or (self.backend, self.device) != \
                (backend, device):
            return False
        if self.generation != _GENERATION[0]:
            before = self.params
            self.collect()
            return len(before) == len(self.params) and all(a is b for a, b in zip(before, self.params))
        return True

    def refresh_qkv(self):
        """The fused QKV copies <- the current query / key / value parameters, in place (replays read them)."""
        for m, (w, b) in zip(self.attn, self.qkv):
            src = m.qkv_sources()
            torch.cat(src[:3], out=w)
            torch.cat(src[3:], out=b)

    @contextlib.contextmanager
    def static_qkv(self):
        """The attention modules read the fused copies (qkv_weight_bias) while the graph forward runs."""
        for m, wb in zip(self.attn, self.qkv):
            m._qkv_static = wb
        try:
            yield
        finally:
            for m in self.attn:
                m._qkv_static = None

    def forward_fn(self, entry: _Entry):
        """The captured function: embeddings and every layer on the entry's static buffers -> (Tb, hidden)."""

        def forward():
            with self.static_qkv():
                h = self.embeddings(entry.ids, entry.positions, entry.types, None, backend=self.backend)
                return self.encoder(h, entry.layout, backend=self.backend)[0]  # (Tb, hidden)

        return forward


class GraphCache:
    """The graphs of one encoder (ours, or a transformers encoder after roberta_fast.optimize). encoder_forward
    calls run(); None from it means: run the eager forward.

    capture=False runs the same bucketed forward (static buffers, bucket shapes, extra rows, LRU) without
    capturing, on any device: what the CPU tests check. Pickling / deepcopy keep the options only."""

    def __init__(self, options: CudaGraphs, *, capture: bool = True):
        self.options, self.capture = options, capture
        self.stats = GraphStats()
        self._entries = LRU(options.max_graphs)
        self._bound = None
        self._warned = set()
        _install_hooks()

    def __getstate__(self):
        return {"options": self.options, "capture": self.capture}

    def __setstate__(self, state):
        self.__init__(state["options"], capture=state["capture"])

    def clear(self):
        """Drop every graph, its buffers and the fused QKV copies (recaptured lazily)."""
        self._entries.pop_all()
        self._bound = None
        self.stats.graphs = 0

    def buckets(self) -> list:
        """The (Bucket, typed) keys of the graphs held, least recently used first."""
        return self._entries.keys()

    def run(self, embeddings, encoder, inputs, layout: Layout, backend, extra_outputs: bool):
        """The forward through a graph: last_hidden_state (B, S, hidden), a new tensor; or None (run eagerly).
        inputs: model.checks.Inputs; layout: its layout(padding_free), after the forward's one host sync."""
        tokens, longest = real_counts(inputs.batch, inputs.seqlen, layout)
        why, bucket = self._plan(embeddings, encoder, inputs, layout, extra_outputs, tokens, longest)
        bound = None if why else self._bind(embeddings, encoder, backend, inputs.device)
        rows = None
        if bound is not None and not bound.disabled:
            rows = self._replay(bound, (bucket, inputs.token_type_ids is not None), inputs, layout, tokens)
        if rows is None:
            self.stats.fallbacks[why or f"graphs off: {bound.disabled}"] += 1
            return None
        return unpack_output(rows[:tokens], layout.indices, inputs.batch, inputs.seqlen)

    def _plan(self, embeddings, encoder, inputs, layout, extra_outputs, tokens, longest):
        """(why this forward runs eagerly or None, the bucket)."""
        why = _why_not_mode(inputs.device, embeddings, encoder) or _why_not_inputs(inputs, layout, extra_outputs)
        if why is None and inputs.device.type != "cuda" and self.capture:
            why = "inputs not on a CUDA device"
            self._warn_once(why, f"roberta_fast: cuda_graphs is on but the inputs are on {inputs.device.type}: "
                                 "CUDA graphs need CUDA tensors; the forward runs without them")
        if why is not None:
            return why, None
        bucket = choose_bucket(self.options, inputs.batch, tokens, longest)
        return ("batch larger than the largest bucket" if bucket is None else None), bucket

    def _bind(self, embeddings, encoder, backend, device) -> _Bound:
        """The model state the graphs were captured for; a new one (every graph dropped) when parameters moved or
        were replaced; the fused QKV copies refreshed when query / key / value changed in place."""
        bound = self._bound
        if bound is not None and not bound.same_params(embeddings, encoder, backend, device):
            bound = None
        key = None if bound is None else param_key(bound.params, bound.versioned)
        if bound is not None and key[0] != bound.key[0]:
            bound = None
        if bound is None:
            if self._bound is not None:
                self.stats.invalidations += 1
            self.clear()
            bound = self._bound = _Bound(embeddings, encoder, backend, device, self.capture)
        elif key != bound.key:
            bound.refresh_qkv()
            bound.key = key
        return bound

    def _replay(self, bound: _Bound, key, inputs, layout: Layout, tokens: int):
        """Fill the bucket's buffers, capture its graph on first use, replay: the static (Tb, hidden) output, or
        None when the capture was refused (graphs now off for this model state)."""
        entry = self._entries.get(key)
        if entry is None:
            entry = _Entry(key[0], key[1], inputs.device)
            entry.fill(inputs, layout, tokens)
            if self.capture and not self._capture(bound, entry):
                return None
            self.stats.evictions += len(self._entries.put(key, entry))
            self.stats.graphs = len(self._entries)
        else:
            entry.fill(inputs, layout, tokens)
        self.stats.replays += 1
        if entry.graph is None:  # capture=False: the same forward, run eagerly
            return bound.forward_fn(entry)()
        entry.graph.replay()
        return entry.out

    def _capture(self, bound: _Bound, entry: _Entry) -> bool:
        """Warm up on the side stream, check for host syncs, capture into the shared pool. False (graphs off for
        this model state, with a warning) when the forward synchronizes or the capture fails."""
        fn, side = bound.forward_fn(entry), bound.stream
        current = torch.cuda.current_stream(bound.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.options.warmup):
                fn()
            why = _host_sync(fn)
        current.wait_stream(side)
        if why is None:
            why = _capture_into(entry, fn, bound)
        if why is None:
            self.stats.captures += 1
            return True
        bound.disabled = why
        self._warn_once(why, f"roberta_fast: cuda_graphs switched off for this model ({why}); the forward runs "
                             "without graphs until the parameters, dtype, device or backend change")
        return False

    def _warn_once(self, key: str, message: str):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=2)


def real_counts(batch: int, seqlen: int, layout: Layout) -> tuple:
    """(real tokens T, longest real length) of a packed layout (indices set) or a dense one (every position)."""
    if layout.indices is None:
        return batch * seqlen, seqlen
    return layout.indices.numel(), layout.max_seqlen


def _capture_into(entry: _Entry, fn, bound: _Bound) -> str | None:
    """Capture fn into entry.graph (output entry.out) on the side stream, in the shared pool; why not, or None.
    The outer stream context puts the caller's stream back even when the capture fails."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(bound.stream), torch.cuda.graph(graph, pool=bound.pool, stream=bound.stream):
            entry.out = fn()
    except RuntimeError as e:
        return f"capture failed: {str(e).splitlines()[0]}"
    entry.graph = graph
    return None


def _host_sync(fn) -> str | None:
    """Run fn once with synchronizing CUDA calls turned into errors: why it cannot be captured, or None."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        return f"the forward synchronizes with the host ({str(e).splitlines()[0]})"
    finally:
        torch.cuda.set_sync_debug_mode(before)
    return None


def _why_not_mode(device, embeddings, encoder) -> str | None:
    """Why the current mode cannot replay a graph, or None."""
    if reads_blocked(device):
        return "inside torch.compile or a CUDA graph capture"
    if torch.is_grad_enabled():
        return "grad mode on (use torch.no_grad() or torch.inference_mode())"
    if embeddings.training or encoder.training:
        return "train mode"
    if torch.is_autocast_enabled(device.type):
        return "autocast"
    return None


def _why_not_inputs(inputs, layout: Layout, extra_outputs: bool) -> str | None:
    """Why these inputs cannot take a graph, or None."""
    if extra_outputs:
        return "output_hidden_states or output_attentions"
    if inputs.input_ids is None:
        return "inputs_embeds"
    if layout.mask is not None and not layout.is_packed:
        return "padded layout (padding_free=False)"
    if inputs.batch * inputs.seqlen == 0 or (layout.indices is not None and layout.indices.numel() == 0):
        return "empty batch"
    return None


# ------------------------------------------------------------------------------------------- public helpers


def make_cache(value, old: GraphCache | None = None) -> GraphCache | None:
    """The cache for cuda_graphs=value: `old` when its options are the same, else a new one (None: off)."""
    options = as_options(value)
    if old is not None and options == old.options:
        return old
    if old is not None:
        old.clear()
    return GraphCache(options) if options is not None else None


def caches(module) -> list:
    """The graph caches of the encoders inside `module` (ours, or transformers ones after optimize)."""
    found = (getattr(m, "_cuda_graph_cache", None) for m in module.modules())
    return [c for c in found if c is not None]


def clear(module):
    """Drop every captured graph of the encoders inside `module` (graphs stay on, recaptured lazily)."""
    for c in caches(module):
        c.clear()


def stats(module) -> GraphStats:
    """The summed GraphStats of the encoders inside `module`."""
    return sum((c.stats for c in caches(module)), GraphStats())
