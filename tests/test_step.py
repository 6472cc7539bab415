"""The sharded, chunked, remat-ed step computes the plain full-batch loss and gradient."""

import functools
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from pegjax import sharding
from pegjax.data import packing
from pegjax.loss import LossConfig
from pegjax.models.bert import BertConfig, EmbeddingModel
from pegjax.step import StepConfig, batch_shardings, loss_and_metrics

TINY = BertConfig(
    vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    max_position_embeddings=64,
)
QUERIES, GROUP, EXTRA = 16, 3, 2
BETA, GAMMA = 2.0, 1.5


def dense_reference_loss(queries, passages, passage_hashes, positive_hashes, beta, gamma, group, tau,
                         margin=None, query_negatives=False):
    """The loss of DESIGN §1 written plainly: one query at a time, the whole [Q, P] matrix at once."""
    passage_hashes = np.asarray(passage_hashes)
    positive_hashes = np.asarray(positive_hashes)
    candidates = jnp.concatenate([passages, queries]) if query_negatives else passages
    scores = queries @ candidates.T / tau
    num_queries, num_passages = queries.shape[0], passages.shape[0]
    losses = []
    for i in range(num_queries):
        positive = i * group
        own_hash = passage_hashes[positive]
        negatives = []
        for j in range(candidates.shape[0]):
            if j == positive or (query_negatives and j == num_passages + i):
                continue
            if j < num_passages:
                h = passage_hashes[j]
                if h != 0 and (h == own_hash or h in set(positive_hashes[i]) - {0}):
                    continue
            negatives.append(j)
        s_pos = scores[i, positive]
        s_neg = scores[i, np.array(negatives, dtype=int)]
        keep = jnp.ones(len(negatives), bool)
        if margin is not None:
            fixed = jax.lax.stop_gradient(s_neg * tau)
            keep = fixed <= jax.lax.stop_gradient(s_pos * tau) + margin
        count = keep.sum()
        w = count * jnp.exp(beta * jax.lax.stop_gradient(s_neg)) * keep
        w = w / jnp.maximum((jnp.exp(beta * jax.lax.stop_gradient(s_neg)) * keep).sum(), 1e-30)
        term = (jax.lax.stop_gradient(w) * jnp.exp(s_neg)).sum()
        losses.append(jnp.where(count > 0, -s_pos + jnp.log(jnp.exp(s_pos) + term), 0.0))
    losses = jnp.stack(losses)
    fixed_losses = jax.lax.stop_gradient(losses)
    z = (fixed_losses - fixed_losses.mean()) / fixed_losses.std()
    v = jnp.exp(-gamma * jnp.maximum(z, 0))
    return (v * losses).sum() / v.sum()


def make_batch(seed, num_queries=QUERIES, group=GROUP, query_len=8, passage_len=12):
    """Random token ids with real-looking structure: ragged lengths, shared passages (false negatives)
    and listed extra positives."""
    rng = np.random.default_rng(seed)
    passages = num_queries * group

    def ids_and_mask(rows, length):
        ids = rng.integers(5, TINY.vocab_size, size=(rows, length), dtype=np.int32)
        lengths = rng.integers(3, length + 1, size=rows)
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
        return ids * mask, mask

    query_ids, query_mask = ids_and_mask(num_queries, query_len)
    passage_ids, passage_mask = ids_and_mask(passages, passage_len)
    hashes = rng.integers(1, 2**31 - 1, size=passages, dtype=np.int64).astype(np.int32)
    # Query 1's hard negative is query 0's positive text: a false negative for query 0 only if
    # listed; query 3's positive appears again as query 5's negative (same hash, same text).
    passage_ids[1 * group + 1], passage_mask[1 * group + 1] = passage_ids[0], passage_mask[0]
    hashes[1 * group + 1] = hashes[0]
    passage_ids[5 * group + 2], passage_mask[5 * group + 2] = passage_ids[3 * group], passage_mask[3 * group]
    hashes[5 * group + 2] = hashes[3 * group]
    positive_hashes = np.zeros((num_queries, EXTRA), np.int32)
    positive_hashes[2, 0] = hashes[7 * group + 1]  # query 2 lists another passage as a positive
    positive_hashes[4, 1] = hashes[4 * group + 1]  # query 4 lists its own hard negative as positive
    return {
        "query_ids": query_ids, "query_mask": query_mask,
        "passage_ids": passage_ids, "passage_mask": passage_mask,
        "passage_hashes": hashes, "positive_hashes": positive_hashes,
    }


