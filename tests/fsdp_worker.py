"""Run by tests/test_fsdp.py under `torch.distributed.run` (2 CPU processes, gloo): FSDP2 (`fully_shard`) on the
model's `_no_split_modules` (each Mamba block, vision layer and connector block its own shard group, as accelerate's
TRANSFORMER_BASED_WRAP does), then the root; AdamW steps on a fixed global batch split over the ranks, the loss
normalised over the label tokens of the global batch; the global loss per step and the full state dict saved."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from fsdp_reference import batches, build, label_count, loss_sum  # noqa: E402

output_dir, steps = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model, processor = build()
wrapped = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
for module in wrapped:
    fully_shard(module)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
losses = []
for inputs in batches(processor, steps):
    local = {key: value[rank::world] for key, value in inputs.items() if key != "pixel_values"}
    local["pixel_values"] = inputs["pixel_values"][rank::world]
    total_tokens = label_count(model, inputs)
    summed = loss_sum(model, local)
    (summed / total_tokens * world).backward()  # FSDP averages gradients over ranks: this makes it the global mean
    optimizer.step()
    optimizer.zero_grad()
    summed = summed.detach()
    dist.all_reduce(summed)
    losses.append(float(summed) / total_tokens)
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    sharded = type(next(model.parameters())).__name__
    model_copy, _ = build()
    model_copy.load_state_dict(state)
    model_copy.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    with open(f"{output_dir}/fsdp_run.json", "w") as handle:
        json.dump({"losses": losses, "parameter_type": sharded, "wrapped": len(wrapped)}, handle)
# Both ranks tear gloo down together: a rank that destroys its process group while the other still holds the
# connection open (rank 0 saving above) was seen to abort ("terminate called without an active exception").
dist.barrier()
with open(f"{output_dir}/finished_rank{rank}", "w") as handle:  # all collectives done: what follows is teardown
    handle.write("ok")
dist.destroy_process_group()
# Skip interpreter finalization: the DTensors still reference the process group, and tearing gloo objects down
# while the interpreter finalizes can SIGABRT (pytorch/pytorch#179291); nothing is left to flush but stdio.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
