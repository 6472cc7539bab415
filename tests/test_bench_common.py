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
