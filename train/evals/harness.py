"""The lm-evaluation-harness backend `matrixmagic`, in process (the `eval` extra).

Importing this module registers `MatrixMagicLM` under the name `matrixmagic`, so
`lm_eval.simple_evaluate(model="matrixmagic", model_args="workdir=RUN")`, `magic eval`
and `magic lm-eval --model matrixmagic ...` (the harness's own command line; lm_eval
0.4 has no plugin hook, so its `lm_eval` command cannot find a backend it did not ship)
all score through it. model_args: `workdir=RUN` (a trained or imported run), or
`preset=NAME` (random weights) with `set=field=value;field=value`; `bos=true|false`
(default: the run's convention, data/tokenizers.prompt_start); `max_gen_toks` (256).

The three request types:

* `loglikelihood`: the harness's TemplateLM splits context and continuation and calls
  `tok_encode`, which puts the prompt's start ids before a context (none for an imported
  GPT-2, as the harness's `hf` backend does; end-of-text for our own runs, which start
  every training document with it); then evals/scoring.Scorer, batched and bucketed.
* `loglikelihood_rolling`: the text's tokens in disjoint windows of max_len
  (scoring.rolling_windows with stride = max_len, the harness's rule), summed.
* `generate_until`: our KV-cache sampler (model/generate.py), greedy unless the task
  asks for sampling; the context is cut on the left to max_len - max_gen_toks; the text is
  cut at the first stop sequence (the model's end-of-text is one). Generation runs to
  max_gen_toks or end-of-text, not to the first stop string: the same text, more tokens.

Decoder-only and encoder-decoder runs (the harness's "seq2seq" split: the encoder reads
the context, the decoder is scored on the continuation from its start token, as our
encoder-decoder trains; generation greedy). BERT has no left-to-right likelihood and no
generation (a pseudo-likelihood would score something else): refused with a message.
"""

from __future__ import annotations

import collections
import json

import jax
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from matrixmagic.model.generate import Sampling, generate, translate

from ..data.tokenizers import prompt_start, text_start
from ..reading import open_model
from .scoring import Scorer, bucket_length, check_scorable, rolling_windows

NAME = "matrixmagic"


