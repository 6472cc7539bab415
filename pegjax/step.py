"""One global contrastive training step: cached-gradient encoding, the global loss, AdamW.

Batch (a dict of arrays, every leading dimension split over the mesh's data x fsdp axes)::

    query_tokens, query_segments      [S*Rq, Lq] int32  queries packed into Rq rows per shard,
                                                        segment ids 0 = padding, k = k-th text
    query_slots                       [Q] int32         where each query's vector is in its shard's
                                                        [Rq * query_slots] pooled rows
    passage_tokens, passage_segments  [S*Rp, Lp] int32  the same for the P = Q * G passages
    passage_slots                     [P] int32         G = 1 + hard negatives; passages
                                                        i*G .. i*G+G-1 belong to query i, its
                                                        positive first (the loss's labels)
    passage_hashes                    [P] int32         text hash of each passage (0 = unknown)
    positive_hashes                   [Q, M] int32      hashes of other known positives (0 = none)
    query_hashes                      [Q] int32         text hash of each query (0 = unknown):
                                                        duplicated queries mask each other's
                                                        positives
    query_valid                       [Q] int32         0 for the padding rows that make Q split
                                                        over the shards (no tokens, invisible to
                                                        the loss, `pegjax.loss`)

(`pegjax.data.packing` builds the rows; one text a row is the case of one slot.) Because query
i's G passages are contiguous, splitting Q and P into the same number of shards keeps every query
with its own passages, and each shard's texts are packed into that shard's rows. Rows are encoded
``chunk`` rows per shard at a time with ``lax.scan`` over a ``jax.checkpoint``-ed encoder that
saves nothing: the forward pass keeps only the embeddings, the backward pass recomputes each chunk
(GradCache, by remat). With ``keep_dense_outputs`` the forward pass also keeps every dense layer's
product output, so the recomputation runs only the attention and the elementwise work: 6-13% off a
CPU step, for (5E + M) values a token and a layer held through the step (memory that grows with
the batch; bench/RESULTS.md, the remat structure). Each chunk takes its rows from every shard, so
no token ids move between devices. Only embeddings cross devices: the passage embeddings are
gathered (replicated) before scoring, and their gradient is reduce-scattered back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from pegjax import schedules, sharding
from pegjax.data.packing import RowGeometry, chunked_rows
from pegjax.loss import LossConfig, contrastive_loss, distillation
from pegjax.models.bert import DENSE_OUTPUT, EmbeddingModel

BATCH_KEYS = ("query_tokens", "query_segments", "query_slots", "passage_tokens", "passage_segments", "passage_slots",
              "passage_hashes", "positive_hashes", "query_hashes", "query_valid", "teacher_scores")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: batches consumed
    updates: jax.Array  # [] int32: updates applied (a non-finite step applies none); the schedules' clock
    params: Any
    opt_state: Any
    rng: jax.Array  # [2] uint32 key data (dropout)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    model: EmbeddingModel
    loss: LossConfig
    encode_chunk: int = 32  # at most this many rows per batch shard encoded at once (activation memory)
    dropout: bool = True
    query_slots: int = 1  # at most this many texts in a packed row (1: one text a row)
    passage_slots: int = 1
    # Rows per shard encoded at once for each kind (0: encode_chunk): rows longer than the texts
    # come fewer to a chunk (`pegjax.data.packing.estimate_geometry`).
    query_chunk: int = 0
    passage_chunk: int = 0
    frozen: tuple[str, ...] = ()  # parameter path prefixes ("embeddings/word_embeddings") never trained
    keep_dense_outputs: bool = False  # the backward pass reuses the forward's dense products (module doc)


def is_frozen(path: tuple, frozen: tuple[str, ...]) -> bool:
    """Whether the parameter at ``path`` (a tuple of names) falls under one of the ``frozen``
    prefixes ("embeddings/word_embeddings" covers that table and everything below it)."""
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    return any(name == f or name.startswith(f + "/") for f in frozen)


def unmatched_frozen(params, frozen: tuple[str, ...]) -> list[str]:
    """The ``frozen`` prefixes that name no parameter (a typo would silently train everything)."""
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return [f for f in frozen if not any(is_frozen(p, (f,)) for p in paths)]


def _stop_frozen(params, frozen: tuple[str, ...]):
    if not frozen:
        return params
    return jax.tree_util.tree_map_with_path(lambda p, x: lax.stop_gradient(x) if is_frozen(p, frozen) else x, params)


def make_optimizer(learning_rate: Callable, weight_decay: float = 0.01, clip_norm: float | None = 1.0,
                   frozen: tuple[str, ...] = ()):
    """AdamW with global-norm clipping; no weight decay on biases and LayerNorm.

    Parameters under a ``frozen`` prefix get no update and no optimizer state (a 250k-entry
    multilingual vocabulary is 96M parameters that a one-language fine-tune barely touches).
    """

    def decay_mask(params):
        flat = flax.traverse_util.flatten_dict(params)
        return flax.traverse_util.unflatten_dict(
            {path: path[-1] in ("kernel", "embedding") for path in flat}
        )

    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-6, weight_decay=weight_decay, mask=decay_mask))
    tx = optax.chain(*parts)
    if not frozen:
        return tx

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: "frozen" if is_frozen(p, frozen) else "trained", params)

    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def optimizer_and_schedules(config):
    """(optax AdamW, {"beta", "gamma", "learning_rate"} schedules) of a config."""
    lr = schedules.learning_rate(config.optimizer.learning_rate, config.train.steps)
    knobs = {
        "beta": schedules.knob(config.progressive.beta, "beta"),
        "gamma": schedules.knob(config.progressive.gamma, "gamma"),
        "learning_rate": lr,
    }
    tx = make_optimizer(lr, config.optimizer.weight_decay, config.optimizer.clip_norm or None, frozen_of(config))
    return tx, knobs


def frozen_of(config) -> tuple[str, ...]:
    """config.model.frozen ("a/b,c/d") -> ("a/b", "c/d")."""
    return tuple(p.strip().strip("/") for p in config.model.get("frozen", "").split(",") if p.strip())


def encode_in_chunks(model: EmbeddingModel, params, tokens, segments, text_slots, slots: int, max_chunk: int,
                     mesh=None, rng=None, keep_dense: bool = False):
    """Embeds the texts packed in [S*R, L] int32 rows -> [N, D] float32, one row per text slot.

    ``text_slots`` [N] int32 says where each text is in its shard's R * ``slots`` pooled rows (R *
    ``slots`` itself: no text, a zero vector). Rows
    are encoded ``chunk`` rows per batch shard at a time (R = chunks * chunk, chunk <= max_chunk,
    `pegjax.data.packing.chunked_rows`); each chunk's forward pass is recomputed in the backward
    pass (nothing but the embeddings is kept), so activation memory is one chunk's whatever N is;
    ``keep_dense`` keeps every chunk's dense-layer outputs too, and the recomputation skips those
    products.
    ``rng`` (optional) drives dropout; chunk c uses a seed drawn from fold_in(rng, c) in both
    passes. On a mesh, each chunk's rows stay split over the batch axes; FSDP-sharded weights are
    all-gathered once per call into one copy per batch shard (never the activations), and the
    weight gradient is summed over shards once per call, not once per chunk.
    """
    shards = 1 if mesh is None else sharding.batch_shards(mesh)
    total, length = tokens.shape
    rows = total // shards
    count = text_slots.shape[0]
    if total % shards or count % shards:
        raise ValueError(f"{total} rows / {count} texts do not split over {shards} batch shards")
    rows_again, chunk = chunked_rows(rows, max_chunk)
    if rows_again != rows:
        raise ValueError(f"{rows} rows per shard do not split into equal chunks of at most {max_chunk}; "
                         "build them with pegjax.data.packing.chunked_rows")
    chunks = rows // chunk

    def to_chunks(x):  # [S*R, L] -> [chunks, shards * chunk, L], rows of every shard in each chunk
        return jnp.swapaxes(x.reshape(shards, chunks, chunk, length), 0, 1).reshape(chunks, shards * chunk, length)

    if mesh is not None and shards > 1:
        # One copy of the gathered weights per batch shard, for the whole loop: each shard encodes
        # its own rows with its own copy, so the backward pass accumulates each shard's weight
        # gradient locally over all chunks and sums the shards once, after the loop. (With one
        # shared copy XLA gathers the weights and all-reduces the whole gradient once per chunk.)
        gathered = sharding.gathered_param_shardings(abstract_params(model), mesh)
        per_shard = jax.tree.map(lambda g: NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES, *g.spec)), gathered)
        params = lax.with_sharding_constraint(
            jax.tree.map(lambda p: jnp.broadcast_to(p[None], (shards, *p.shape)), params), per_shard)

    def embed_chunk(params, tokens_c, segments_c, index):
        seed = None if rng is None else jax.random.bits(jax.random.fold_in(rng, index), dtype=jnp.uint32)
        if mesh is None or shards == 1:
            if mesh is not None:
                params = lax.with_sharding_constraint(params, sharding.gathered_param_shardings(abstract_params(model), mesh))
            return embed_rows(params, tokens_c, segments_c, seed)
        # [S*chunk, L] -> [S, chunk, L]: shard s encodes its rows with its copy of the weights;
        # dropout masks are those of the whole chunk (the shard's row offset goes into the hash).
        split = lambda x: lax.with_sharding_constraint(  # noqa: E731
            x.reshape(shards, chunk, *x.shape[1:]), sharding.batch_sharding(mesh, x.ndim + 1))
        encode_shard = lambda p, t, g, shard: embed_rows(p, t, g, None if seed is None else (seed, shard))  # noqa: E731
        pooled = jax.vmap(encode_shard)(params, split(tokens_c), split(segments_c), jnp.arange(shards, dtype=jnp.uint32))
        return pooled.reshape(shards * chunk, *pooled.shape[2:])

    def embed_rows(params, tokens_c, segments_c, seed):
        if slots == 1:
            return model.embed(params, tokens_c, segments_c, dropout_seed=seed)[:, None]
        return model.embed_packed(params, tokens_c, segments_c, slots, dropout_seed=seed)

    if chunks == 1:
        # The whole shard in one chunk: the activations the backward pass needs are exactly one
        # chunk's, so keeping them costs no more memory than recomputing them, and saves a forward.
        pooled = embed_chunk(params, to_chunks(tokens)[0], to_chunks(segments)[0], jnp.zeros((), jnp.int32))[None]
    else:
        policy = (jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT) if keep_dense
                  else jax.checkpoint_policies.nothing_saveable)
        embed_chunk = jax.checkpoint(embed_chunk, policy=policy)

        def body(carry, inputs):
            return carry, embed_chunk(params, *inputs)

        _, pooled = lax.scan(body, None, (to_chunks(tokens), to_chunks(segments), jnp.arange(chunks)))
    dim = pooled.shape[-1]  # pooled [chunks, S*chunk, slots, D] -> [S, R*slots, D], then each text's row
    pooled = jnp.swapaxes(pooled.reshape(chunks, shards, chunk, slots, dim), 0, 1).reshape(shards, rows * slots, dim)
    pooled = jnp.pad(pooled, ((0, 0), (0, 1), (0, 0)))  # slot R * slots: the zero vector of a padding text
    local = text_slots.reshape(shards, count // shards, 1)
    return jnp.take_along_axis(pooled, local, axis=1).reshape(count, dim)


def loss_and_metrics(params, batch, beta, gamma, rng, config: StepConfig, mesh=None):
    """The global loss of one batch as a function of params: (loss, metrics)."""
    shards = 1 if mesh is None else sharding.batch_shards(mesh)
    query_rng = passage_rng = None
    if rng is not None:
        query_rng, passage_rng = jax.random.split(rng)
    queries = encode_in_chunks(
        config.model, params, batch["query_tokens"], batch["query_segments"], batch["query_slots"],
        config.query_slots, config.query_chunk or config.encode_chunk, mesh, query_rng, config.keep_dense_outputs,
    )
    passages = encode_in_chunks(
        config.model, params, batch["passage_tokens"], batch["passage_segments"], batch["passage_slots"],
        config.passage_slots, config.passage_chunk or config.encode_chunk, mesh, passage_rng, config.keep_dense_outputs,
    )
    gather = split = None
    if mesh is not None:
        # Every query meets every passage: gather the embeddings (never activations) once.
        gather = lambda x: lax.with_sharding_constraint(x, sharding.replicated(mesh))  # noqa: E731
        split = lambda x: lax.with_sharding_constraint(x, sharding.batch_sharding(mesh, x.ndim))  # noqa: E731
    loss, metrics = contrastive_loss(
        queries,
        passages,
        batch["passage_hashes"],
        batch["positive_hashes"],
        beta,
        gamma,
        config.loss,
        shards=shards,
        gather=gather,
        split=split,
        valid=batch["query_valid"] > 0,
        query_hashes=batch["query_hashes"],
    )
    if config.loss.teacher_weight > 0:
        kl = distillation(queries, passages, batch["teacher_scores"], config.loss.temperature,
                          config.loss.teacher_temperature, valid=batch["query_valid"] > 0)
        loss = loss + config.loss.teacher_weight * kl
        metrics.update(loss=loss, distillation_kl=kl)
    real = sum((batch[k] > 0).sum() for k in ("query_segments", "passage_segments"))
    positions = batch["query_segments"].size + batch["passage_segments"].size
    metrics.update(real_tokens=real.astype(jnp.float32), real_token_fraction=real / positions)
    return loss, metrics


def train_step(state: TrainState, batch, *, config: StepConfig, tx, beta_schedule, gamma_schedule, learning_rate, mesh=None):
    """One optimizer step on one global batch -> (new state, metrics of scalars).

    The learning rate, beta and gamma follow the count of applied updates, as the optimizer's own
    count does: a skipped non-finite step moves neither.
    """
    beta = jnp.asarray(beta_schedule(state.updates), jnp.float32)
    gamma = jnp.asarray(gamma_schedule(state.updates), jnp.float32)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step) if config.dropout else None
    # Frozen parameters pass under stop_gradient: their gradient is a known zero that XLA never
    # computes, reduces across devices or feeds to the optimizer.
    loss_fn = lambda params, *args: loss_and_metrics(_stop_frozen(params, config.frozen), *args)  # noqa: E731
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, batch, beta, gamma, rng, config, mesh)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient never reaches the weights; the loop stops or skips on it.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    if config.frozen:  # the donated buffers themselves: no pass over a frozen table
        params = jax.tree_util.tree_map_with_path(lambda p, new, old: old if is_frozen(p, config.frozen) else new,
                                                  params, state.params)
    metrics = dict(
        metrics,
        beta=beta,
        gamma=gamma,
        learning_rate=jnp.asarray(learning_rate(state.updates), jnp.float32),
        grad_norm=grad_norm,
        nonfinite=1.0 - finite.astype(jnp.float32),
    )
    return TrainState(step=state.step + 1, updates=state.updates + finite.astype(jnp.int32), params=params,
                      opt_state=opt_state, rng=state.rng), metrics


def abstract_params(model: EmbeddingModel):
    """Parameter shapes with their logical axis names, without allocating anything."""
    return jax.eval_shape(model.init, jax.random.key(0))


def state_layout(model: EmbeddingModel, tx, mesh):
    """(abstract TrainState of ShapeDtypeStructs, TrainState of shardings); allocates nothing."""
    boxed = abstract_params(model)
    param_sharding = sharding.param_shardings(boxed, mesh)
    abstract_opt = jax.eval_shape(tx.init, nn.unbox(boxed))
    replicated = sharding.replicated(mesh)
    shardings = TrainState(
        step=replicated,
        updates=replicated,
        params=param_sharding,
        opt_state=sharding.state_shardings(tx, param_sharding, abstract_opt, mesh),
        rng=replicated,
    )
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        updates=jax.ShapeDtypeStruct((), jnp.int32),
        params=nn.unbox(boxed),
        opt_state=abstract_opt,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    return jax.tree.map(with_sharding, abstract, shardings), shardings


def create_state(model: EmbeddingModel, tx, mesh, seed: int, params=None):
    """A TrainState laid out on the mesh -> (state, state shardings).

    ``params`` (a numpy tree, e.g. from a Hugging Face folder) or, when None, random init.
    """
    _, shardings = state_layout(model, tx, mesh)
    if params is None:
        init = lambda key: nn.unbox(model.init(key))  # noqa: E731
        params = jax.jit(init, out_shardings=shardings.params)(jax.random.key(seed))
    else:
        params = jax.device_put(params, shardings.params)
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
        updates=jax.device_put(jnp.zeros((), jnp.int32), shardings.updates),
        params=params,
        opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
        rng=jax.device_put(jax.random.key_data(jax.random.key(seed + 1)), shardings.rng),
    )
    return state, shardings


def batch_shardings(mesh) -> dict:
    two_dimensional = ("query_tokens", "query_segments", "passage_tokens", "passage_segments", "positive_hashes",
                       "teacher_scores")
    return {key: sharding.batch_sharding(mesh, 2 if key in two_dimensional else 1) for key in BATCH_KEYS}


def jit_train_step(config: StepConfig, tx, schedules: dict, mesh, state_sharding):
    """The jitted step: explicit in/out shardings, the state donated.

    schedules: {"beta": fn, "gamma": fn, "learning_rate": fn}.
    """
    step = lambda state, batch: train_step(  # noqa: E731
        state,
        batch,
        config=config,
        tx=tx,
        beta_schedule=schedules["beta"],
        gamma_schedule=schedules["gamma"],
        learning_rate=schedules["learning_rate"],
        mesh=mesh,
    )
    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_shardings(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def abstract_batch(mesh, queries: RowGeometry, passages: RowGeometry, group: int, extra_positives: int = 1):
    """ShapeDtypeStructs of a global batch (see the module doc) laid out by the row geometries (per
    batch shard), with their shardings."""
    shards = sharding.batch_shards(mesh)
    shapes = {
        "query_tokens": (shards * queries.rows, queries.length),
        "query_segments": (shards * queries.rows, queries.length),
        "query_slots": (shards * queries.texts,),
        "passage_tokens": (shards * passages.rows, passages.length),
        "passage_segments": (shards * passages.rows, passages.length),
        "passage_slots": (shards * passages.texts,),
        "passage_hashes": (shards * passages.texts,),
        "positive_hashes": (shards * queries.texts, extra_positives),
        "query_hashes": (shards * queries.texts,),
        "query_valid": (shards * queries.texts,),
        "teacher_scores": (shards * queries.texts, group),
    }
    if passages.texts != queries.texts * group:
        raise ValueError(f"{passages.texts} passages per shard for {queries.texts} queries x group {group}")
    shardings = batch_shardings(mesh)
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "teacher_scores" else jnp.int32, sharding=shardings[k])
            for k, shape in shapes.items()}
