"""Training metrics to TensorBoard event files and a JSONL file in the workdir (process 0 only).

TensorBoard events are written with tensorboard's own writer and protos (no TensorFlow).
"""

from __future__ import annotations

import json
import os
import time


class MetricLog:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        os.makedirs(workdir, exist_ok=True)
        self.events = EventFileWriter(os.path.join(workdir, "tensorboard"))
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = {k: float(v) for k, v in metrics.items()}
        self.events.add_event(Event(
            wall_time=time.time(), step=step,
            summary=Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()]),
        ))
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        self.events.flush()

    def close(self) -> None:
        if self.enabled:
            self.events.close()
            self.jsonl.close()