def _flag(value) -> bool | None:
    """model_args values arrive as strings or as the harness's parsed bools."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    if text in ("", "auto", "none"):
        return None
    raise ValueError(f"bos={value!r} is invalid: use true, false, or leave it out (the run decides).")


def _batch_size(value) -> int:
    if value in (None, "auto"):
        return 16
    try:
        size = int(str(value).split(":")[0])
    except ValueError:
        raise ValueError(f"batch_size={value!r} is invalid: use a positive number of rows, e.g. 16.") from None
    if size < 1:
        raise ValueError(f"batch_size={value!r} is invalid: use a positive number of rows, e.g. 16.")
    return size


@register_model(NAME)
class MatrixMagicLM(TemplateLM):
    """A matrixmagic run as an lm-eval LM."""

    def __init__(self, workdir: str | None = None, preset: str | None = None, set: str | None = None,
                 batch_size=16, bos=None, max_gen_toks: int = 256, seed: int = 0, **_harness):
        super().__init__()
        if not workdir and not preset:
            raise ValueError("model_args needs workdir=RUN (a trained or imported run) or preset=NAME "
                             "(random weights), e.g. --model_args workdir=runs/gpt-tiny-65182f.")
        sets = [s for s in str(set or "").split(";") if s.strip()]
        rows, start, new = _batch_size(batch_size), _flag(bos), int(max_gen_toks)  # checked before any load
        if new < 1:
            raise ValueError(f"max_gen_toks={max_gen_toks} is invalid: use a positive count, e.g. 256.")
        config, tokenizer, load, self.origin = open_model(preset, workdir, sets)
        self._setup(config, load(int(seed)), tokenizer, rows, start, new, int(seed))

    @classmethod
    def from_loaded(cls, config, params, tokenizer, *, batch_size: int = 16, bos: bool | None = None,
                    max_gen_toks: int = 256, seed: int = 0, origin: str = "a run in memory") -> "MatrixMagicLM":
        """Weights already in memory (evals during training): nothing is read from disk."""
        self = cls.__new__(cls)
        TemplateLM.__init__(self)
        self.origin = origin
        self._setup(config, params, tokenizer, batch_size, bos, max_gen_toks, seed)
        return self

    def _setup(self, config, params, tokenizer, batch_size: int, bos: bool | None, max_gen_toks: int,
               seed: int) -> None:
        check_scorable(config, "the lm-eval harness")
        if max_gen_toks < 1:
            raise ValueError(f"max_gen_toks={max_gen_toks} is invalid: use a positive count, e.g. 256.")
        self.config, self.vocab = config, tokenizer
        self.scorer = Scorer(config, params, batch_size, bos_id=tokenizer.bos_id)
        self.backend = "seq2seq" if self.scorer.seq2seq else "causal"  # how TemplateLM splits a request
        self.params = self.scorer.params
        self.batch_size, self.bos, self.max_gen_toks, self.seed = batch_size, bos, max_gen_toks, seed
        self.prefix = prompt_start(tokenizer, bos)
        self.start = text_start(tokenizer, bos)  # what a text with no context follows

    def use_params(self, params) -> None:
        """Score with these weights from now on (evals during training: same shapes, so the
        compiled programs are reused)."""
        self.scorer.use_params(params)
        self.params = self.scorer.params

    # ------------------------------------------------------------------ the harness's hooks

    @property
    def eot_token_id(self) -> int:
        return self.vocab.eot_id

    @property
    def prefix_token_id(self) -> int:
        return self.start[-1]

    @property
    def max_length(self) -> int:
        return self.config.max_len

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.vocab, "cache_key", type(self.vocab).__name__)

    def get_model_info(self) -> dict:
        return {"model": NAME, "origin": self.origin, "prompt_start": list(self.prefix),
                "max_length": self.max_length}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """A context's ids: the prompt's start ids, then the text's (add_special_tokens=False:
        the text's alone, as the harness asks for a continuation after an empty context)."""
        ids = [int(i) for i in self.vocab.encode(string)]
        return ids if add_special_tokens is False else [*self.prefix, *ids]

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.vocab.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        with tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood") as bar:
            out = self.scorer.score([(ctx, cont) for _, ctx, cont in requests], progress=bar.update)
        for (key, _, _), answer in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            parts = rolling_windows(tokens, self.start, self.max_length) if tokens else []
            windows += parts
            owner += [k] * len(parts)
        with tqdm(total=len(windows), disable=disable_tqdm, desc="loglikelihood_rolling") as bar:
            scores = self.scorer.score(windows, progress=bar.update)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, scores):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = collections.defaultdict(list)  # requests with the same generation settings run together
        for k, req in enumerate(requests):
            context, kwargs = req.args
            groups[json.dumps(kwargs, sort_keys=True, default=str)].append((k, context, kwargs))
        out = [""] * len(requests)
        eos = self.vocab.decode([self.eot_token_id])
        with tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until") as bar:
            for members in groups.values():
                kwargs = normalize_gen_kwargs(dict(members[0][2]), self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                texts = self._generate([c for _, c, _ in members], kwargs, until)
                for (k, context, raw), text in zip(members, texts):
                    out[k] = text
                    self.cache_hook.add_partial("generate_until", (context, raw), text)
                bar.update(len(members))
        return out

    def _generate(self, contexts: list[str], kwargs: dict, until: list[str]) -> list[str]:
        max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        if max_new >= self.max_length:
            raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in the model's {self.max_length} "
                             f"positions (model.max_len): ask for fewer tokens.")
        sampling = Sampling(float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                            int(kwargs.get("top_k", 0) or 0), float(kwargs.get("top_p", 1.0) or 1.0))
        if self.scorer.seq2seq:
            return self._translate(contexts, max_new, until)
        prompts = [self.tok_encode(c)[-(self.max_length - max_new):] for c in contexts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        texts = [""] * len(prompts)
        model = self.scorer.model
        room = self.max_length - max_new  # the longest prompt that leaves max_new positions
        for start in range(0, len(order), self.batch_size):
            chosen = order[start:start + self.batch_size]
            batch = [prompts[i] if prompts[i] else list(self.start) for i in chosen]
            batch += [batch[-1]] * (self.batch_size - len(batch))  # full batches: one shape per width
            done = generate(model, self.params, batch, max_new_tokens=max_new, eot_id=self.eot_token_id,
                            sampling=sampling, rng=jax.random.fold_in(jax.random.key(self.seed), start),
                            width=bucket_length(len(batch[0]), room))
            for i, row in zip(chosen, done.rows()):
                texts[i] = postprocess_generated_text(self.vocab.decode(row), until, None)
        return texts

    def _translate(self, contexts: list[str], max_new: int, until: list[str]) -> list[str]:
        """Encoder-decoder: the encoder reads the context (cut on the left to max_len), the decoder
        writes greedily from its start token (sampling is not offered for this family)."""
        sources = [self.tok_encode(c)[-self.max_length:] or list(self.start) for c in contexts]
        texts = []
        for start in range(0, len(sources), self.batch_size):
            done = translate(self.scorer.model, self.params, sources[start:start + self.batch_size],
                             bos_id=self.vocab.bos_id, eot_id=self.eot_token_id, max_new_tokens=max_new)
            texts += [postprocess_generated_text(self.vocab.decode(row), until, None) for row in done.rows()]
        return texts