def as_step_batch(texts, shards, packed=True, max_chunk=1, wide=False):
    """One text a row -> (the step's batch, StepConfig fields for its slots): packed into the fewest
    rows that hold it, or one text a row. ``wide``: rows 1.5x the longest text, the passages'
    chunks half as many rows (each kind its own chunk, as `packing.estimate_geometry` makes them)."""
    slots = 16 if packed else 1
    queries, passages = (packing.fitted_geometry(texts[key], shards, max_chunk, slots,
                                                 length=texts[key].shape[1] * 3 // 2 if wide else None)
                         for key in ("query_mask", "passage_mask"))
    if wide:
        passages = packing.fitted_geometry(texts["passage_mask"], shards, max(max_chunk // 2, 1), slots,
                                           length=passages.length)
    batch = packing.step_batch(texts, shards, queries, passages)
    return batch, dict(encode_chunk=max_chunk, query_slots=queries.slots, passage_slots=passages.slots,
                       query_chunk=queries.max_chunk, passage_chunk=passages.max_chunk)


@pytest.fixture(scope="module")
def model_and_params():
    model = EmbeddingModel(TINY, pooling="mean", normalize=True)
    return model, nn.unbox(model.init(jax.random.key(3)))


def reference_grad(model, params, batch, loss_config):
    def loss_fn(params):
        queries = model.embed(params, batch["query_ids"], batch["query_mask"])
        passages = model.embed(params, batch["passage_ids"], batch["passage_mask"])
        return dense_reference_loss(
            queries, passages, batch["passage_hashes"], batch["positive_hashes"], BETA, GAMMA,
            loss_config.group_size, loss_config.temperature, loss_config.margin, loss_config.query_negatives,
        )
    return jax.jit(jax.value_and_grad(loss_fn))(params)  # compiled: op by op it is most of the test's time


def gradient_error(got, want):
    """Largest per-leaf relative error ||got - want|| / ||want||.

    The attention key bias is left out: its exact gradient is zero (softmax ignores a constant added
    to every score of a row), so both sides hold float32 round-off of ~1e-11 there.
    """
    got, want = flax.traverse_util.flatten_dict(got), flax.traverse_util.flatten_dict(want)
    assert got.keys() == want.keys()
    errors = {}
    for path, expected in want.items():
        if path[-3:] == ("attention", "key", "bias"):
            assert np.abs(np.asarray(got[path])).max() < 1e-6
            continue
        errors[path] = np.linalg.norm(np.asarray(got[path]) - expected) / np.linalg.norm(expected)
    return max(errors.values())


MESHES = {"data8": {"data": 8}, "data2_fsdp4": {"data": 2, "fsdp": 4},
          "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}
LAYOUTS = {"packed": (False, True, False), "packed_plus_queries": (True, True, False), "one_per_row": (False, False, False),
           "wide_rows": (False, True, True)}
# Packing (the default) on every mesh (rows longer than the texts on one); the other two layouts each
# on a mesh of their own: every mesh and every layout is covered in 5 compiles instead of 12.
CASES = [("packed", "data8"), ("wide_rows", "data2_fsdp4"), ("packed", "data2_fsdp2_tensor2"),
         ("packed_plus_queries", "data2_fsdp2_tensor2"), ("one_per_row", "data2_fsdp4")]


@pytest.mark.parametrize("mesh_sizes, query_negatives, packed, wide",
                         [(MESHES[mesh], *LAYOUTS[layout]) for layout, mesh in CASES],
                         ids=[f"{layout}-{mesh}" for layout, mesh in CASES])
def test_sharded_chunked_gradient_equals_full_batch(model_and_params, mesh_sizes, query_negatives, packed, wide):
    """Texts packed several to a row (block-diagonal attention, positions and pooling per text;
    rows as long as the texts or longer) or one to a row, encoded in remat-ed chunks on a mesh: the
    loss and gradient of one text a row, the whole batch at once."""
    assert len(jax.devices()) == 8
    model, params = model_and_params
    texts = make_batch(0)
    loss_config = LossConfig(group_size=GROUP, temperature=0.05, query_block=1, query_negatives=query_negatives)
    want_loss, want_grad = reference_grad(model, params, texts, loss_config)

    mesh = sharding.make_mesh(mesh_sizes)
    batch, slots = as_step_batch(texts, sharding.batch_shards(mesh), packed, max_chunk=2, wide=wide)
    if packed:
        assert batch["query_segments"].max() > 1 and batch["passage_segments"].max() > 1  # rows hold several texts
    config = StepConfig(model=model, loss=loss_config, dropout=False, **slots)
    if wide:  # the passages are encoded a row per shard at a time, as their geometry asks
        assert batch["passage_tokens"].shape[1] == 18 and slots["passage_chunk"] == 1
        jaxpr = jax.make_jaxpr(lambda p, b: loss_and_metrics(p, b, BETA, GAMMA, None, config, mesh))(params, batch)
        rows = batch["passage_tokens"].shape[0] // sharding.batch_shards(mesh)
        assert rows in [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    param_sharding = sharding.param_shardings(jax.eval_shape(model.init, jax.random.key(0)), mesh)
    grad_fn = jax.jit(
        jax.value_and_grad(lambda p, b: loss_and_metrics(p, b, BETA, GAMMA, None, config, mesh), has_aux=True),
        in_shardings=(param_sharding, batch_shardings(mesh)),
        out_shardings=((sharding.replicated(mesh), sharding.replicated(mesh)), param_sharding),
    )
    (loss, metrics), grad = grad_fn(jax.device_put(params, param_sharding), batch)
    assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
    assert 0 < float(metrics["masked_fraction"]) < 0.2
    assert gradient_error(grad, want_grad) <= 1e-5
    # Parameters (and so their gradients) really are split: embed over fsdp, mlp over tensor.
    kernel = grad["layers"]["intermediate"]["kernel"]  # [layers, embed, mlp]
    fsdp, tensor = mesh_sizes.get("fsdp", 1), mesh_sizes.get("tensor", 1)
    assert kernel.sharding.shard_shape(kernel.shape) == (
        TINY.num_hidden_layers, TINY.hidden_size // fsdp, TINY.intermediate_size // tensor)


def compiled_step(mesh_sizes, texts, loss_config=None, encode_chunk=1):
    """(jitted step, state, model, the step's packed batch) on a mesh of ``mesh_sizes``."""
    import optax

    from pegjax.step import create_state, jit_train_step, make_optimizer

    model = EmbeddingModel(TINY, pooling="mean", normalize=True)
    mesh = sharding.make_mesh(mesh_sizes)
    tx = make_optimizer(optax.constant_schedule(1e-3))
    state, state_sharding = create_state(model, tx, mesh, seed=0)
    batch, slots = as_step_batch(texts, sharding.batch_shards(mesh), max_chunk=encode_chunk)
    config = StepConfig(model=model, loss=loss_config or LossConfig(group_size=GROUP, query_block=1), **slots)
    schedules = {"beta": optax.constant_schedule(1.0), "gamma": optax.constant_schedule(1.0),
                 "learning_rate": optax.constant_schedule(1e-3)}
    return jit_train_step(config, tx, schedules, mesh, state_sharding), state, model, batch


QUERY_LENGTH, PASSAGE_LENGTH = 10, 14  # lengths no other dimension shares


@functools.lru_cache(maxsize=None)
def step_hlo(mesh_items: tuple) -> str:
    """The compiled step's HLO text on a mesh of ``dict(mesh_items)``: chunks of one row and blocks
    of one query (loops of many iterations), dropout on. Compiled once per mesh for the tests that
    read it."""
    texts = make_batch(0, query_len=QUERY_LENGTH, passage_len=PASSAGE_LENGTH)
    step, state, _, batch = compiled_step(dict(mesh_items), texts, encode_chunk=1)
    return step.lower(state, batch).compile().as_text()


FSDP_MESH = (("data", 2), ("fsdp", 4))


@pytest.mark.parametrize("mesh_items", [(("data", 8),), FSDP_MESH], ids=["data8", "data2_fsdp4"])
def test_only_embeddings_and_weights_cross_devices(mesh_items):
    """The compiled 8-device step all-gathers embeddings ([Q|P|P+Q, D]) and, under FSDP, whole
    weights; never a token-level activation (anything with a sequence dimension)."""

    query_len, passage_len = QUERY_LENGTH, PASSAGE_LENGTH
    hlo = step_hlo(mesh_items)
    model = EmbeddingModel(TINY, pooling="mean", normalize=True)
    param_dims = {tuple(sorted(d for d in leaf.shape if d != 1))
                  for leaf in jax.tree.leaves(nn.unbox(jax.eval_shape(model.init, jax.random.key(0))))}
    rows = {QUERIES, QUERIES * GROUP, QUERIES * (GROUP + 1)}
    moved = re.findall(r"= (\(?[^=]*?\)?) (all-gather|all-to-all|collective-permute)(?:-start)?\(", hlo)
    assert moved, "expected the passage embeddings to be all-gathered"
    gathered_embeddings = False
    for types, op in moved:
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", types):
            shape = tuple(int(d) for d in dims.split(",") if d)
            assert query_len not in shape and passage_len not in shape, f"{op} moves an activation: {dtype}{list(shape)}"
            if not dtype.startswith(("f", "bf")):
                continue
            squeezed = tuple(d for d in shape if d != 1)
            is_weight = tuple(sorted(squeezed)) in param_dims
            is_embedding = squeezed[-1:] == (TINY.hidden_size,) and int(np.prod(squeezed[:-1])) in rows
            gathered_embeddings |= is_embedding
            assert is_weight or is_embedding, f"{op} moves {dtype}{list(shape)}: neither a weight nor embeddings"
    assert gathered_embeddings
    if "fsdp" in dict(mesh_items):
        assert any("all-gather" == op for _, op in moved)


def loop_collectives(hlo: str) -> list[str]:
    """The collective ops of compiled HLO text that sit inside a while loop's body (or in a
    computation such a body calls), as "computation: op"."""

    computation, calls, bodies, found = None, {}, set(), []
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            computation = header.group(1)
            continue
        if computation is None:
            continue
        bodies.update(re.findall(r"body=%?([\w.\-]+)", line))
        for callee in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line):
            calls.setdefault(callee, set()).add(computation)
        op = re.search(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(", line)
        if op:
            found.append((computation, op.group(1)))

    def in_loop(name, seen=frozenset()):
        return name in bodies or any(in_loop(caller, seen | {name}) for caller in calls.get(name, set()) - seen)

    return [f"{name}: {op}" for name, op in found if in_loop(name)]


def test_no_collective_runs_inside_the_chunk_or_block_loops():
    """Chunks of one row and blocks of one query make loops of many iterations; weights are
    gathered, and the weight and embedding gradients summed over devices, once a step, never once
    an iteration (a per-chunk all-reduce of the whole weight gradient is what made a 2-process CPU
    step twice as slow as one process, and costs a cluster the model's size each chunk)."""
    hlo = step_hlo(FSDP_MESH)
    assert "while" in hlo and re.search(r"all-(gather|reduce)", hlo)
    assert loop_collectives(hlo) == []


def materialized_u32_arrays(hlo: str) -> list[str]:
    """The u32 arrays of rank >= 3 that compiled HLO text writes to memory: results of the
    instructions of the entry computation and of loop bodies, not values inside a fusion."""
    fused = set(re.findall(r"fusion\(.*?calls=%?([\w.\-]+)", hlo))
    computation, found = None, []
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            computation = header.group(1)
        elif computation not in fused and (array := re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (u32\[\d+(?:,\d+){2,}\])", line)):
            found.append(f"{computation}: {array.group(1)} {array.group(2)}")
    return found


def test_dropout_masks_are_hashed_where_they_are_applied():
    """A dropout mask is a hash of each element's index, computed inside the fusion that applies
    it. Left to itself, XLA builds the index arrays once outside the chunk loop (a u32
    [rows, heads, L, L] array per layer, 300 MB at bench.train_step's shape) and every dropout reads
    them back from memory; the step was ~2% slower for it."""
    hlo = step_hlo(FSDP_MESH)
    assert "while" in hlo and re.search(r"u32\[\d+(,\d+){2,}\]", hlo)  # the chunk loop; dropout is on
    assert materialized_u32_arrays(hlo) == []


def test_dropout_of_a_batch_split_into_shards_is_the_whole_batchs():
    """The step encodes each batch shard with its own copy of the weights; given (seed, shard),
    every shard gets the dropout masks its rows get in the whole batch."""
    model = EmbeddingModel(TINY, pooling="mean", normalize=True)
    params = nn.unbox(model.init(jax.random.key(3)))
    rng = np.random.default_rng(0)
    ids = rng.integers(5, TINY.vocab_size, (8, 16)).astype(np.int32)
    mask = (np.arange(16)[None, :] < rng.integers(4, 17, (8, 1))).astype(np.int32)
    seed = jnp.uint32(1234)
    whole = model.embed(params, ids, mask, dropout_seed=seed)
    shards = jax.vmap(lambda i, m, s: model.embed(params, i, m, dropout_seed=(seed, s)))(
        ids.reshape(4, 2, 16), mask.reshape(4, 2, 16), jnp.arange(4, dtype=jnp.uint32))
    np.testing.assert_allclose(shards.reshape(8, -1), whole, atol=1e-6)
    assert np.abs(whole - model.embed(params, ids, mask)).max() > 1e-3  # dropout is on


def test_train_step_learns_and_reports_metrics():
    texts = make_batch(1)
    step, state, _, batch = compiled_step({"data": 2, "fsdp": 4}, texts, encode_chunk=2)
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["unweighted_loss"]))
    assert int(state.step) == 6
    assert set(metrics) >= {"loss", "beta", "gamma", "learning_rate", "grad_norm", "positive_cosine",
                            "hardest_negative_cosine", "masked_fraction", "real_tokens", "real_token_fraction"}
    real = texts["query_mask"].sum() + texts["passage_mask"].sum()
    assert float(metrics["real_tokens"]) == real
    positions = batch["query_tokens"].size + batch["passage_tokens"].size
    assert float(metrics["real_token_fraction"]) == pytest.approx(real / positions)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert losses[-1] < losses[0]
    kernel = state.params["layers"]["attention"]["query"]["kernel"]  # [layers, embed, heads, kv]
    assert kernel.sharding.shard_shape(kernel.shape)[1] == TINY.hidden_size // 4


def pad_queries(texts, rows):
    """Appends padding queries (no tokens, query_valid 0, no passages) up to ``rows`` queries."""
    real = len(texts["query_ids"])
    group = len(texts["passage_ids"]) // real
    extra = rows - real
    zeros = lambda a, n: np.concatenate([a, np.zeros((n, *a.shape[1:]), a.dtype)])  # noqa: E731
    padded = {k: zeros(texts[k], extra) for k in ("query_ids", "query_mask", "positive_hashes")}
    padded.update({k: zeros(texts[k], extra * group) for k in ("passage_ids", "passage_mask", "passage_hashes")})
    padded["query_valid"] = np.array([1] * real + [0] * extra, np.int32)
    return padded


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "one_per_row"])
def test_padding_rows_are_invisible_to_loss_and_gradient(model_and_params, packed):
    """13 queries x 6 passages on 8 devices: padded to 16 rows (2 a device), the 3 padding queries
    and their 18 passages change neither the loss nor the gradient of the 13 real ones, computed
    densely on one device (beta, gamma > 0; false negatives present)."""
    model, params = model_and_params
    texts = make_batch(2, num_queries=13, group=6)
    loss_config = LossConfig(group_size=6, temperature=0.05, query_block=2)
    want_loss, want_grad = reference_grad(model, params, texts, loss_config)

    mesh = sharding.make_mesh({"data": 8})
    batch, slots = as_step_batch(pad_queries(texts, 16), 8, packed, max_chunk=4)
    assert batch["query_valid"].tolist() == [1] * 13 + [0] * 3
    config = StepConfig(model=model, loss=loss_config, dropout=False, **slots)
    param_sharding = sharding.param_shardings(jax.eval_shape(model.init, jax.random.key(0)), mesh)
    grad_fn = jax.jit(
        jax.value_and_grad(lambda p, b: loss_and_metrics(p, b, BETA, GAMMA, None, config, mesh), has_aux=True),
        in_shardings=(param_sharding, batch_shardings(mesh)),
    )
    (loss, metrics), grad = grad_fn(jax.device_put(params, param_sharding), batch)
    assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
    assert gradient_error(grad, want_grad) <= 1e-5
    assert float(metrics["real_tokens"]) == texts["query_mask"].sum() + texts["passage_mask"].sum()


def dense_distillation(queries, passages, teacher_scores, tau, teacher_tau):
    """KL(teacher || student) of each query's own group, written plainly, averaged."""
    total = 0.0
    for i in range(queries.shape[0]):
        student = jax.nn.log_softmax(passages[i * GROUP:(i + 1) * GROUP] @ queries[i] / tau)
        teacher = jax.nn.softmax(jnp.asarray(teacher_scores[i]) / teacher_tau)
        total += (teacher * (jnp.log(teacher) - student)).sum()
    return total / queries.shape[0]


def test_teacher_term_equals_the_dense_kl_and_is_absent_at_weight_zero(model_and_params):
    """The distillation term on an 8-device mesh: loss and gradient of the contrastive loss plus
    weight x the plain per-query KL; at weight 0 the loss is the contrastive loss, bit for bit."""
    model, params = model_and_params
    texts = make_batch(2)
    texts["teacher_scores"] = np.random.default_rng(5).normal(size=(QUERIES, GROUP)).astype(np.float32) * 3
    weight, teacher_tau, tau = 0.7, 0.5, 0.05
    mesh = sharding.make_mesh({"data": 8})
    batch, slots = as_step_batch(texts, sharding.batch_shards(mesh), max_chunk=2)

    def step_loss(loss_config, gradient=True):
        config = StepConfig(model=model, loss=loss_config, dropout=False, **slots)
        fn = lambda p, b: loss_and_metrics(p, b, BETA, GAMMA, None, config, mesh)  # noqa: E731
        return jax.jit(jax.value_and_grad(fn, has_aux=True) if gradient else fn)(params, batch)

    # The weight-0 comparison needs the loss alone (a forward pass compiles in a fraction of the time).
    plain = LossConfig(group_size=GROUP, temperature=tau, query_block=1)
    without, _ = step_loss(plain, gradient=False)
    at_zero, _ = step_loss(LossConfig(group_size=GROUP, temperature=tau, query_block=1, teacher_weight=0.0,
                                      teacher_temperature=teacher_tau), gradient=False)
    assert float(at_zero) == float(without)
    (loss, metrics), grad = step_loss(LossConfig(group_size=GROUP, temperature=tau, query_block=1,
                                                 teacher_weight=weight, teacher_temperature=teacher_tau))

    def reference(params):
        queries = model.embed(params, texts["query_ids"], texts["query_mask"])
        passages = model.embed(params, texts["passage_ids"], texts["passage_mask"])
        contrastive = dense_reference_loss(queries, passages, texts["passage_hashes"], texts["positive_hashes"],
                                           BETA, GAMMA, GROUP, tau)
        kl = dense_distillation(queries, passages, texts["teacher_scores"], tau, teacher_tau)
        return contrastive + weight * kl, kl

    (want, want_kl), want_grad = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
    assert abs(float(metrics["distillation_kl"]) - float(want_kl)) <= 1e-6 * max(1.0, abs(float(want_kl)))
    assert abs(float(loss) - float(want)) <= 1e-6 * max(1.0, abs(float(want)))
    assert float(want_kl) > 0.1  # the teacher disagrees with the random student: the term is not idle
    assert gradient_error(grad, want_grad) <= 1e-5


def test_frozen_word_embeddings_stay_bit_identical_without_optimizer_state_while_the_rest_trains():
    """config.model.frozen on a 2 x 4 FSDP mesh: the word table leaves the step bit for bit as it
    came, AdamW keeps no moments for it, every other weight moves, and the loss of the step is the
    loss without freezing (freezing changes the update, never the forward pass)."""
    import optax

    from pegjax.step import create_state, jit_train_step, make_optimizer

    texts = make_batch(1)
    model = EmbeddingModel(TINY, pooling="mean", normalize=True)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    batch, slots = as_step_batch(texts, sharding.batch_shards(mesh), max_chunk=2)
    schedules = {"beta": optax.constant_schedule(1.0), "gamma": optax.constant_schedule(1.0),
                 "learning_rate": optax.constant_schedule(1e-3)}
    runs = {}
    for frozen in ((), ("embeddings/word_embeddings",)):
        tx = make_optimizer(optax.constant_schedule(1e-3), frozen=frozen)
        state, state_sharding = create_state(model, tx, mesh, seed=0)
        before = jax.device_get(state.params)
        config = StepConfig(model=model, loss=LossConfig(group_size=GROUP, query_block=1), dropout=False, frozen=frozen,
                            **slots)
        state, metrics = jit_train_step(config, tx, schedules, mesh, state_sharding)(state, batch)
        runs[frozen] = before, jax.device_get(state.params), jax.device_get(state.opt_state), float(metrics["loss"])
    table = ("embeddings", "word_embeddings", "embedding")
    before, after, opt_state, loss = runs[("embeddings/word_embeddings",)]
    flat_before, flat_after = (flax.traverse_util.flatten_dict(p) for p in (before, after))
    assert np.array_equal(flat_after[table], flat_before[table])
    moved = [path for path in flat_before if path != table and not np.array_equal(flat_after[path], flat_before[path])]
    assert len(moved) == len(flat_before) - 1
    table_shape = (TINY.vocab_size, TINY.hidden_size)
    assert not any(getattr(leaf, "shape", None) == table_shape for leaf in jax.tree.leaves(opt_state))
    assert any(getattr(leaf, "shape", None) == table_shape for leaf in jax.tree.leaves(runs[()][2]))
    assert loss == runs[()][3]
    unfrozen_after = flax.traverse_util.flatten_dict(runs[()][1])
    assert not np.array_equal(unfrozen_after[table], flat_before[table])


def test_a_frozen_prefix_that_names_no_parameter_is_an_error():
    from pegjax.step import unmatched_frozen

    params = jax.eval_shape(EmbeddingModel(TINY).init, jax.random.key(0))
    assert unmatched_frozen(nn.unbox(params), ("embeddings/word_embeddings", "embeddings/words")) == ["embeddings/words"]


def test_kept_dense_outputs_give_the_full_batch_gradient_and_skip_their_recomputation(model_and_params):
    """``keep_dense_outputs``: the backward pass reuses every chunk's dense-layer outputs. The loss
    and gradient stay those of the whole batch at once, and the step runs one forward pass's dense
    products fewer (XLA's own count of the compiled programs)."""
    model, params = model_and_params
    texts = make_batch(0)
    loss_config = LossConfig(group_size=GROUP, temperature=0.05, query_block=1)
    want_loss, want_grad = reference_grad(model, params, texts, loss_config)
    mesh = sharding.make_mesh(MESHES["data2_fsdp4"])
    batch, slots = as_step_batch(texts, sharding.batch_shards(mesh), packed=True, max_chunk=1)
    param_sharding = sharding.param_shardings(jax.eval_shape(model.init, jax.random.key(0)), mesh)
    placed = jax.device_put(params, param_sharding)
    flops = {}
    for keep in (False, True):
        config = StepConfig(model=model, loss=loss_config, dropout=False, keep_dense_outputs=keep, **slots)
        grad_fn = jax.jit(
            jax.value_and_grad(lambda p, b: loss_and_metrics(p, b, BETA, GAMMA, None, config, mesh), has_aux=True),
            in_shardings=(param_sharding, batch_shardings(mesh)),
            out_shardings=((sharding.replicated(mesh), sharding.replicated(mesh)), param_sharding),
        ).lower(placed, batch).compile()
        cost = grad_fn.cost_analysis()
        flops[keep] = (cost[0] if isinstance(cost, list) else cost)["flops"]
        if keep:
            (loss, _), grad = grad_fn(placed, batch)
            assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
            assert gradient_error(grad, want_grad) <= 1e-5
    # The dense products of one chunk's forward pass, per device: 2 x (4E^2 + 2EM) a token and a
    # layer. XLA counts a loop's body once, so the two programs differ by one chunk of each kind.
    assert slots["query_chunk"] == slots["passage_chunk"] == 1  # rows a chunk, several chunks a kind
    assert min(batch[k].shape[0] for k in ("query_tokens", "passage_tokens")) > sharding.batch_shards(mesh)
    tokens = batch["query_tokens"].shape[1] + batch["passage_tokens"].shape[1]
    dense = 2 * TINY.num_hidden_layers * tokens * (4 * TINY.hidden_size ** 2 + 2 * TINY.hidden_size * TINY.intermediate_size)
    assert flops[False] - flops[True] == pytest.approx(dense, rel=0.02)
