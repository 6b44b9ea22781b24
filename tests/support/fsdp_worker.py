"""Run by tests/app/test_fsdp_recipe.py under torchrun: the FSDP recipe of docs/distributed.md on CPU.

Each of 2 processes (gloo) takes half of a batch through a PEFT LoRA model of AQLM layers wrapped
as the recipe says (AQLM layers ignored by FSDP, decoder layers sharded, use_orig_params); rank 0
compares the gathered LoRA gradients with one process's on the whole batch and prints
``FSDP_RESULT <tensors compared> <worst relative error> <frozen tensors unchanged>``.
"""

from __future__ import annotations

import copy
import warnings

import aqlm
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import aqlm_lora
from aqlm_lora.scheme import parse_scheme
from tests.support.layers import tiny_aqlm_llama


def main() -> None:
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_aqlm_llama(parse_scheme("2x8"))
    config = aqlm_lora.register(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    ids = torch.randint(0, 128, (2 * world, 16), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(peft_model)
    reference(input_ids=ids, labels=ids).loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    frozen = [m for m in peft_model.modules() if isinstance(m, aqlm.QuantizedLinear)]
    before = [t.clone() for m in frozen for t in (m.codes, m.codebooks, m.scales)]
    wrapped = FSDP(
        peft_model,
        auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
        ignored_states=frozen,
        use_orig_params=True,
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        device_id=torch.device("cpu"),
    )
    share = ids[2 * rank : 2 * rank + 2]  # equal token counts: the mean of the shares' means is the batch mean
    wrapped(input_ids=share, labels=share).loss.backward()
    after = [t for m in frozen for t in (m.codes, m.codebooks, m.scales)]
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
    with FSDP.summon_full_params(wrapped, with_grads=True):
        if rank == 0:
            worst, compared = 0.0, 0
            for name, p in wrapped.named_parameters():
                name = name.replace("_fsdp_wrapped_module.", "")
                if name in expected:
                    scale = expected[name].abs().max().clamp_min(1e-12)
                    worst = max(worst, float((p.grad - expected[name]).abs().max() / scale))
                    compared += 1
            print(f"FSDP_RESULT {compared} {worst:.3e} {unchanged}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
