"""Encoding throughput: pegjax vs sentence-transformers on the same texts, batch size, max length.

    python -m bench.encode [--texts 512] [--batch-size 32] [--max-length 256]

Both encode the same real SciFact abstracts (pegjax on one CPU device per core, as its commands run) with the same all-MiniLM-L6-v2 weights; both are
timed warm (after one full pass, so jit compilation is not counted), best of 3. Prints texts/s
for each and the ratio pegjax / sentence-transformers.
"""

import argparse
import os

from bench.common import best_time, cpu_model, minilm_path, scifact_texts
from pegjax.distributed import use_cpu_cores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    use_cpu_cores()
    import jax
    import torch
    from sentence_transformers import SentenceTransformer

    from pegjax.encode import Encoder

    texts = scifact_texts(args.texts)
    path = minilm_path()
    ours = Encoder.from_pretrained(path, dtype=args.dtype)
    reference = SentenceTransformer(path, device="cpu")
    reference.max_seq_length = args.max_length

    ours_s = best_time(lambda: ours.encode(texts, batch_size=args.batch_size, max_length=args.max_length))
    with torch.inference_mode():
        ref_s = best_time(lambda: reference.encode(texts, batch_size=args.batch_size))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; pegjax on {jax.device_count()} CPU devices, "
          f"torch threads {torch.get_num_threads()}")
    print(f"texts={len(texts)} batch_size={args.batch_size} max_length={args.max_length}")
    print(f"pegjax ({args.dtype})          {len(texts) / ours_s:8.1f} texts/s")
    print(f"sentence-transformers    {len(texts) / ref_s:8.1f} texts/s")
    print(f"ratio pegjax/st          {ref_s / ours_s:8.2f}x")


if __name__ == "__main__":
    from pegjax.distributed import restart_with_tuned_malloc

    restart_with_tuned_malloc()
    main()
