"""Encoding throughput: pegjax vs sentence-transformers on the same texts, batch size, max length.

    python -m bench.encode [--texts 512] [--batch-size 32] [--max-length 256] [--dtypes auto] [--rounds 3]

Both encode the same real SciFact abstracts (pegjax on one CPU device per core, as its commands
run) with the same all-MiniLM-L6-v2 weights, in each compute dtype: float32, and bfloat16
(pegjax: bf16 products accumulated in float32, LayerNorm and softmax in float32;
sentence-transformers: the model cast to torch.bfloat16). ``--dtypes auto`` (the default) is
float32, plus bfloat16 where the CPU runs it fast (AVX512-BF16 or AMX; elsewhere a bf16 pass of
sentence-transformers takes minutes). Each is timed warm (after one full pass, so jit compilation
is not counted), the two sides taking turns for ``--rounds`` rounds (`bench.common.interleaved`).
Prints texts/s (median) for each, the ratio pegjax / sentence-transformers in the same dtype round
by round, the ratio of pegjax bfloat16 against sentence-transformers' default float32, how far
each pegjax embedding is from sentence-transformers' float32 one (the lowest cosine over the
texts), and the float32 roofline: each side's GFLOP/s beside this CPU's float32 product rate.
"""

import argparse
import os
import statistics

from bench.common import cpu_model, encoder_flops, interleaved, minilm_path, product_peak, ratios, roofline, scifact_texts
from pegjax.distributed import use_cpu_cores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dtypes", default="auto", help="comma-separated, or auto")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    use_cpu_cores()
    import jax
    import torch
    from sentence_transformers import SentenceTransformer

    from pegjax.data.tokenizer import tokenize
    from pegjax.encode import Encoder, fast_bfloat16

    texts = scifact_texts(args.texts)
    path = minilm_path()
    dtypes = args.dtypes.split(",") if args.dtypes != "auto" else ["float32"] + (["bfloat16"] if fast_bfloat16() else [])
    times, embeddings, encoders = {}, {}, {}
    for dtype in dtypes:
        ours = encoders[dtype] = Encoder.from_pretrained(path, dtype=dtype)
        reference = SentenceTransformer(path, device="cpu", model_kwargs={"torch_dtype": getattr(torch, dtype)})
        reference.max_seq_length = args.max_length
        out = {}

        def theirs():
            with torch.inference_mode():
                out.update(st=reference.encode(texts, batch_size=args.batch_size))

        times[dtype] = interleaved({
            "ours": lambda: out.update(ours=ours.encode(texts, batch_size=args.batch_size, max_length=args.max_length)),
            "theirs": theirs}, args.rounds)
        embeddings[dtype] = out
    rates = {dtype: tuple(len(texts) / statistics.median(t[side]) for side in ("ours", "theirs"))
             for dtype, t in times.items()}
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; pegjax on {jax.device_count()} CPU devices, "
          f"torch threads {torch.get_num_threads()}")
    print(f"texts={len(texts)} batch_size={args.batch_size} max_length={args.max_length}")
    print(f"{'dtype':10} {'pegjax texts/s':>15} {'st texts/s':>11} {'ratio':>7} {'min cosine to st float32':>25}")
    truth = embeddings.get("float32", {}).get("st")
    for dtype, (ours, theirs) in rates.items():
        cosine = "" if truth is None else f"{(embeddings[dtype]['ours'] * truth).sum(axis=1).min():.5f}"
        print(f"{dtype:10} {ours:15.1f} {theirs:11.1f} {ours / theirs:6.2f}x {cosine:>25}   "
              f"round by round {ratios(times[dtype]['ours'], times[dtype]['theirs'])}")
    if "float32" in rates and "bfloat16" in rates:
        print(f"pegjax bfloat16 / sentence-transformers float32 (its default): "
              f"{rates['bfloat16'][0] / rates['float32'][1]:.2f}x")
    if "float32" in rates:
        lengths = [len(ids) for ids in tokenize(encoders["float32"].tokenizer, texts, args.max_length)]
        flops = encoder_flops(encoders["float32"].model.config, lengths)
        seconds = {"pegjax float32": len(texts) / rates["float32"][0],
                   "sentence-transformers float32": len(texts) / rates["float32"][1]}
        print("\n".join(roofline(flops, seconds, product_peak())))


if __name__ == "__main__":
    main()
