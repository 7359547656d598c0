"""Bad input a new user types, one line per case: the `magic` command and the words its error
must contain. tests/test_user_errors.py runs every case through the real CLI (exit 2, no
traceback); docs/bad_input_table.py runs them again to write docs/bad-input.md.

Placeholders in the commands are filled by `make_inputs`: {file} a plain file, {ro} a folder
this process cannot write, {corpus} a small text corpus with {data} its data dir (prepared, with
a SentencePiece model), {tiny} a corpus of a few bytes, {bad_model} a corrupt .model,
{wide} a corpus of more distinct characters than 300 ids can hold, {tmp} an empty folder,
{hf_list} a model folder whose config.json is a JSON list, {hf_half_layer} / {hf_nan_eps} /
{hf_no_width} / {hf_nan_weights} tests/fixtures/hf/gpt2 with n_layer 2.5 / layer_norm_epsilon NaN /
no n_embd / one tensor all NaN, {lock_dir} / {metrics_dir} run folders
whose run.lock / metrics.jsonl is a directory. A case's `env` is set for its command only.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

LONG = "a" * 300


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    expect: str  # a regular expression the error message must match
    issue: str = ""  # where the case comes from (issue 16's list), else a new user's guess
    env: tuple[tuple[str, str], ...] = ()  # environment variables the command runs with (NAME, value)


CASES = [
    # issue 16's list
    Case("corrupt sentencepiece .model", ("train", "--set", "data.tokenizer={bad_model}"),
         r"is not a readable SentencePiece model.*--force", "16"),
    Case("data.data_dir is a file", ("train", "--set", "data.data_dir={file}"),
         r"data\.data_dir=.* is not a directory", "16"),
    Case("data.data_dir read-only", ("data", "--source", "{corpus}", "--data-dir", "{ro}/tfds"),
         r"data\.data_dir=.* cannot be written", "16"),
    Case("explain --batch 0", ("explain", "--preset", "gpt-tiny", "--batch", "0"), r"--batch 0 is invalid", "16"),
    Case("explain --plot at a file", ("explain", "--preset", "gpt-tiny", "--plot", "{file}"),
         r"--plot .* is a file: give a directory", "16"),
    Case("compile --serialize read-only", ("compile", "--preset", "gpt-tiny", "--topology", "cpu-1", "--serialize",
                                           "{ro}/step.bin"), r"--serialize .* cannot be written", "16"),
    Case("corpus smaller than one batch", ("train", "--set", "data.source={tiny}", "--set", "data.data_dir={data}"),
         r"data\.source is too small: .* one batch needs 32 distinct rows", "16"),
    Case("BERT prompt longer than max_len", ("generate", "--preset", "bert-tiny", "--prompt", LONG + "[MASK]"),
         r"--prompt is 301 tokens .* at most 127", "16"),
    Case("magic data --vocab-size vs existing model", ("data", "--source", "{corpus}", "--data-dir", "{data}",
                                                      "--tokenizer", "sentencepiece", "--vocab-size", "999"),
         r"already has a SentencePiece model with \d+ ids.*--force", "16"),
    Case("learning rate inf", ("train", "--set", "optimizer.learning_rate=inf"),
         r"optimizer\.learning_rate=inf is invalid", "16"),
    Case("steps=1e23", ("train", "--set", "steps=1e23"), r"steps expects int, and '1e23' is not one", "16"),
    Case("steps=10**23", ("train", "--set", "steps=100000000000000000000000"),
         r"steps=100000000000000000000000 is invalid: use at most 2,147,483,647", "16"),
    Case("--max-new-tokens beyond the context", ("generate", "--preset", "gpt-tiny", "--prompt", "hi",
                                                 "--max-new-tokens", "500"), r"--max-new-tokens 500 is beyond the context",
         "16"),
    Case("--max-new-tokens beyond the decoder", ("generate", "--preset", "transformer-tiny", "--source", "hi",
                                                 "--max-new-tokens", "500"), r"beyond the context: the decoder has 128",
         "16"),
    Case("--beam-size 0", ("generate", "--preset", "transformer-tiny", "--source", "hi", "--beam-size", "0"),
         r"--beam-size 0 is invalid", "16"),
    Case("batch too big for memory", ("train", "--set", "batch_size=262144"),
         r"does not fit in memory: it needs about [\d,.]+ GiB.*--no-memory-check", "16"),
    Case("model too big for memory", ("train", "--set", "model.d_model=65536", "--set", "model.num_heads=2"),
         r"does not fit in memory.*Adam moments", "16"),
    Case("generate gpt3-175b", ("generate", "--preset", "gpt3-175b", "--prompt", "hi"),
         r"does not fit in memory.*params 650\.45 GiB", "16"),
    # a new user's other guesses
    Case("explain batch too big for memory", ("explain", "--preset", "gpt-tiny", "--batch", "100000"),
         r"does not fit in memory.*intermediates"),
    Case("--set without =", ("train", "--set", "steps"), r"--set 'steps' is invalid: write it as field=value"),
    Case("--set unknown field", ("train", "--set", "stepz=5"), r"there is no field 'stepz'\. Did you mean 'steps'"),
    Case("--set wrong type", ("train", "--set", "batch_size=big"), r"batch_size expects int, and 'big' is not one"),
    Case("negative --batch", ("train", "--batch", "-3"), r"batch_size=-3 is invalid"),
    Case("NaN Adam b2", ("train", "--set", "optimizer.b2=nan"), r"optimizer\.b2=nan is invalid"),
    Case("seed past 32 bits", ("train", "--set", "seed=1099511627776"), r"seed=1099511627776 is invalid"),
    Case("unknown preset", ("generate", "--preset", "gpt-5", "--prompt", "hi"), r"preset='gpt-5' is unknown"),
    Case("missing tokenizer file", ("train", "--set", "data.tokenizer={tmp}/none.model"), r"does not exist"),
    Case("missing run", ("generate", "--workdir", "{tmp}/none", "--prompt", "hi"), r"has no checkpoint"),
    Case("missing source", ("data", "--source", "{tmp}/none"), r"source=.* is not a directory"),
    Case("vocab too small for the corpus", ("data", "--source", "{wide}", "--data-dir", "{tmp}/d2", "--tokenizer",
                                            "sentencepiece", "--vocab-size", "300"), r"could not train.*larger --vocab-size"),
    Case("--beam-size on a decoder", ("generate", "--preset", "gpt-tiny", "--prompt", "hi", "--beam-size", "3"),
         r"applies to encoder-decoder models only"),
    Case("NaN --temperature", ("generate", "--preset", "gpt-tiny", "--prompt", "hi", "--temperature", "nan"),
         r"temperature=nan is invalid"),
    Case("explain --layer out of range", ("explain", "--preset", "gpt-tiny", "--layer", "9"),
         r"--layer 9 is invalid: this model has layers 0\.\.3"),
    Case("schedule --plot read-only", ("schedule", "--preset", "gpt-tiny", "--plot", "{ro}/lr.png"),
         r"--plot .* cannot be written"),
    Case("compile --topology cpu-0", ("compile", "--preset", "gpt-tiny", "--topology", "cpu-0"),
         r"use at least one CPU device"),
    Case("data --vocab-size 0", ("data", "--tokenizer", "sentencepiece", "--vocab-size", "0"),
         r"--vocab-size 0 is invalid"),
    # issue 23's list: preparing data and mixing it
    Case("prepare an empty source", ("data", "prepare", "{empty}", "--out", "{tmp}/../out-empty"),
         r"source .* has no readable files", "23"),
    Case("prepare JSONL without the text field", ("data", "prepare", "{jsonl}", "--out", "{tmp}/../out-jsonl"),
         r"rows\.jsonl at byte 0: no field 'text' \(the line has \['body'\]\): pass --text-field", "23"),
    Case("mixture weights that do not parse", ("train", "--set", "data.mixture=code:0.7,prose"),
         r"data\.mixture=.* write NAME:WEIGHT pairs", "23"),
    Case("mixture weights summing to 0", ("train", "--set", "data.mixture=code:0,prose:0"),
         r"data\.mixture=.* the weights sum to 0", "23"),
    Case("mixture of an unknown source", ("train", "--set", "data.mixture=code:1,prose:1", "--set",
                                          "data.data_dir={data}"), r"names \['code', 'prose'\], not prepared", "23"),
    Case("prepared data of another tokenizer", ("train", "--set", "data.source={prepared}", "--set",
                                                "data.tokenizer={sp_model}"),
         r"prepared with tokenizer 'bytes', but data\.tokenizer gives 'sp-.*--set data\.tokenizer=bytes", "23"),
    Case("truncated shard", ("train", "--set", "data.source={truncated}"),
         r"shard .*train-00000\.bin has [\d,]+ bytes, its index says", "23"),
    # issue 24's list: evaluation
    Case("eval an unknown task", ("eval", "--preset", "gpt-tiny", "--tasks", "hellaswg"),
         r"'hellaswg' is not an lm-eval task\. Did you mean hellaswag", "24"),
    Case("eval --limit 0", ("eval", "--preset", "gpt-tiny", "--tasks", "hellaswag", "--limit", "0"),
         r"--limit 0 is invalid", "24"),
    Case("eval a task on BERT", ("eval", "--preset", "bert-tiny", "--tasks", "lambada_openai"),
         r"magic eval needs a left-to-right likelihood of text, and this run.s family \(encoder", "24"),
    Case("eval a task whose data file is missing", ("eval", "--preset", "gpt-tiny", "--tasks", "lost_task",
                                                    "--include-path", "{lost_tasks}"),
         r"--tasks: a task's data file is missing", "24"),
    Case("eval --text that does not exist", ("eval", "--preset", "gpt-tiny", "--text", "{tmp}/nope.txt"),
         r"--text .*nope\.txt' does not exist", "24"),
    Case("eval --stride beyond the context", ("eval", "--preset", "gpt-tiny", "--text", "{file}", "--stride", "4096"),
         r"--stride 4096 is beyond the model's context: use 1\.\.128", "24"),
    Case("eval with nothing to evaluate", ("eval", "--preset", "gpt-tiny"), r"nothing to evaluate", "24"),
    Case("eval --limit inf", ("eval", "--preset", "gpt-tiny", "--tasks", "hellaswag", "--limit", "inf"),
         r"--limit inf is invalid", "24"),
    Case("eval --output under a file", ("eval", "--preset", "gpt-tiny", "--text", "{file}", "--output",
                                        "{file}/out.json"), r"--output .*: its folder .* does not exist", "24"),
    Case("lm-eval an unknown task", ("lm-eval", "--model", "matrixmagic", "--model_args", "preset=gpt-tiny",
                                     "--tasks", "nope"), r"magic lm-eval: error: Tasks not found: nope", "24"),
    Case("eval.tasks when training BERT", ("train", "--preset", "bert-tiny", "--set", "eval.tasks=hellaswag"),
         r"eval\.tasks=.*a BERT-style encoder gives no left-to-right likelihood", "24"),
    Case("eval.text that does not exist", ("train", "--set", "eval.text={tmp}/nope", "--set", "data.source={corpus}",
                                           "--set", "data.data_dir={data}"), r"--text .*nope' does not exist", "24"),
    # issue 26: the Llama options
    Case("num_kv_heads not dividing the heads", ("train", "--preset", "llama-tiny", "--set", "model.num_kv_heads=3"),
         r"num_kv_heads=3 is invalid: num_heads=2 must be a multiple of it.*choose one of 1, 2", "26"),
    Case("rope with an odd head dimension", ("train", "--preset", "llama-tiny", "--set", "model.num_heads=128"),
         r"positional='rope' is invalid: .* the head dimension d_model / num_heads = 1 must be even", "26"),
    Case("unknown rope scaling", ("train", "--preset", "llama-tiny", "--set", "model.rope_scaling=yarn"),
         r"model\.rope_scaling=yarn'?: model\.rope_scaling must be one of none, llama3", "26"),
    Case("kv heads not dividing tensor", ("compile", "--preset", "llama-tiny", "--topology", "v5p-8",
                                          "--mesh", "fsdp=2,tensor=2"),
         r"model\.num_kv_heads=1 is not divisible by tensor = 2.*mesh\.rules_override=kv_heads=none", "26"),
    # issue 27's context parallelism
    Case("context split not dividing the sequence", ("compile", "--preset", "gpt-tiny", "--topology", "h100x8",
                                                     "--mesh", "data=2,context=4", "--set", "data.seq_len=100"),
         r"mesh\.context=4 is invalid: data\.seq_len=100 must cut into 2 x mesh\.context = 8", "27"),
    Case("context split of an encoder", ("compile", "--preset", "bert-tiny", "--topology", "h100x8", "--mesh",
                                         "data=4,context=2"), r"mesh\.context=2 is invalid: .*decoder-only", "27"),
    Case("ring attention with attention dropout", ("compile", "--preset", "gpt-tiny", "--topology", "h100x8",
                                                   "--mesh", "data=4,context=2", "--set",
                                                   "mesh.context_attention=ring", "--set",
                                                   "model.attention_dropout_rate=0.1"),
         r"mesh\.context_attention='ring' is invalid: .*model\.attention_dropout_rate=0", "27"),
    Case("unknown context attention", ("train", "--set", "mesh.context_attention=rign"),
         r"mesh\.context_attention must be one of all_gather, ring\. Did you mean 'ring'", "27"),
    # issue 27: pipeline parallelism (compile --topology h100x64: a mesh of 64 devices without them)
    Case("pipeline stages not dividing the layers", ("compile", "--preset", "gpt-tiny", "--topology", "h100x64",
                                                     "--mesh", "stage=8,data=-1"),
         r"mesh\.stage=8 is invalid: model\.num_layers=4 must split into .* 8 x 1 = 8 equal chunks", "27"),
    Case("pipeline on an encoder-decoder", ("compile", "--preset", "transformer-tiny", "--topology", "h100x64",
                                            "--mesh", "stage=2,data=-1"),
         r"mesh\.stage=2 is invalid: .* 'encoder_decoder' family is not pipelined", "27"),
    Case("circular pipeline with too few microbatches",
         ("compile", "--preset", "gpt-tiny", "--topology", "h100x64", "--mesh", "stage=2,data=-1",
          "--set", "mesh.pipeline_repeats=2", "--set", "mesh.pipeline_microbatches=1"),
         r"mesh\.pipeline_microbatches=1 is invalid: .* at least mesh\.stage=2 microbatches", "27"),
    Case("pipeline repeats without stages", ("train", "--set", "mesh.pipeline_repeats=2"),
         r"mesh\.pipeline_repeats=2 is invalid: .* mesh\.stage=1 runs none", "27"),
    # issue 29: a second sweep (tracebacks before)
    Case("plan for zero GPUs", ("plan", "--preset", "gpt-tiny", "--topology", "h100x0"),
         r"--topology 'h100x0' is invalid: use at least one GPU", "29"),
    Case("hf import of a config.json that is a list", ("hf", "import", "{hf_list}", "--workdir", "{tmp}/../imported"),
         r"config\.json holds an array, not a JSON object of settings", "29"),
    Case("JAX_PLATFORMS=gpu without a GPU", ("train", "--set", "steps=1", "--workdir", "{tmp}/../gpu-run"),
         r"JAX_PLATFORMS=gpu asks for a backend this machine cannot start .*unset JAX_PLATFORMS", "29",
         env=(("JAX_PLATFORMS", "gpu"),)),
    Case("JAX_PLATFORMS=tpu without a TPU", ("params", "gpt-tiny"),
         r"JAX_PLATFORMS=tpu asks for a backend this machine cannot start .*unset JAX_PLATFORMS", "29",
         env=(("JAX_PLATFORMS", "tpu"),)),
    Case("run.lock that is a directory", ("train", "--workdir", "{lock_dir}", "--set", "steps=1"),
         r"workdir=.*: run\.lock there is a directory.*remove it", "29"),
    Case("metrics.jsonl that is a directory", ("train", "--workdir", "{metrics_dir}", "--set", "steps=1"),
         r"workdir=.*: metrics\.jsonl there is a directory.*remove it", "29"),
    # issue 29: generate, hf import, data
    Case("generate --seed past 32 bits", ("generate", "--preset", "gpt-tiny", "--prompt", "hi", "--seed",
                                          "1099511627776"),
         r"--seed 1099511627776 is invalid: use an integer in 0\.\.4294967295 \(jax keys take 32-bit seeds", "29"),
    Case("generate --length-penalty nan", ("generate", "--preset", "transformer-tiny", "--source", "hi",
                                           "--beam-size", "2", "--length-penalty", "nan"),
         r"--length-penalty nan is invalid: use a finite number", "29"),
    Case("generate --length-penalty inf", ("generate", "--preset", "transformer-tiny", "--source", "hi",
                                           "--length-penalty", "inf"), r"--length-penalty inf is invalid", "29"),
    Case("generate a prompt longer than the context", ("generate", "--preset", "gpt-tiny", "--prompt", "a" * 100_000),
         r"--prompt is 100,00\d tokens.*, and the model's context holds at most 128 \(model\.max_len\): shorten it",
         "29"),
    Case("data --source an empty folder", ("data", "--source", "{empty}", "--data-dir", "{tmp}/../data-empty"),
         r"source=.*empty' holds no files to read .*put the corpus there as text files, one document per file, of any "
         r"name or extension", "29"),
    Case("hf import of a fractional layer count", ("hf", "import", "{hf_half_layer}", "--workdir", "{tmp}/../hf-run"),
         r"config\.json n_layer=2\.5 is invalid: a count must be a whole number", "29"),
    Case("hf import of a NaN epsilon", ("hf", "import", "{hf_nan_eps}", "--workdir", "{tmp}/../hf-run"),
         r"config\.json layer_norm_epsilon=nan is invalid: a constant must be a finite number", "29"),
    Case("hf import without n_embd", ("hf", "import", "{hf_no_width}", "--workdir", "{tmp}/../hf-run"),
         r"config\.json has no 'n_embd' \(or 'hidden_size'\): a gpt2 config\.json gives it", "29"),
    Case("hf import of NaN weights", ("hf", "import", "{hf_nan_weights}", "--workdir", "{tmp}/../hf-run"),
         r"model\.safetensors: tensor 'transformer\.h\.0\.attn\.c_attn\.weight' holds NaN or inf values: the "
         r"checkpoint is damaged", "29"),
    # issue 29: flags and run config
    Case("--batch and --set batch_size disagree", ("train", "--batch", "8", "--set", "batch_size=16"),
         r"--batch 8 and --set batch_size=16 both set batch_size: keep one", "29"),
    Case("--workdir and --set workdir disagree", ("train", "--workdir", "{tmp}/A", "--set", "workdir={tmp}/B"),
         r"--workdir .*/A and --set workdir=.*/B both set workdir: keep one", "29"),
    Case("--remat and --set model.remat_policy disagree", ("train", "--remat", "full", "--set",
                                                           "model.remat_policy=none"),
         r"--remat full and --set model\.remat_policy=none both set model\.remat_policy: keep one", "29"),
    Case("--mesh and --set of its axis disagree", ("train", "--mesh", "fsdp=2", "--set", "mesh.fsdp=4"),
         r"--mesh fsdp=2 and --set mesh\.fsdp=4 both set mesh\.fsdp: keep one", "29"),
    Case("compile --microbatches and --set microbatches disagree",
         ("compile", "--preset", "gpt-tiny", "--topology", "cpu-1", "--microbatches", "2", "--set", "microbatches=4"),
         r"--microbatches 2 and --set microbatches=4 both set microbatches: keep one", "29"),
    Case("--init-from and --set init_from disagree", ("train", "--init-from", "{tmp}/r1", "--set",
                                                      "init_from={tmp}/r2"),
         r"--init-from .*/r1 and --set init_from=.*/r2 both set init_from: keep one", "29"),
    Case("model.vocab_size below the tokenizer's", ("train", "--set", "model.vocab_size=10"),
         r"model\.vocab_size=10 is too small for the tokenizer's 260 ids: use at least 260", "29"),
    Case("--mesh axis without a size", ("train", "--mesh", "fsdp="),
         r"^magic train: error: --mesh fsdp= is invalid: give each axis a size, e\.g\. --mesh fsdp=8 or fsdp=-1", "29"),
    Case("--num-processes 0", ("train", "--num-processes", "0"), r"--num-processes 0 is invalid: use at least 1", "29"),
    Case("negative --num-processes", ("train", "--num-processes", "-2"),
         r"--num-processes -2 is invalid: use at least 1", "29"),
    Case("negative --process-id", ("train", "--process-id", "-1"), r"--process-id -1 is invalid: use 0\.\.N-1", "29"),
]


def _cannot_write(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".probe")
        open(probe, "wb").close()
        os.remove(probe)
    except OSError:
        return True
    return False


def read_only_folder(root: Path) -> str:
    """A folder a write into fails: a chmod 555 one, or (root writes those anyway) sysfs."""
    ro = root / "ro"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    for candidate in (str(ro), "/sys/kernel"):
        if _cannot_write(candidate):
            return candidate
    raise RuntimeError("no read-only folder found on this machine (chmod 555 and /sys both took a write)")


def _gpt2_variant(folder: Path, nan: str = "", **changes) -> str:
    """A copy of the tiny GPT-2 of tests/fixtures/hf with config.json `changes` (None: the key
    removed) and, with `nan`, that tensor's values all NaN."""
    import json
    import shutil

    import numpy as np

    from matrixmagic.train.hf.tensorfile import Planned, read, read_checkpoint, write_checkpoint

    shutil.copytree(Path(__file__).parent / "fixtures" / "hf" / "gpt2", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    if nan:
        values = {name: read(info) for name, info in read_checkpoint(str(folder)).items()}
        values[nan] = np.full_like(values[nan], np.nan)
        write_checkpoint(str(folder), [Planned(n, v.shape, v.dtype) for n, v in values.items()], lambda t: values[t.name])
    return str(folder)


def make_inputs(root: Path) -> dict[str, str]:
    """The files and folders the cases name, under `root`."""
    from matrixmagic.train.data.corpus import open_corpus
    from matrixmagic.train.data.pipeline import prepare_tokenizer

    (root / "file").write_text("not a directory\n")
    (root / "bad.model").write_bytes(b"this is not a sentencepiece model")
    corpus = root / "corpus"
    corpus.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(" ".join(words[(i + j) % len(words)] for j in range(400)) + "\n")
    sp = prepare_tokenizer(open_corpus(str(corpus), str(root / "data")), "sentencepiece", vocab_size=300)
    tiny = root / "tiny"
    tiny.mkdir()
    for name in ("a.py", "b.py"):
        (tiny / name).write_text("x = 1\n")
    wide = root / "wide"
    wide.mkdir()
    for i in range(3):  # 600 distinct characters: more than 300 ids can cover
        (wide / f"w{i}.txt").write_text("".join(chr(0x4E00 + k) for k in range(600)) * 2 + "\n")
    (root / "tmp").mkdir()
    (root / "empty").mkdir()
    (root / "rows.jsonl").write_text('{"body": "text under another name"}\n')
    lost = root / "lost_tasks"  # a task of one's own whose data file is not there
    lost.mkdir()
    (lost / "lost.yaml").write_text(f"task: lost_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                    f"    test: {root / 'no-such-file.jsonl'}\noutput_type: loglikelihood\n"
                                    f"test_split: test\ndoc_to_text: '{{{{q}}}}'\ndoc_to_target: '{{{{a}}}}'\n")
    (root / "hf_list").mkdir()  # a config.json that parses but is no object of settings
    (root / "hf_list" / "config.json").write_text("[1, 2]\n")
    hf = {name: _gpt2_variant(root / name, **changes) for name, changes in (
        ("hf_half_layer", {"n_layer": 2.5}), ("hf_nan_eps", {"layer_norm_epsilon": float("nan")}),
        ("hf_no_width", {"n_embd": None}), ("hf_nan_weights", {"nan": "transformer.h.0.attn.c_attn.weight"}))}
    for run, name in (("lock_dir", "run.lock"), ("metrics_dir", "metrics.jsonl")):  # a folder where a file goes
        (root / run / name).mkdir(parents=True)
    from matrixmagic.train.data.prepare import prepare
    from matrixmagic.train.data.tokenizers import ByteTokenizer

    prepare(str(corpus), str(root / "prepared"), ByteTokenizer(), workers=0, progress=False)
    prepare(str(corpus), str(root / "truncated"), ByteTokenizer(), workers=0, progress=False)
    shard = root / "truncated" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    return {**hf, "hf_list": str(root / "hf_list"), "lock_dir": str(root / "lock_dir"),
            "metrics_dir": str(root / "metrics_dir"), "lost_tasks": str(lost), "empty": str(root / "empty"), "jsonl": str(root / "rows.jsonl"), "sp_model": str(sp.path),
            "prepared": str(root / "prepared"), "truncated": str(root / "truncated"), "file": str(root / "file"),
            "bad_model": str(root / "bad.model"), "corpus": str(corpus),
            "data": str(root / "data"), "tiny": str(tiny), "wide": str(wide), "tmp": str(root / "tmp"),
            "ro": read_only_folder(root)}


def command(case: Case, inputs: dict[str, str]) -> list[str]:
    return [arg.format(**inputs) for arg in case.argv]
