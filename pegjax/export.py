"""Model folders that sentence-transformers, transformers, mteb and text-embeddings-inference load
unchanged.

    python -m pegjax.export --checkpoint=WORKDIR[/STEP] --out=DIR     # a trained model
    python -m pegjax.export --model=DIR --out=DIR [--pooling=cls] [--query_prompt=...]

A folder holds the Hugging Face BERT files (``config.json``, ``model.safetensors``, tokenizer) and
the sentence-transformers files that say how to pool: ``modules.json``, ``1_Pooling/config.json``
(the pooling actually trained: CLS or mean — a CLS model exported as mean-pooled would embed
silently wrong), ``2_Normalize`` when embeddings are normalised, ``sentence_bert_config.json``
(max length) and ``config_sentence_transformers.json`` (query/passage prompts), plus a model card.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from pegjax.models import hf


def _write_json(path: str, body) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save(
    encoder,
    folder: str,
    query_prompt: str | None = None,
    passage_prompt: str | None = None,
    training: Mapping | None = None,
    results: Mapping | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Writes ``encoder`` (a `pegjax.encode.Encoder`) as the whole folder (see the module doc).
    The prompts default to the encoder's own (``encoder.prompts``)."""
    import jax

    config, pooling, normalize = encoder.model.config, encoder.model.pooling, encoder.model.normalize
    if pooling not in ("cls", "mean"):
        raise ValueError(f"pooling={pooling!r}: exportable poolings are 'cls' and 'mean'")
    query_prompt = encoder.prompts.get("query", "") if query_prompt is None else query_prompt
    passage_prompt = encoder.prompts.get("document", "") if passage_prompt is None else passage_prompt
    max_length = encoder.max_length
    hf.save(folder, config, jax.device_get(encoder.params), max_shard_bytes=max_shard_bytes)
    encoder.tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(folder, "2_Normalize"), exist_ok=True)
    _write_json(os.path.join(folder, "modules.json"), modules)
    _write_json(os.path.join(folder, "1_Pooling", "config.json"), {
        "word_embedding_dimension": config.hidden_size,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    })
    _write_json(os.path.join(folder, "sentence_bert_config.json"), {"max_seq_length": max_length, "do_lower_case": False})
    prompts = {name: text for name, text in (("query", query_prompt), ("document", passage_prompt)) if text}
    _write_json(os.path.join(folder, "config_sentence_transformers.json"), {
        "model_type": "SentenceTransformer",
        "prompts": prompts,
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if normalize else "dot",
    })
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(config, pooling, normalize, max_length, prompts, training, results))


def model_card(config, pooling, normalize, max_length, prompts, training, results) -> str:
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, feature-extraction, retrieval, pegjax]",
        "---",
        "",
        "# Text-embedding model trained with pegjax",
        "",
        f"{hf.FAMILIES[config.model_type][0]} encoder, {config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
        f"{pooling.upper()} pooling{', L2-normalised' if normalize else ''}, max length {max_length} tokens.",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "model = SentenceTransformer(\"PATH\")",
        "embeddings = model.encode([\"a query\", \"a passage\"]" + (", prompt_name=\"query\"" if "query" in prompts else "") + ")",
        "```",
        "",
    ]
    if prompts:
        lines += ["Prompts: " + ", ".join(f"{k}: `{v}`" for k, v in prompts.items()), ""]
    if results:
        lines += ["## Evaluation", "", "| eval | metric | value |", "|---|---|---|"]
        for name, values in results.items():
            for metric, value in values.items():
                lines.append(f"| {name} | {metric} | {value:.4f} |")
        lines.append("")
    if training:
        lines += ["## Training configuration", "", "```json", json.dumps(training, indent=2, ensure_ascii=False, default=str), "```", ""]
    return "\n".join(lines)


def main(argv):
    del argv
    from absl import flags

    from pegjax import distributed
    from pegjax.encode import Encoder
    from pegjax.errors import UserError

    distributed.use_cpu_cores()
    FLAGS = flags.FLAGS
    if bool(FLAGS.model) == bool(FLAGS.checkpoint):
        raise UserError("pass exactly one of --model=DIR or --checkpoint=WORKDIR[/STEP]")
    card = {"query_prompt": FLAGS.query_prompt, "passage_prompt": FLAGS.passage_prompt}
    if FLAGS.checkpoint:
        import dataclasses

        from pegjax.checkpoint import restore_model

        config, step, model, params, tokenizer = restore_model(FLAGS.checkpoint)
        model = dataclasses.replace(model, pooling=FLAGS.pooling or model.pooling,
                                    normalize=model.normalize if FLAGS.normalize is None else FLAGS.normalize)
        encoder = Encoder(model, params, tokenizer, config.data.passage_length,
                          prompts={"query": config.data.query_prompt, "document": config.data.passage_prompt})
        card["training"] = dict(config.to_dict(), exported_step=step)
    else:
        encoder = Encoder.from_pretrained(FLAGS.model, pooling=FLAGS.pooling, normalize=FLAGS.normalize)
    save(encoder, FLAGS.out, **card)
    print(f"wrote {FLAGS.out} ({encoder.model.pooling} pooling, normalize={encoder.model.normalize})")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("model", None, "Model folder to export (re-export, e.g. with another pooling).")
    flags.DEFINE_string("checkpoint", None, "Training workdir (its latest checkpoint) or WORKDIR/STEP.")
    flags.DEFINE_string("out", None, "Output folder.", required=True)
    flags.DEFINE_enum("pooling", None, ["cls", "mean"], "Override the pooling (default: the trained one).")
    flags.DEFINE_boolean("normalize", None, "Override normalisation (default: the trained one).")
    flags.DEFINE_string("query_prompt", None, "Prompt prepended to queries (default: the model's, or "
                        "config.data.query_prompt of the checkpoint).")
    flags.DEFINE_string("passage_prompt", None, "Prompt prepended to passages (default: the model's, or "
                        "config.data.passage_prompt of the checkpoint).")
    from pegjax.errors import guarded

    app.run(guarded(main))
