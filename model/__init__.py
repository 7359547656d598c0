"""matrixmagic.model: the Transformer, one module per concept.

tokens -> embeddings.py (token embedding) + positional.py (sinusoidal / learned)
       -> attention.py (Q, K, V, Q K^T / sqrt(d_k), masks.py, softmax, A V, concat, W_o;
          or splash.py, the Pallas TPU kernel that never forms the [T, T] matrices)
       -> add_norm.py (residual + LayerNorm, pre or post) -> feed_forward.py -> dropout.py
       -> layers.py (encoder / decoder layer, cross attention) -> stack.py (scan, remat)
       -> output_head.py (final linear + softmax over the vocabulary)
Families: decoder_only.py (GPT), encoder_only.py (BERT), encoder_decoder.py (Vaswani);
families.py holds one record per family (model, objective, batch, target) and
objectives.py each objective's features and loss. build.py makes a model from a config.
Also: accounting.py (parameter counts, FLOPs, memory), generate.py (KV-cache sampling,
beam search, mask filling), explain.py and plots.py (the forward pass matrix by matrix).

May import matrixmagic.configs only: never sharding or train.
"""

from .build import abstract_variables, build_model, example_inputs, init_params, init_variables

__all__ = ["abstract_variables", "build_model", "example_inputs", "init_params", "init_variables"]
