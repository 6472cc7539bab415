"""The training cache is a TFDS dataset: tfds reads what pegjax wrote, record for record, as
pegjax's own reader does, and training from ``config.data.tfds_dir`` ends on the same weights as
training from the JSONL."""

import glob
import os

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from pegjax.data import tfds_format, training
from pegjax.data.jsonl import DataError, lines

from test_train import exported, run, tiny_args


def test_tfds_reads_every_record_pegjax_wrote(shared_data, tmp_path):
    """Real FlagEmbedding files with teacher scores and prompts, across several shards."""
    paths = [str(shared_data / "flagembedding_format" / name) for name in ("embedder_msmarco.jsonl", "embedder_nli.jsonl")]
    files, stats = training.build_cache(paths, str(tmp_path), "error", part_lines=4)
    assert len(files) >= 2
    want = [training.parse_line(raw, where) for path in paths for where, raw in lines(path)]
    assert stats["records"] == len(want)
    folder = os.path.dirname(files[0])
    name = os.path.basename(os.path.dirname(folder))
    source = tfds.data_source(name, data_dir=str(tmp_path), split="train")
    got = [tfds_format.from_example(source[i]) for i in range(len(source))]
    assert got == want
    # pegjax's own reader of the records (it parses the protocol buffer itself) agrees with tfds'.
    shards = grain.sources.ArrayRecordDataSource(files)
    assert [tfds_format.Codec().decode(shards[i]) for i in range(len(shards))] == want
    assert any(record["pos_scores"] for record in got) and any(record["prompt"] for record in got)
    info = tfds.builder_from_directory(folder).info
    assert info.splits["train"].num_examples == len(want) and info.name == name


def test_training_from_tfds_dir_equals_training_from_the_jsonl(shared_data, tmp_path):
    train_file = tmp_path / "triples.jsonl"
    with open(shared_data / "stsb_zh_triples" / "bge_finetune_data.jsonl", encoding="utf-8") as src, \
            open(train_file, "w", encoding="utf-8") as dst:
        for line, _ in zip(src, range(40)):
            dst.write(line)
    from_jsonl = tmp_path / "jsonl"
    done = run(tiny_args(shared_data, from_jsonl, train_file, "--config.train.steps=4"))
    assert done.returncode == 0, done.stderr[-3000:]
    (prepared,) = glob.glob(str(from_jsonl / "data_cache" / "pegjax_train_*" / tfds_format.VERSION))
    from_tfds = tmp_path / "tfds"
    done = run(tiny_args(shared_data, from_tfds, "", "--config.train.steps=4", f"--config.data.tfds_dir={prepared}"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not os.path.exists(from_tfds / "data_cache")  # read in place, no cache built
    want, got = exported(from_jsonl), exported(from_tfds)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_folder_that_is_not_a_pegjax_dataset_is_named(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}: not a TFDS dataset folder"):
        tfds_format.shard_paths(str(tmp_path))
