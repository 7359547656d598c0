"""The Transformer, one module per concept.

tokens -> embeddings.py (token embedding) + positional.py (sinusoidal / learned)
       -> attention.py (Q, K, V, Q K^T / sqrt(d_k), masks.py, softmax, A V, concat, W_o)
       -> add_norm.py (residual + LayerNorm, pre or post) -> feed_forward.py -> dropout.py
       -> layers.py (encoder / decoder layer, cross attention) -> stack.py (scan, remat)
       -> output_head.py (final linear + softmax over the vocabulary)
Families: decoder_only.py (GPT), encoder_only.py (BERT), encoder_decoder.py (Vaswani).
Accounting (parameter counts, FLOPs, memory): accounting.py.
"""

from .build import abstract_variables, build_model, example_inputs, init_params, init_variables

__all__ = ["abstract_variables", "build_model", "example_inputs", "init_params", "init_variables"]
