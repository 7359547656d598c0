"""Running lm-evaluation-harness tasks on a run: the names checked first (with the harness's
own registry, and a did-you-mean), each task's data loaded before any scoring, then
`lm_eval.simple_evaluate` on our backend (harness.py). Shared by `magic eval --tasks` and
the evals during training (`eval.tasks`).

Offline use: the harness reads a task's data with the `datasets` library. A task of your
own reads local files (`dataset_path: json` with `data_files`, in a folder given as
--include-path); a catalogue task whose dataset is already in the Hugging Face cache runs
with HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 set, and one that is not fails with the
dataset's name before anything is scored.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Sequence

from lm_eval import evaluator
from lm_eval.tasks import TaskManager
from lm_eval.utils import make_table

from matrixmagic.configs import ConfigError

from . import harness  # noqa: F401  (registers the backend)


def parse_tasks(text: str, field: str = "--tasks") -> list[str]:
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise ConfigError(f"{field} is empty: name lm-eval tasks, e.g. {field} lambada_openai,hellaswag.")
    return names


def check_limit(limit: float | None, field: str = "--limit") -> None:
    if limit is not None and not 0 < limit < float("inf"):
        raise ConfigError(f"{field} {limit:g} is invalid: use a positive number of documents per task (or a "
                          f"fraction below 1), or leave it out for every document.")


def check_fewshot(num_fewshot: int | None, field: str = "--num-fewshot") -> None:
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"{field} {num_fewshot} is invalid: use 0 or more examples before each question.")


def quiet() -> None:
    """The harness logs each task's defaults as warnings ("metric ... aggregation is not
    defined", "Custom kwargs can be passed"): our table and JSON say what ran."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def task_manager(include_path: str | None = None) -> TaskManager:
    if include_path and not os.path.isdir(include_path):
        raise ConfigError(f"--include-path {include_path!r} is not a directory: give the folder that holds "
                          f"your task YAML files.")
    quiet()
    return TaskManager(include_path=include_path)


def check_names(names: Sequence[str], manager: TaskManager, field: str = "--tasks") -> None:
    """Every name a task or group the harness knows, else an error with the nearest names."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(f"{field}: {name!r} is not an lm-eval task.{hint} `magic eval --list-tasks` lists "
                              f"them; a task of your own is a YAML file in a folder given as --include-path.")


def check_data(names: Sequence[str], manager: TaskManager, field: str = "--tasks") -> None:
    """Every task's documents read once now: a missing local file or a dataset not on this
    machine fails here, before the model is loaded (simple_evaluate reads them again)."""
    try:
        manager.load(list(names))
    except FileNotFoundError as err:
        raise ConfigError(f"{field}: a task's data file is missing ({err}). A local task's `data_files` "
                          f"are read relative to the current directory: run from there, or give an "
                          f"absolute path in its YAML.") from None
    except (ConnectionError, OSError) as err:
        raise ConfigError(f"{field}: a task's dataset could not be read ({str(err).splitlines()[0][:300]}). Without "
                          f"network only datasets already in the Hugging Face cache can be read (set "
                          f"HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1), or give a local task with --include-path.") from None


def evaluate(lm, names: Sequence[str], manager: TaskManager, *, limit: float | None = None,
             num_fewshot: int | None = None, log_samples: bool = False) -> dict:
    """The harness's results dict (results, groups, configs, versions, n-shot, ...). Its own
    default seeds, so few-shot examples are the ones any other backend would be shown."""
    quiet()
    return evaluator.simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=limit,
                                     num_fewshot=num_fewshot, log_samples=log_samples, torch_random_seed=None,
                                     bootstrap_iters=0)


def scores(results: dict) -> dict[str, float]:
    """{"task/metric": value} of every numeric metric (stderr left out): what metrics.jsonl and
    TensorBoard get during training."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, kind = key.partition(",")  # "exact_match,strict-match": a filter's own figure
            out[f"{task}/{metric}" if kind in ("", "none") else f"{task}/{metric}/{kind}"] = float(value)
    return out


def table(results: dict) -> str:
    return make_table(results)


def to_json(results: dict) -> str:
    kept = {k: v for k, v in results.items() if k != "samples"}
    return json.dumps(kept, indent=2, default=str)
