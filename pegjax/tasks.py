"""The evaluation tasks: the PEG paper's C-MTEB retrieval tasks and DuReader, or any folder.

A task is named on the command line or in ``config.evals`` as

    T2Retrieval                 a registered task, read from $PEGJAX_EVAL_DATA/<name> (or data_dir)
    path/to/folder[:split]      any BEIR or C-MTEB-layout folder (split defaults to "test")

Registered tasks use their published evaluation split and no instruction by default (PEG's
evaluation adds none). Nothing is downloaded: download a task once, e.g. ``C-MTEB/T2Retrieval``
and ``C-MTEB/T2Retrieval-qrels`` from the Hugging Face hub, into ``<data_dir>/T2Retrieval`` and
``<data_dir>/T2Retrieval-qrels``.
"""

from __future__ import annotations

import dataclasses
import os

from pegjax.data.retrieval import DataError, RetrievalData, load_folder

DATA_ENV = "PEGJAX_EVAL_DATA"


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    split: str
    language: str
    source: str  # where to download it from
    query_instruction: str = ""


_CMTEB = ("T2Retrieval", "MMarcoRetrieval", "DuRetrieval", "CovidRetrieval", "CmedqaRetrieval",
          "EcomRetrieval", "MedicalRetrieval", "VideoRetrieval")

REGISTRY: dict[str, Task] = {
    **{name: Task(name, "dev", "zh", f"huggingface datasets C-MTEB/{name} + C-MTEB/{name}-qrels") for name in _CMTEB},
    "DuReader": Task("DuReader", "dev", "zh", "DuReader-retrieval dev (BEIR layout: corpus.jsonl, queries.jsonl, qrels/dev.tsv)"),
}
CMTEB_RETRIEVAL = _CMTEB


class MissingTask(DataError):
    """A registered task whose data is not on disk; the message says where to put it."""


def resolve(spec: str, data_dir: str | None = None) -> tuple[Task, str]:
    """A task name or ``folder[:split]`` -> (Task, folder)."""
    if spec in REGISTRY:
        task = REGISTRY[spec]
        root = data_dir or os.environ.get(DATA_ENV)
        if not root:
            raise MissingTask(f"{spec}: set ${DATA_ENV} (or --data_dir) to the folder holding {spec}/ ({task.source})")
        folder = os.path.join(root, spec)
        if not os.path.isdir(folder):
            raise MissingTask(f"{spec}: {folder} does not exist; download {task.source} there")
        return task, folder
    folder, _, split = spec.partition(":") if ":" in spec and not os.path.isdir(spec) else (spec, "", "")
    if not os.path.isdir(folder):
        raise MissingTask(f"{spec}: not a registered task ({', '.join(REGISTRY)}) and not a folder")
    name = os.path.basename(os.path.normpath(folder))
    return Task(name, split or "test", "", folder), folder


def load(spec: str, data_dir: str | None = None) -> tuple[Task, RetrievalData]:
    task, folder = resolve(spec, data_dir)
    return task, load_folder(folder, task.split)
