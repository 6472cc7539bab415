"""Hugging Face folders <-> pegjax parameters.

Reads ``config.json`` + ``model.safetensors`` (or shards listed by
``model.safetensors.index.json``) of the BERT family — ``model_type`` ``bert``, ``roberta`` or
``xlm-roberta``, plain ``BertModel`` / ``RobertaModel`` names or names under a ``bert.`` /
``roberta.`` prefix, or a sentence-transformers folder whose ``modules.json`` /
``1_Pooling/config.json`` give the pooling — into the parameter tree of
`pegjax.models.bert.BertEncoder`, and writes that tree back in the same layout and family. The
families share one architecture; RoBERTa and XLM-R only number their positions from
``pad_token_id + 1`` (`BertConfig.position_offset`). Every tensor is checked by name and shape
before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np

from pegjax.errors import UserError
from pegjax.models.bert import BertConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# Tensors a BERT checkpoint may carry that an embedding model does not use: the pooler (a
# classification head) and the pre-training heads. Ignored with a log line, never an error.
IGNORED_PREFIXES = ("pooler.", "cls.", "lm_head.", "embeddings.position_ids")

# model_type -> (the transformers class that reads the exported folder, the prefix of its weights
# inside a task model such as *ForMaskedLM).
FAMILIES = {
    "bert": ("BertModel", "bert."),
    "roberta": ("RobertaModel", "roberta."),
    "xlm-roberta": ("XLMRobertaModel", "roberta."),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

_REQUIRED_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


class CheckpointError(UserError, ValueError):
    """A model folder that cannot be read as a BERT-family checkpoint; the message says why."""


def read_config(folder: str) -> BertConfig:
    """``folder/config.json`` -> BertConfig; names the missing key when one is absent."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no config.json; a Hugging Face model folder needs one")
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    model_type = raw.get("model_type", "bert")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path}: model_type={model_type!r} is not supported; pegjax reads {', '.join(SUPPORTED_MODEL_TYPES)} "
            "folders (a folder of another family would load with the wrong positions or layers)")
    missing = [k for k in _REQUIRED_CONFIG_KEYS if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: missing required key(s) {', '.join(missing)}")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(
            f"{path}: position_embedding_type={raw['position_embedding_type']!r} is not supported "
            "(only 'absolute')"
        )
    fields = {f.name for f in dataclasses.fields(BertConfig)}
    return BertConfig(**{k: v for k, v in raw.items() if k in fields})


def write_config(config: BertConfig, folder: str) -> None:
    body = dataclasses.asdict(config)
    body.update(architectures=[FAMILIES[config.model_type][0]], position_embedding_type="absolute")
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(body, f, indent=2, sort_keys=True)
        f.write("\n")


def read_pooling(folder: str) -> tuple[str | None, bool | None]:
    """Pooling mode and normalisation declared by a sentence-transformers folder.

    Returns (pooling, normalize), each None when the folder does not say.
    """
    modules_path = os.path.join(folder, "modules.json")
    if not os.path.isfile(modules_path):
        return None, None
    with open(modules_path, encoding="utf-8") as f:
        modules = json.load(f)
    pooling, normalize = None, False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("models.Pooling"):
            cfg_path = os.path.join(folder, module.get("path", ""), "config.json")
            with open(cfg_path, encoding="utf-8") as f:
                pool_cfg = json.load(f)
            modes = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode_") and v]
            mode_names = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}
            if len(modes) != 1 or modes[0] not in mode_names:
                raise CheckpointError(
                    f"{cfg_path}: pooling {modes or 'none'} is not supported; pegjax pools by "
                    "exactly one of pooling_mode_cls_token, pooling_mode_mean_tokens"
                )
            pooling = mode_names[modes[0]]
        elif kind.endswith("models.Normalize"):
            normalize = True
    return pooling, normalize


