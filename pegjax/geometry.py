"""The geometry of a run: how the recipe's global batch lays out on the devices, and what it costs.

Computed from the config, the device and process counts and the model's architecture alone
(``config.json``, never the weights), so that a run that cannot work fails before any model
loading, data caching or mining, and every run prints one table of:

- rows: Q real queries padded to a multiple of the batch shards (the padding rows are invisible
  to the loss, `pegjax.loss`), queries and passages per shard;
- blocks: the query block actually used (equal blocks of at most ``config.loss.query_block`` rows
  per shard) and the encode chunk (equal chunks of at most ``config.train.encode_chunk`` rows);
- memory per device, an estimate: the FSDP share of parameters and AdamW state, the gathered
  passage embeddings, one query block's scores, and one chunk's activations (the encoder's
  remat-ed forward and backward), plus, with ``config.train.keep_dense_outputs``, every chunk's
  dense-layer outputs. ``bench/memory.py`` sets it beside XLA's own accounting.

The packed row counts depend on the data and are chosen later (`pegjax.data.packing`); the table
here bounds them by one text a row.
"""

from __future__ import annotations

import dataclasses
import math

from pegjax.data.packing import chunked_rows
from pegjax.errors import ConfigError
from pegjax.models.bert import BertConfig
from pegjax.models.build import compute_dtype

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Geometry:
    devices: int
    processes: int
    mesh: dict  # {"data", "fsdp", "tensor"} sizes
    queries: int  # real queries per step (config.train.queries_per_step)
    group: int  # 1 + hard negatives
    query_length: int
    passage_length: int
    query_block: int  # rows per shard scored at once, after equalising
    blocks: int
    chunk_limit: int  # config.train.encode_chunk
    model: BertConfig
    dtype_bytes: int  # compute dtype
    query_negatives: bool
    keep_dense_outputs: bool = False  # config.train.keep_dense_outputs

    @property
    def shards(self) -> int:
        return self.mesh["data"] * self.mesh["fsdp"]

    @property
    def padded_queries(self) -> int:
        return self.shards * self.queries_per_shard

    @property
    def queries_per_shard(self) -> int:
        return -(-self.queries // self.shards)

    @property
    def passages_per_shard(self) -> int:
        return self.queries_per_shard * self.group

    def chunk(self, rows: int) -> tuple[int, int]:
        """(chunks, rows a chunk) for ``rows`` rows per shard."""
        total, chunk = chunked_rows(rows, self.chunk_limit)
        return total // chunk, chunk

    # Memory, bytes per device (estimates).
    @property
    def parameters(self) -> int:
        m = self.model
        layer = 4 * m.hidden_size * m.hidden_size + 2 * m.hidden_size * m.intermediate_size + 9 * m.hidden_size + m.intermediate_size
        tables = (m.vocab_size + m.max_position_embeddings + m.type_vocab_size + 2) * m.hidden_size
        return m.num_hidden_layers * layer + tables

    @property
    def state_share_bytes(self) -> int:
        """Parameters + AdamW moments (float32), this device's FSDP x tensor share."""
        return 3 * 4 * self.parameters // (self.mesh["fsdp"] * self.mesh["tensor"])

    @property
    def gathered_weights_bytes(self) -> int:
        """The float32 weights an encoder call gathers, and their gradient."""
        return 2 * 4 * self.parameters // self.mesh["tensor"]

    @property
    def candidates(self) -> int:
        return self.padded_queries * self.group + (self.padded_queries if self.query_negatives else 0)

    @property
    def gather_bytes(self) -> int:
        """The gathered candidate embeddings (float32) and their gradient."""
        return 2 * 4 * self.candidates * self.model.hidden_size

    @property
    def score_bytes(self) -> int:
        """One query block's float32 scores against every candidate, ~4 live copies (scores,
        weights, their exponentials, the gradient)."""
        return 4 * 4 * self.shards * self.query_block * self.candidates

    def activation_bytes(self, chunk_rows: int, length: int) -> int:
        """One chunk's activations held for the backward pass of its recomputation (all layers):
        per token and layer ~E(12b + 16) + M(4b + 8) bytes for the hidden and MLP arrays and 16 bytes
        per attention score (b the compute dtype's bytes), fitted to XLA's own plan of the
        BERT-base paper step (bench/memory.py)."""
        m, b, tensor = self.model, self.dtype_bytes, self.mesh["tensor"]
        per_token = (m.hidden_size * (12 * b + 16) + m.intermediate_size * (4 * b + 8) // tensor
                     + m.num_attention_heads * length * 16 // tensor)
        return m.num_hidden_layers * chunk_rows * length * per_token

    @property
    def dense_output_bytes(self) -> int:
        """With ``keep_dense_outputs``: the dense layers' product outputs of every chunk, held from
        the forward pass to the backward pass: (3E + M) / tensor + 2E values a token and a layer
        (query, key, value and intermediate split over the tensor axis; the two output layers not).
        A kind encoded in one chunk keeps all its activations anyway (`activation_bytes`) and adds
        nothing. 0 without the option."""
        if not self.keep_dense_outputs:
            return 0
        m, tensor = self.model, self.mesh["tensor"]
        per_token = (3 * m.hidden_size + m.intermediate_size) // tensor + 2 * m.hidden_size
        tokens = 0
        for rows, length in ((self.queries_per_shard, self.query_length), (self.passages_per_shard, self.passage_length)):
            chunks, chunk = self.chunk(rows)
            tokens += chunks * chunk * length if chunks > 1 else 0
        return m.num_hidden_layers * tokens * per_token * self.dtype_bytes

    @property
    def peak_bytes(self) -> int:
        """The state share and the kept dense outputs, plus the larger of the encoding phase
        (gathered weights and one chunk's activations) and the scoring phase (gathered embeddings
        and one block's scores)."""
        passages = self.activation_bytes(self.chunk(self.passages_per_shard)[1], self.passage_length)
        queries = self.activation_bytes(self.chunk(self.queries_per_shard)[1], self.query_length)
        encoding = self.gathered_weights_bytes + max(passages, queries)
        scoring = self.gather_bytes + self.score_bytes
        return self.state_share_bytes + self.dense_output_bytes + max(encoding, scoring)


def plan(config, devices: int, processes: int, model: BertConfig) -> Geometry:
    """The geometry of ``config`` on ``devices`` devices in ``processes`` processes. Raises
    ConfigError, naming the key and a value that works, when the run cannot be laid out."""
    from pegjax.sharding import mesh_shape

    try:
        data, fsdp, tensor = mesh_shape(config.mesh, devices)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    shards = data * fsdp
    queries = config.train.queries_per_step
    if queries < shards:
        raise ConfigError(f"config.train.queries_per_step={queries} is smaller than the {shards} batch shards "
                          f"(config.mesh {dict(data=data, fsdp=fsdp, tensor=tensor)} on {devices} devices): "
                          f"use at least {shards}")
    if shards % processes:
        raise ConfigError(f"config.mesh: {shards} batch shards do not split over {processes} processes; give every "
                          "process the same number of devices and make data x fsdp a multiple of the process count")
    for key in ("loss.query_block", "train.encode_chunk"):
        section, name = key.split(".")
        if config[section][name] < 1:
            raise ConfigError(f"config.{key}={config[section][name]}: use a positive number, e.g. 16")
    rows = -(-queries // shards)
    blocks = -(-rows // config.loss.query_block)
    return Geometry(
        devices=devices, processes=processes, mesh=dict(data=data, fsdp=fsdp, tensor=tensor), queries=queries,
        group=1 + config.data.hard_negatives, query_length=config.data.query_length,
        passage_length=config.data.passage_length, query_block=-(-rows // blocks), blocks=blocks,
        chunk_limit=config.train.encode_chunk, model=model, dtype_bytes=2 if compute_dtype(config) == "bfloat16" else 4,
        query_negatives=config.loss.query_negatives, keep_dense_outputs=config.train.keep_dense_outputs,
    )


def check_memory(geometry: Geometry, available_bytes: int | None) -> None:
    """Fails when the estimate exceeds the device memory, naming the knob and a value that fits."""
    if not available_bytes or geometry.peak_bytes <= available_bytes:
        return
    needed, also = geometry.peak_bytes, ""
    if geometry.keep_dense_outputs:
        without = dataclasses.replace(geometry, keep_dense_outputs=False)
        if without.peak_bytes <= available_bytes:
            raise ConfigError(
                f"config.train.keep_dense_outputs=True: a device needs ~{needed / GIB:.1f} GiB (estimate; "
                f"{geometry.dense_output_bytes / GIB:.1f} GiB of them the kept outputs), more than its "
                f"{available_bytes / GIB:.1f} GiB; set it False (~{without.peak_bytes / GIB:.1f} GiB)")
        geometry, also = without, "config.train.keep_dense_outputs=False and "
    for chunk in (c for c in (64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1) if c < geometry.chunk_limit):
        smaller = dataclasses.replace(geometry, chunk_limit=chunk)
        if smaller.peak_bytes <= available_bytes:
            raise ConfigError(
                f"config.train.encode_chunk={geometry.chunk_limit}: a device needs ~{needed / GIB:.1f} GiB "
                f"(estimate), more than its {available_bytes / GIB:.1f} GiB; {also}config.train.encode_chunk={chunk} "
                f"needs ~{smaller.peak_bytes / GIB:.1f} GiB")
    raise ConfigError(
        f"a device needs ~{needed / GIB:.1f} GiB (estimate) even with {also}config.train.encode_chunk=1, more "
        f"than its {available_bytes / GIB:.1f} GiB: use more devices, config.mesh.fsdp=-1, a smaller "
        f"config.loss.query_block or fewer config.train.queries_per_step")


def table(geometry: Geometry) -> str:
    """The geometry as one printable table."""
    g = geometry
    q_chunks, q_chunk = g.chunk(g.queries_per_shard)
    p_chunks, p_chunk = g.chunk(g.passages_per_shard)
    mesh = " x ".join(f"{k}={v}" for k, v in g.mesh.items())
    rows = [
        ("devices / processes", f"{g.devices} / {g.processes}  (mesh {mesh}; {g.shards} batch shards)"),
        ("queries per step", f"{g.queries:,} real + {g.padded_queries - g.queries:,} padding = {g.padded_queries:,}"),
        ("passages per step", f"{g.padded_queries * g.group:,} ({g.group} per query)"),
        ("per device", f"{g.queries_per_shard:,} queries x {g.query_length} tokens, "
                       f"{g.passages_per_shard:,} passages x {g.passage_length} tokens"),
        ("query blocks", f"{g.blocks} of {g.query_block} rows per device"
                         + (f" ({g.blocks * g.query_block - g.queries_per_shard} padding)"
                            if g.blocks * g.query_block != g.queries_per_shard else "")),
        ("encode chunks", f"queries {q_chunks} x {q_chunk} rows, passages {p_chunks} x {p_chunk} rows per device "
                          "(at most; packing needs fewer)"),
        ("FSDP share", f"{g.state_share_bytes / GIB:.3f} GiB per device: params + AdamW moments of "
                       f"{4 * g.parameters / GIB:.3f} GiB float32 params, split {g.mesh['fsdp'] * g.mesh['tensor']} ways"),
        ("embedding gather", f"{g.candidates:,} x {g.model.hidden_size} float32 = {4 * g.candidates * g.model.hidden_size / 2**20:,.0f} MiB"),
        ("scores of a block", f"{g.shards * g.query_block:,} x {g.candidates:,} float32 = "
                              f"{4 * g.shards * g.query_block * g.candidates / 2**20:,.0f} MiB"),
        ("chunk activations", f"~{g.activation_bytes(p_chunk, g.passage_length) / GIB:.2f} GiB (passages)"),
        *([("kept dense outputs", f"~{g.dense_output_bytes / GIB:.2f} GiB (config.train.keep_dense_outputs)")]
          if g.keep_dense_outputs else []),
        ("memory per device", f"~{g.peak_bytes / GIB:.2f} GiB (estimate)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
