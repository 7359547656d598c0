"""Per-device bytes of params + AdamW state under each layout, from shapes alone.

    python benchmarks/bench_sharding.py [--preset gpt2] [--devices 8]

Nothing is allocated or compiled: `jax.eval_shape` gives the train state, the
rule table gives each array's NamedSharding, and a shard's bytes follow from
`sharding.shard_shape`. The vocabulary is padded to a multiple of 128 as
`magic train` does (GPT-2: 50257 -> 50304) so tensor splits are even.
FSDP-N should hold about 1/N of what DP holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


def layouts(devices: int) -> list[tuple[str, str, dict]]:
    half = devices // 2
    return [("dp", f"dp-{devices}", dict(data=devices)),
            ("fsdp", f"fsdp-{devices}", dict(data=1, fsdp=devices)),
            ("tp", f"dp{half}xtp2", dict(data=half, tensor=2)),
            ("fsdp+tp", f"fsdp{half}xtp2", dict(data=1, fsdp=half, tensor=2)),
            ("fsdp+tp", f"fsdp{devices // 4}xtp4", dict(data=1, fsdp=devices // 4, tensor=4)),
            ("tp", f"tp-{devices}", dict(data=1, tensor=devices))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--devices", type=int, default=8)
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")

    import jax

    from matrixmagic.configs import ConfigError
    from matrixmagic.configs.train_config import MeshConfig
    from matrixmagic.sharding.memory import state_bytes
    from matrixmagic.sharding.mesh import make_mesh
    from matrixmagic.sharding.rules import rules_for
    from matrixmagic.sharding.validate import validate_mesh
    from matrixmagic.train.data.tokenizers import ByteTokenizer
    from matrixmagic.train.run import resolve_config, sharded_abstract_state, state_shardings, with_tokenizer_vocab
    from matrixmagic.train.step import make_tx

    base = with_tokenizer_vocab(resolve_config(args.preset, devices=args.devices, platform="cpu"), ByteTokenizer())
    vocab = base.model.vocab_size  # the preset's table, padded as magic train pads it
    tx = make_tx(base)
    mib = 1 << 20
    print(f"{args.preset}: vocab padded to {vocab}, {args.devices} devices, fp32 params + AdamW (mu, nu); "
          f"MiB per device")
    print(f"{'layout':<12} {'mesh (data,fsdp,tensor)':<24} {'params':>9} {'opt_state':>10} {'total':>9} "
          f"{'vs dp':>7}")
    dp_total = None
    for layout, name, sizes in layouts(args.devices):
        config = dataclasses.replace(base, mesh=MeshConfig(layout=layout, **{"fsdp": 1, "tensor": 1, **sizes}))
        try:
            validate_mesh(config, jax.device_count())
        except ConfigError as err:
            print(f"{name:<12} invalid: {err}")
            continue
        mesh = make_mesh(config.mesh)
        rules = rules_for(config.mesh)
        abstract = sharded_abstract_state(config.model, tx, state_shardings(config.model, tx, mesh, rules))
        b = state_bytes(abstract)
        dp_total = dp_total or b["total"]
        shape = tuple(mesh.shape.values())
        print(f"{name:<12} {shape!s:<24} {b['params'] / mib:>9.1f} {b['opt_state'] / mib:>10.1f} "
              f"{b['total'] / mib:>9.1f} {b['total'] / dp_total:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
