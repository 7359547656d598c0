"""Evals during training (`eval.tasks`, `eval.text`): lm-eval tasks and perplexity on text
files, at eval steps, written to metrics.jsonl (split "evals") and TensorBoard.

Everything a user can get wrong (a task name, a task's data, a text path, the `eval` extra
not installed) is checked when the run starts, before the first step. The scorer is built
once and handed each eval's weights, so every eval after the first reuses its compiled
programs. The prompt convention is the run's (end-of-text first: data/tokenizers.prompt_start),
as `magic eval` uses it on the finished run.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.experimental import multihost_utils

from matrixmagic.configs.train_config import TrainConfig

from ..data.tokenizers import text_start
from ..run import reading_model
from .perplexity import perplexity, read_text, text_files
from .scoring import Scorer

if TYPE_CHECKING:  # harness.py imports lm-eval, the optional `eval` extra: only _tasks_module() loads it
    from .harness import MatrixMagicLM


def due(config: TrainConfig, done: int) -> bool:
    """eval.every steps apart (0: every eval_every), and at the last step."""
    return config.eval.active and (done % (config.eval.every or config.eval_every) == 0 or done == config.steps)


def _tasks_module():
    """train/evals/tasks.py, imported only when eval.tasks is set: it needs the optional `eval`
    extra (lm-eval, which also takes seconds to import), so a run without tasks never loads it."""
    try:
        tasks = importlib.import_module(f"{__package__}.tasks")
    except ImportError as err:
        raise ValueError(f"eval.tasks needs the lm-evaluation-harness ({err.name} is not installed): pip install "
                         f"'matrixmagic[eval]', or leave eval.tasks empty.") from None
    return tasks


class TrainingEvals:
    def __init__(self, config: TrainConfig, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.spec = config.eval
        self.model = reading_model(config.model)
        self.texts = []
        if self.spec.text:
            self.texts = [read_text(f) for f in text_files(self.spec.text)]  # a bad path fails before step 1
        self.names: list[str] = []
        self.manager = None
        # Built at the first eval, then handed each eval's weights.
        self._lm: MatrixMagicLM | None = None
        self._scorer: Scorer | None = None
        if self.spec.tasks:
            tasks = _tasks_module()
            self.names = tasks.parse_tasks(self.spec.tasks, "eval.tasks")
            self.manager = tasks.task_manager(self.spec.include_path or None)
            tasks.check_names(self.names, self.manager, "eval.tasks")
            tasks.check_data(self.names, self.manager, "eval.tasks")

    def due(self, done: int) -> bool:
        return due(self.config, done)

    def run(self, params) -> dict[str, float]:
        """{"text/bits_per_byte": ..., "hellaswag/acc": ...} for these weights (on the host)."""
        out = {}
        if self.texts:
            if self._scorer is None:
                self._scorer = Scorer(self.model, params, self.spec.batch_size, bos_id=self.tokenizer.bos_id)
            self._scorer.use_params(params)
            start = text_start(self.tokenizer)
            result = perplexity(self._scorer, self.tokenizer, self.texts, start)
            out.update({"text/nats_per_token": result.nats_per_token, "text/perplexity": result.perplexity,
                        "text/bits_per_byte": result.bits_per_byte})
        if self.names:
            tasks = _tasks_module()
            if self._lm is None:
                self._lm = tasks.harness.MatrixMagicLM.from_loaded(self.model, params, self.tokenizer,
                                                     batch_size=self.spec.batch_size, origin="the run being trained")
            self._lm.use_params(params)
            results = tasks.evaluate(self._lm, self.names, self.manager, limit=self.spec.limit or None,
                                     num_fewshot=None if self.spec.num_fewshot < 0 else self.spec.num_fewshot)
            out.update(tasks.scores(results))
        return out

    def run_logged(self, params, step: int, write) -> dict[str, float]:
        """run(), printed on one line; a failure is a warning, not the end of training (the step
        is already saved): {} then, and the next eval tries again."""
        try:
            scores = self.run(params)
        except Exception as err:  # noqa: BLE001 - a task that only fails when scored (too long a generation, memory)
            write(f"warning: step {step}: eval.tasks/eval.text failed, training goes on: {type(err).__name__}: "
                  f"{str(err)[:300]}")
            return {}
        write(f"step {step}: evals " + "  ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        return scores


def open_training_evals(config: TrainConfig, tokenizer, is_main: bool) -> TrainingEvals | _Schedule | None:
    """The evals, checked before the first step. Process 0 checks (task names, data, text paths)
    and scores; the others only learn whether the checks passed, so a bad eval.* stops every
    process instead of leaving them waiting in a collective."""
    if not config.eval.active:
        return None
    evals, failure = None, None
    if is_main:
        try:
            evals = TrainingEvals(config, tokenizer)
        except (ValueError, FileNotFoundError) as err:
            failure = err
    if jax.process_count() > 1:
        passed = multihost_utils.broadcast_one_to_all(np.int32(failure is None))
        if not int(passed) and failure is None:
            raise ValueError("eval.tasks / eval.text failed their checks on process 0: its log says why.")
    if failure is not None:
        raise failure
    return evals if is_main else _Schedule(config)


class _Schedule:
    """What a process other than 0 needs: when the evals are due (it joins their gather)."""

    def __init__(self, config: TrainConfig):
        self.config = config

    def due(self, done: int) -> bool:
        return due(self.config, done)
