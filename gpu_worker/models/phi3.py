"""Phi-3 / Phi-4 (``Phi3ForCausalLM``): the Llama decoder; what differs lives elsewhere.

- The checkpoint holds ``qkv_proj`` and ``gate_up_proj`` already fused ([q | k | v] and
  [gate | up] along the output dim). Their names are our fused params' names, so
  ``LlamaForCausalLM.load_weights`` hands each whole tensor to the param's loader with no shard
  id, and ``QKVParallelLinear`` / ``MergedColumnParallelLinear`` split it into its parts and take
  this rank's heads / rows of each (tensor parallelism as for separate tensors).
- LongRoPE (short/long factors, attention factor on cos/sin) and ``partial_rotary_factor``
  (Phi-4-mini) are the rotary table's (layers/rotary.py).
- ``sliding_window`` (Phi-3-mini: 2047) on every layer, as for Mistral (``layer_windows``).
"""

from __future__ import annotations

from treadle.gpu_worker.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    qkv_bias, o_bias = False, False
