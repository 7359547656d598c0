"""The Python API: `import_hf(source_dir, workdir)` and `export_hf(workdir, out_dir)`.

An imported run directory is an ordinary run at step 0: its checkpoint holds the
params (no optimizer state: nothing trained them here yet), the resolved TrainConfig
(model translated from config.json, data.tokenizer = the run's own tokenizer.json) and
the tokenizer files. `magic generate`, `magic explain` and `magic train --init-from RUN`
read it as they read any run; resuming it in place is refused (there is no optimizer
state to resume), with the --init-from command to use instead.

Both directions check everything cheap first (config, tensor names and shapes from the
safetensors headers, the tokenizer, the target directory), then write all or nothing
(train/hf/staging.py: a temporary sibling renamed into place on a local disk; on Cloud
Storage, which has no rename, the target itself with the part that makes it usable
written last): a failed import or export leaves nothing behind.

Every directory may be a local path or a `gs://` URL (train/storage.py); any other scheme
is refused naming its flag before any work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
from typing import Optional, Sequence

import jax
from flax import linen as nn

from matrixmagic.configs import PRESETS, ModelConfig
from matrixmagic.configs.model_config import DTYPES
from matrixmagic.configs.train_config import mesh_assignments
from matrixmagic.model.build import abstract_variables
from matrixmagic.sharding.mesh import make_mesh
from matrixmagic.sharding.partition import param_shardings, with_shardings
from matrixmagic.sharding.rules import rules_for
from matrixmagic.sharding.validate import validate_mesh

from .. import storage
from ..checkpoint import Checkpointer, load_params, saved_run_config
from ..data.tokenizers import HFTokenizer, round_up
from ..run import VOCAB_MULTIPLE, model_assignments, resolve_config, run_tokenizer
from ..rundir import COMMAND_FILE, CONFIG_FILE, record_start
from .checkpoint import export_tensors, place_params, plan_import
from .config import ARCHITECTURES, export_type, exportable, hf_config_from_model, model_config_from_hf
from .errors import HFError
from .staging import check_fresh, staged
from .tensorfile import read_checkpoint, write_checkpoint
from .tokenizer import check_vocabulary, copy_tokenizer, find_tokenizer, write_tokenizer

# recipe of a shape no preset has
DEFAULT_PRESET = {"gpt2": "gpt2", "bert": "bert-base", "llama": "llama3-8b", "mistral": "llama3-8b"}
SHAPE_FIELDS = ("family", "d_model", "num_heads", "num_kv_heads", "num_layers", "d_ff", "max_len", "positional",
                "norm", "activation")


@dataclasses.dataclass(frozen=True)
class Report:
    """What an import or export did: printed by the CLI, returned by the API."""

    path: str
    model_type: str
    architecture: str
    parameters: int
    seconds: float
    files: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def summary(self, verb: str) -> str:
        lines = [(f"{verb} {self.model_type} ({self.architecture}, {self.parameters:,} parameters) -> {self.path} "
                  f"in {self.seconds:.1f} s: {', '.join(self.files)}")]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _load_json(path: str) -> dict:
    """A JSON object (every Hugging Face config file is one); HFError for anything else."""
    try:
        value = json.loads(storage.read_text(path))
    except ValueError as err:
        raise HFError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        raise HFError(f"{path} holds {kind}, not a JSON object of settings "
                      f"({{\"model_type\": ...}}): give the config.json that save_pretrained wrote.")
    return value


def _source(path: str, field: str) -> str:
    """A model directory to read: normalized, its bucket checked, and there."""
    path = storage.normalize(path, field)
    storage.check_bucket(path, field)
    if not storage.is_dir(path):
        raise HFError(f"{path} is not a directory: give the folder of a Hugging Face model (config.json, "
                      f"model.safetensors, tokenizer files), as save_pretrained writes it.")
    return path


def preset_for(model_type: str, model: ModelConfig) -> str:
    """The preset with this shape (gpt2 ... gpt2-xl, bert-base, bert-large), else the family's
    first: the run's name in logs and its recipe's defaults for fine-tuning."""
    for name, preset in PRESETS.items():
        if all(getattr(preset.model, f) == getattr(model, f) for f in SHAPE_FIELDS):
            return name
    return DEFAULT_PRESET[model_type]


def _count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- import


def import_hf(source: str, workdir: str, *, tokenizer: Optional[str] = None, param_dtype: str = "float32",
              mesh: str = "fsdp=-1", seed: int = 0, argv: Optional[Sequence[str]] = None) -> Report:
    """A Hugging Face model directory (config.json, model.safetensors or a sharded index, the
    tokenizer files) -> a run directory at `workdir`. `tokenizer`: another directory to take
    the tokenizer files from. `mesh`: how the params are sharded while they are placed (as
    `magic train --mesh`; by default split over every device). `seed` initializes heads the
    checkpoint lacks (BertForMaskedLM's pooler). `argv`: the command line RUN/command.txt
    records (default: this process's, as `magic train` records its own)."""
    start = time.perf_counter()
    workdir = storage.normalize(workdir, "--workdir")
    source = _source(source, "source")
    tokenizer = _source(tokenizer, "--tokenizer") if tokenizer else None
    config_path = storage.join(source, "config.json")
    if not storage.path(config_path).is_file():
        raise HFError(f"{source} has no config.json, so it is not a Hugging Face model directory; give the folder "
                      f"save_pretrained (or a hub download) wrote.")
    if param_dtype not in DTYPES:
        raise HFError(f"param_dtype={param_dtype!r} is invalid: use one of {', '.join(DTYPES)}.")
    translation = model_config_from_hf(_load_json(config_path), param_dtype)
    model_type, vocab = translation.model_type, translation.model.vocab_size
    infos = read_checkpoint(source)
    tok, tok_config = find_tokenizer(tokenizer or source, model_type)
    notes = [n for n in (check_vocabulary(tok, vocab, tokenizer or source),) if n] + list(translation.notes)
    check_fresh(workdir, "--workdir", "importing")

    with staged(workdir, "importing") as tmp:
        written = write_tokenizer(tok, tok_config, tmp, translation.model.max_len)
        run_tokenizer_path = storage.join(workdir, storage.basename(written))
        roles = HFTokenizer(written)  # the roles, checked
        table = max(round_up(vocab, VOCAB_MULTIPLE), roles.padded_vocab_size(VOCAB_MULTIPLE))
        model = translation.model.replace(vocab_size=table, num_valid_tokens=vocab)
        plan = plan_import(model_type, translation.architecture, model, vocab, infos)  # headers only
        config = resolve_config(preset_for(model_type, model), [
            *model_assignments(model), f"data.seq_len={model.max_len}", f"data.tokenizer={run_tokenizer_path}",
            f"workdir={workdir}", *_mesh_assignments(mesh)])
        devices = jax.devices()
        validate_mesh(config, len(devices), jax.process_count())
        mesh_ = make_mesh(config.mesh, devices)
        abstract = with_shardings(nn.meta.unbox(abstract_variables(config.model)["params"]),
                                  param_shardings(config.model, mesh_, rules_for(config.mesh)))
        params = place_params(plan, config.model, abstract, seed)  # one tensor at a time, into its shards
        record_start(config, 0, argv, directory=tmp)  # command.txt and config.json, as every run directory has
        ckpt = Checkpointer(tmp, async_save=False)
        try:
            ckpt.save(0, {"params": params}, {"params_only": True, "imported_from": source, "model_type": model_type,
                                              "architecture": translation.architecture,
                                              "notes": notes + list(plan.notes)}, config)
        except BaseException:  # Ctrl-C or SIGTERM included: orbax's threads stop before staged() removes tmp
            with contextlib.suppress(Exception):
                ckpt.close()
            raise
        ckpt.close()  # on GCS the commit of step 0 is what makes the run usable (staging.py)
    files = sorted([storage.basename(written), "tokenizer_config.json", "checkpoints", COMMAND_FILE, CONFIG_FILE])
    return Report(workdir, model_type, translation.architecture, _count(params), time.perf_counter() - start,
                  tuple(files), tuple(notes) + plan.notes)


def _mesh_assignments(mesh: str) -> list[str]:
    return mesh_assignments(mesh) if mesh else []


# ----------------------------------------------------------------------------- export


def parse_size(text) -> Optional[int]:
    """'5GB' (10^9, transformers' convention), '500MiB' (2^20), or bytes -> bytes; None/'' = no sharding."""
    if text in (None, "", 0):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise HFError(f"max_shard_size={text!r} is invalid: write e.g. 5GB, 500MB or 2GiB.")
    number, unit, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** "_KMGT".index(unit.upper() or "_"))


def export_hf(workdir: str, out: str, *, architecture: Optional[str] = None, dtype: str = "float32",
              max_shard_size=None) -> Report:
    """A run directory (trained or imported) -> a Hugging Face model directory that
    `transformers.AutoModel*.from_pretrained(out)` loads with the same logits: config.json,
    model.safetensors (or shards + index past `max_shard_size`) and the tokenizer when the run
    has a Hugging Face one. `architecture`: GPT2LMHeadModel (default) or GPT2Model;
    BertForMaskedLM (default) or BertModel; LlamaForCausalLM (default), LlamaModel,
    MistralForCausalLM or MistralModel. `dtype`: of the written tensors."""
    start = time.perf_counter()
    workdir, out = storage.normalize(workdir, "--workdir"), storage.normalize(out, "--out")
    storage.check_bucket(workdir, "--workdir")
    config = saved_run_config(workdir)  # the config alone: nothing is loaded if it cannot be exported
    model = config.model
    architecture = architecture or ARCHITECTURES[exportable(model)][0]
    model_type = export_type(model, architecture)
    if dtype not in DTYPES:
        raise HFError(f"dtype={dtype!r} is invalid: use one of {', '.join(DTYPES)}.")
    vocab = model.num_valid_tokens or model.vocab_size
    tokenizer = run_tokenizer(config)
    specials = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.pad_id}
    hf_config = hf_config_from_model(model, architecture, vocab, dtype,
                                     {k: v for k, v in specials.items() if v < vocab})
    shard_bytes = parse_size(max_shard_size)
    check_fresh(out, "--out", "exporting")
    notes = []
    if architecture in ("GPT2Model", "BertModel", "LlamaModel", "MistralModel"):
        notes.append(f"{architecture} has no language-model head: the masked-LM/LM head weights were not written")
    if not isinstance(tokenizer, HFTokenizer):
        notes.append(f"tokenizer {config.data.tokenizer!r} has no Hugging Face form: only the model was written")

    with staged(out, "exporting") as tmp:
        files = ["config.json"]
        if isinstance(tokenizer, HFTokenizer):
            copy_tokenizer(str(tokenizer.path), tmp, model_type, model.max_len)
            files += ["tokenizer.json", "tokenizer_config.json"]
        params, _ = load_params(workdir)
        planned, produce = export_tensors(model_type, architecture, model, vocab, params, jax.numpy.dtype(dtype))
        files += write_checkpoint(tmp, planned, produce, shard_bytes)
        # last: transformers reads config.json first, so a directory without it is not a model yet
        storage.write_text(storage.join(tmp, "config.json"), json.dumps(hf_config, indent=2))
    return Report(out, model_type, architecture, sum(math.prod(t.shape) for t in planned),
                  time.perf_counter() - start, tuple(sorted(files)), tuple(notes))
