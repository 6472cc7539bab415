"""Encoding throughput: pegjax vs sentence-transformers on the same texts, batch size, max length.

    python -m bench.encode [--texts 512] [--batch-size 32] [--max-length 256] [--dtypes float32,bfloat16]

Both encode the same real SciFact abstracts (pegjax on one CPU device per core, as its commands
run) with the same all-MiniLM-L6-v2 weights, in each compute dtype: float32, and bfloat16
(pegjax: bf16 products accumulated in float32, LayerNorm and softmax in float32;
sentence-transformers: the model cast to torch.bfloat16). Each is timed warm (after one full pass,
so jit compilation is not counted), best of 3. Prints texts/s for each, the ratio pegjax /
sentence-transformers in the same dtype, the ratio of pegjax bfloat16 against
sentence-transformers' default float32, and how far each pegjax embedding is from
sentence-transformers' float32 one (the lowest cosine over the texts).
"""

import argparse
import os

import numpy as np

from bench.common import best_time, cpu_model, minilm_path, scifact_texts
from pegjax.distributed import use_cpu_cores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    use_cpu_cores()
    import jax
    import torch
    from sentence_transformers import SentenceTransformer

    from pegjax.encode import Encoder

    texts = scifact_texts(args.texts)
    path = minilm_path()
    rates, embeddings = {}, {}
    for dtype in args.dtypes.split(","):
        ours = Encoder.from_pretrained(path, dtype=dtype)
        reference = SentenceTransformer(path, device="cpu", model_kwargs={"torch_dtype": getattr(torch, dtype)})
        reference.max_seq_length = args.max_length
        out = {}
        ours_s = best_time(lambda: out.update(ours=ours.encode(texts, batch_size=args.batch_size, max_length=args.max_length)))
        with torch.inference_mode():
            ref_s = best_time(lambda: out.update(st=reference.encode(texts, batch_size=args.batch_size)))
        rates[dtype] = (len(texts) / ours_s, len(texts) / ref_s)
        embeddings[dtype] = out
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; pegjax on {jax.device_count()} CPU devices, "
          f"torch threads {torch.get_num_threads()}")
    print(f"texts={len(texts)} batch_size={args.batch_size} max_length={args.max_length}")
    print(f"{'dtype':10} {'pegjax texts/s':>15} {'st texts/s':>11} {'ratio':>7} {'min cosine to st float32':>25}")
    truth = embeddings.get("float32", {}).get("st")
    for dtype, (ours, theirs) in rates.items():
        cosine = "" if truth is None else f"{(embeddings[dtype]['ours'] * truth).sum(axis=1).min():.5f}"
        print(f"{dtype:10} {ours:15.1f} {theirs:11.1f} {ours / theirs:6.2f}x {cosine:>25}")
    if "float32" in rates and "bfloat16" in rates:
        print(f"pegjax bfloat16 / sentence-transformers float32 (its default): "
              f"{rates['bfloat16'][0] / rates['float32'][1]:.2f}x")


if __name__ == "__main__":
    from pegjax.distributed import restart_with_tuned_malloc

    restart_with_tuned_malloc()
    main()