def _expected_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape, for a BertModel of this config."""
    e, m = config.hidden_size, config.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (config.vocab_size, e),
        "embeddings.position_embeddings.weight": (config.max_position_embeddings, e),
        "embeddings.token_type_embeddings.weight": (config.type_vocab_size, e),
        "embeddings.LayerNorm.weight": (e,),
        "embeddings.LayerNorm.bias": (e,),
    }
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes[p + f"attention.self.{name}.weight"] = (e, e)
            shapes[p + f"attention.self.{name}.bias"] = (e,)
        shapes.update(
            {
                p + "attention.output.dense.weight": (e, e),
                p + "attention.output.dense.bias": (e,),
                p + "attention.output.LayerNorm.weight": (e,),
                p + "attention.output.LayerNorm.bias": (e,),
                p + "intermediate.dense.weight": (m, e),
                p + "intermediate.dense.bias": (m,),
                p + "output.dense.weight": (e, m),
                p + "output.dense.bias": (e,),
                p + "output.LayerNorm.weight": (e,),
                p + "output.LayerNorm.bias": (e,),
            }
        )
    return shapes


def _canonical_name(name: str, family_prefix: str) -> str:
    """Strips the family's prefix (``bert.``, ``roberta.``) and maps old LayerNorm names
    (gamma/beta) to weight/bias."""
    if name.startswith(family_prefix):
        name = name[len(family_prefix) :]
    if name.endswith("LayerNorm.gamma"):
        name = name[: -len("gamma")] + "weight"
    elif name.endswith("LayerNorm.beta"):
        name = name[: -len("beta")] + "bias"
    return name


def hf_to_params(tensors: dict[str, np.ndarray], config: BertConfig, source: str) -> dict:
    """Hugging Face BertModel tensors -> pegjax param tree (numpy float32)."""
    canonical = {_canonical_name(k, FAMILIES[config.model_type][1]): v for k, v in tensors.items()}
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(canonical))
    extra = sorted(
        k for k in set(canonical) - set(expected) if not k.startswith(IGNORED_PREFIXES)
    )
    wrong = sorted(
        f"{k}: file has {tuple(canonical[k].shape)}, config.json implies {expected[k]}"
        for k in set(expected) & set(canonical)
        if tuple(canonical[k].shape) != expected[k]
    )
    if missing or extra or wrong:
        lines = [f"{source}: the tensors do not match a {FAMILIES[config.model_type][0]} of its config.json"]
        for title, items in (("missing", missing), ("unexpected", extra), ("mis-shaped", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:20]))
                if len(items) > 20:
                    lines.append(f"    ... and {len(items) - 20} more")
        raise CheckpointError("\n".join(lines))
    ignored = sorted(k for k in canonical if k.startswith(IGNORED_PREFIXES))
    if ignored:
        logging.info("%s: ignoring %d head tensor(s) (pooler/MLM): %s", source, len(ignored), ignored[:4])

    h, k = config.num_attention_heads, config.head_dim
    f32 = lambda name: np.asarray(canonical[name], dtype=np.float32)  # noqa: E731
    layer_norm = lambda prefix: {"scale": f32(prefix + ".weight"), "bias": f32(prefix + ".bias")}  # noqa: E731
    params: dict[str, Any] = {
        "embeddings": {
            "word_embeddings": {"embedding": f32("embeddings.word_embeddings.weight")},
            "position_embeddings": {"embedding": f32("embeddings.position_embeddings.weight")},
            "token_type_embeddings": {"embedding": f32("embeddings.token_type_embeddings.weight")},
            "layer_norm": layer_norm("embeddings.LayerNorm"),
        }
    }
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        attention = {
            name: {
                # torch Linear stores [out, in]; ours is [in, heads, kv].
                "kernel": f32(p + f"attention.self.{name}.weight").T.reshape(-1, h, k),
                "bias": f32(p + f"attention.self.{name}.bias").reshape(h, k),
            }
            for name in ("query", "key", "value")
        }
        attention["output"] = {
            "kernel": f32(p + "attention.output.dense.weight").T.reshape(h, k, -1),
            "bias": f32(p + "attention.output.dense.bias"),
        }
        layers.append({
            "attention": attention,
            "attention_norm": layer_norm(p + "attention.output.LayerNorm"),
            "intermediate": {
                "kernel": f32(p + "intermediate.dense.weight").T,
                "bias": f32(p + "intermediate.dense.bias"),
            },
            "output": {
                "kernel": f32(p + "output.dense.weight").T,
                "bias": f32(p + "output.dense.bias"),
            },
            "output_norm": layer_norm(p + "output.LayerNorm"),
        })
    # The encoder scans its layers: every layer parameter is stacked on a leading layer axis.
    params["layers"] = jax.tree.map(lambda *per_layer: np.stack(per_layer), *layers)
    return params


def params_to_hf(params: dict, config: BertConfig) -> dict[str, np.ndarray]:
    """pegjax param tree -> Hugging Face BertModel tensors (float32, contiguous)."""
    get = lambda tree, *path: np.asarray(_dig(tree, path), dtype=np.float32)  # noqa: E731
    emb = params["embeddings"]
    out = {
        "embeddings.word_embeddings.weight": get(emb, "word_embeddings", "embedding"),
        "embeddings.position_embeddings.weight": get(emb, "position_embeddings", "embedding"),
        "embeddings.token_type_embeddings.weight": get(emb, "token_type_embeddings", "embedding"),
        "embeddings.LayerNorm.weight": get(emb, "layer_norm", "scale"),
        "embeddings.LayerNorm.bias": get(emb, "layer_norm", "bias"),
    }
    e = config.hidden_size
    for i in range(config.num_hidden_layers):
        layer = jax.tree.map(lambda stacked: stacked[i], params["layers"])  # noqa: B023
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            out[p + f"attention.self.{name}.weight"] = get(layer, "attention", name, "kernel").reshape(e, e).T
            out[p + f"attention.self.{name}.bias"] = get(layer, "attention", name, "bias").reshape(e)
        out[p + "attention.output.dense.weight"] = get(layer, "attention", "output", "kernel").reshape(e, e).T
        out[p + "attention.output.dense.bias"] = get(layer, "attention", "output", "bias")
        out[p + "attention.output.LayerNorm.weight"] = get(layer, "attention_norm", "scale")
        out[p + "attention.output.LayerNorm.bias"] = get(layer, "attention_norm", "bias")
        out[p + "intermediate.dense.weight"] = get(layer, "intermediate", "kernel").T
        out[p + "intermediate.dense.bias"] = get(layer, "intermediate", "bias")
        out[p + "output.dense.weight"] = get(layer, "output", "kernel").T
        out[p + "output.dense.bias"] = get(layer, "output", "bias")
        out[p + "output.LayerNorm.weight"] = get(layer, "output_norm", "scale")
        out[p + "output.LayerNorm.bias"] = get(layer, "output_norm", "bias")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _dig(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: listed in {INDEX_NAME} but missing; download the folder again")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: cannot read the safetensors file ({err}); it is truncated or not a "
            "safetensors file: download or export it again"
        ) from None


def read_tensors(folder: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of ``folder/model.safetensors`` (or of the shards its
    ``model.safetensors.index.json`` lists) as numpy arrays.

    A folder with only ``pytorch_model.bin`` is refused (pickle runs code on load) unless
    ``allow_pickle``; then torch reads it.
    """
    path = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(path):
        return _read_safetensors(path)
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index_path}: not a safetensors index (no weight_map: {err})") from None
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_read_safetensors(os.path.join(folder, shard)))
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{index_path}: {len(absent)} listed tensor(s) are in no shard: {absent[:5]}")
        return tensors
    pickles = [n for n in PICKLE_NAMES if os.path.isfile(os.path.join(folder, n))]
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{folder}: has only {pickles[0]} (a pickle, which can run code when loaded). Convert "
            "it once with: python -c \"from transformers import AutoModel; "
            f"AutoModel.from_pretrained('{folder}').save_pretrained('{folder}', "
            "safe_serialization=True)\"  -- or pass allow_pickle=True if you trust the file."
        )
    if pickles:
        import torch  # only on explicit opt-in; pegjax does not depend on torch

        state = torch.load(os.path.join(folder, PICKLE_NAMES[0]), map_location="cpu")
        return {k: v.float().numpy() for k, v in state.items()}
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} (or {INDEX_NAME}); a Hugging Face model folder needs one")


def load(folder: str, allow_pickle: bool = False) -> tuple[BertConfig, dict]:
    """A Hugging Face BERT-family folder -> (config, params as numpy float32)."""
    config = read_config(folder)
    tensors = read_tensors(folder, allow_pickle=allow_pickle)
    return config, hf_to_params(tensors, config, source=folder)


def save(folder: str, config: BertConfig, params: dict, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (the family's names) into ``folder``; a
    model above ``max_shard_bytes`` is written as ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json``, as transformers writes it."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    write_config(config, folder)
    tensors = params_to_hf(params, config)
    shards, size = [{}], 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    for stale in (WEIGHTS_NAME, INDEX_NAME):
        if os.path.exists(os.path.join(folder, stale)):
            os.remove(os.path.join(folder, stale))
    if len(shards) == 1:
        save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({tensor: name for tensor in shard})
    with open(os.path.join(folder, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map},
                  f, indent=2, sort_keys=True)
        f.write("\n")
