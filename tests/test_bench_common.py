"""Every benchmark figure names the machine it came from: two machines sold under one model name
must not read the same."""

from bench.common import describe_cpu

# /proc/cpuinfo repeats every field once per core: the name must still say each once.
ZEN5 = "".join(f"""processor\t: {core}
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse2 avx2 avx512f avx512dq avx512_bf16 avx512_vnni
""" for core in range(2))


def test_the_cpu_is_named_with_its_family_model_and_vector_units():
    assert describe_cpu(ZEN5) == "AMD EPYC (family 26, model 2, stepping 1; AVX-512, AVX512-BF16)"
    zen4 = ZEN5.replace("family\t: 26", "family\t: 25").replace("model\t\t: 2", "model\t\t: 17")
    assert describe_cpu(zen4) == "AMD EPYC (family 25, model 17, stepping 1; AVX-512, AVX512-BF16)"
    sapphire = ("model name\t: Intel(R) Xeon(R) Processor\ncpu family\t: 6\nmodel\t\t: 143\nstepping\t: 8\n"
                "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert describe_cpu(sapphire) == "Intel(R) Xeon(R) Processor (family 6, model 143, stepping 8; AVX-512, AVX512-BF16, AMX)"
    assert describe_cpu("model name\t: Old\nflags\t\t: sse2 avx2\n") == "Old (AVX2)"
    assert describe_cpu("") == "unknown CPU"


def test_turns_alternate_and_the_ratio_reads_round_by_round():
    from bench.common import interleaved, ratios

    calls = []
    times = interleaved({"ours": lambda: calls.append("ours"), "theirs": lambda: calls.append("theirs")}, rounds=3)
    assert calls == ["ours", "theirs"] * 4  # one warm-up call each, then three rounds in turn
    assert [len(t) for t in times.values()] == [3, 3]
    assert ratios([1.0, 2.0, 1.0], [3.0, 2.0, 1.5]) == "1.50x (1.00-3.00x over 3 rounds)"


def test_the_counted_work_is_what_xla_counts_for_the_encoder():
    """The roofline's useful FLOPs of a forward pass: XLA's own count of the compiled encoder
    (which adds LayerNorm, softmax, GELU and the embedding sums) is at most a tenth above it."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from bench.common import encoder_flops
    from pegjax.models.bert import BertConfig, EmbeddingModel

    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512)
    model = EmbeddingModel(config, pooling="mean", unroll_layers=True)
    params = nn.unbox(model.init(jax.random.key(0)))
    ids = jnp.ones((3, 96), jnp.int32)
    counted = jax.jit(model.embed).lower(params, ids, jnp.ones_like(ids)).compile().cost_analysis()["flops"]
    useful = encoder_flops(config, [96] * 3)
    assert useful <= counted <= 1.1 * useful
