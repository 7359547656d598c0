"""`magic hf import DIR --workdir RUN` and `magic hf export --workdir RUN --out DIR`.

The work is train/hf/api.py (also the Python API); this file is the flags and the printing.
Every directory flag takes a local path or a gs:// URL (train/storage.py).
"""

from __future__ import annotations

from matrixmagic.configs.model_config import DTYPES

ARCHITECTURE_CHOICES = ("GPT2LMHeadModel", "GPT2Model", "BertForMaskedLM", "BertModel", "LlamaForCausalLM",
                        "LlamaModel", "MistralForCausalLM", "MistralModel")


def add_hf_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="hf_command", required=True)
    i = sub.add_parser("import", help="a Hugging Face GPT-2, BERT, Llama or Mistral directory -> a run "
                                         "directory")
    i.add_argument("source", metavar="DIR", help="the model folder (local or gs://): config.json, "
                                                 "model.safetensors (or model.safetensors.index.json and its "
                                                 "shards), tokenizer files")
    i.add_argument("--workdir", required=True, metavar="RUN", help="the run directory to create, local or gs:// "
                                                                   "(must not exist or be empty)")
    i.add_argument("--tokenizer", metavar="DIR", help="take the tokenizer files from this folder instead")
    i.add_argument("--param-dtype", default="float32", choices=DTYPES,
                   help="dtype of the imported params (float16/bfloat16 checkpoints are cast to it)")
    i.add_argument("--mesh", default="fsdp=-1", help="how params are split over the devices while placed, as in "
                                                     "`magic train --mesh` (default: fsdp over all)")
    i.set_defaults(hf_func=_import)
    e = sub.add_parser("export", help="a run directory -> a Hugging Face directory transformers loads")
    e.add_argument("--workdir", required=True, metavar="RUN", help="a trained or imported run directory")
    e.add_argument("--out", required=True, metavar="DIR", help="the folder to create, local or gs:// (must not "
                                                       "exist or be empty)")
    e.add_argument("--architecture", choices=ARCHITECTURE_CHOICES,
                   help="default GPT2LMHeadModel for GPT runs, LlamaForCausalLM for runs with "
                                                      "Llama's options, BertForMaskedLM for BERT runs")
    e.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the written tensors")
    e.add_argument("--max-shard-size", help="split model.safetensors into shards of at most this size, e.g. 5GB")
    e.set_defaults(hf_func=_export)


def _import(args) -> int:
    from ..hf.api import import_hf

    report = import_hf(args.source, args.workdir, tokenizer=args.tokenizer, param_dtype=args.param_dtype,
                       mesh=args.mesh)
    print(report.summary("imported"))
    print(f"next: magic generate --workdir {report.path} --prompt TEXT   |   magic train --init-from {report.path} "
          f"--workdir NEW_RUN --set data.source=YOUR_TEXT_DIR")
    return 0


def _export(args) -> int:
    from ..hf.api import export_hf

    report = export_hf(args.workdir, args.out, architecture=args.architecture, dtype=args.dtype,
                       max_shard_size=args.max_shard_size)
    print(report.summary("exported"))
    return 0


def main(args) -> int:
    return args.hf_func(args)
