"""Per-rank prediction of sharded training (``parallel=``): exact bytes of FSDP2's shards and buffers on
tiny models, the ranks that differ, the user's state left as it was, and the refusals.

Exact bytes, worked out by hand: FSDP2 shards dim 0 of every parameter into ``world`` chunks of
ceil(rows / world) rows (``torch.chunk``) and pads each rank's chunk to that size, so every rank allocates
the padded chunk. Each unit all-gathers its parameters into one flat buffer of world x (the unit's padded
shard elements), then gives each parameter its own padded unsharded storage, and reduce-scatters the
gradients through a flat buffer of the same size into a flat sharded-gradient buffer of the unit's shard
size. benchmarks/distributed.py checks whole steps against real gloo runs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memtrace
from memtrace import Category

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    HAS_FSDP2 = torch.distributed.is_available()
except ImportError:
    HAS_FSDP2 = False

needs_fsdp2 = pytest.mark.skipif(not HAS_FSDP2, reason="parallel= needs PyTorch 2.6 or later")


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(10, 33)  # weight 33 x 10, bias 33
        self.l2 = nn.Linear(33, 7)  # weight 7 x 33, bias 7

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def two(**kw):
    torch.manual_seed(0)
    return memtrace.report(Two(), (4, 10), device="cpu", optimizer="sgd", steps=1,
                           parallel={"fsdp": 4, "units": ["l1", "l2"], **kw})


def allocations(r, category, phase=None):
    return [a for a in r.allocations if a.category is category and (phase is None or a.phase.value == phase)]


def held(r, category):
    """The allocations of ``category`` still live when the step ends (FSDP2 re-pads its shards at its lazy
    initialisation in the first forward, so a parameter's first shard is freed there)."""
    return [a for a in allocations(r, category) if a.free_event is None]


@needs_fsdp2
def test_sharded_parameters_are_padded_chunks():
    r = two()
    # 4 ranks: l1.weight 33 rows -> chunks of 9 rows x 10 = 360 B; l1.bias 9 x 4 = 36 B;
    # l2.weight 7 rows -> chunks of 2 rows x 33 = 264 B; l2.bias 2 x 4 = 8 B. Rank 3 holds 6 rows and 1 row
    # but its storage is padded to the same size.
    assert sorted(a.requested_bytes for a in held(r, Category.PARAMETER)) == [8, 36, 264, 360]


@needs_fsdp2
def test_all_gather_and_reduce_scatter_buffers():
    r = two()
    comm = allocations(r, Category.COMMUNICATION, "forward")
    sizes = sorted(a.requested_bytes for a in comm)
    # l1: flat all-gather buffer 4 x (90 + 9) x 4 B = 1584; unsharded storages 36 x 10 x 4 = 1440, 36 x 4 = 144
    # l2: 4 x (66 + 2) x 4 B = 1088; unsharded 8 x 33 x 4 = 1056, 8 x 4 = 32
    assert sizes == [32, 144, 1056, 1088, 1440, 1584]
    # backward: the reduce-scatter input of each unit is as large as its all-gather buffer, and its output,
    # the unit's sharded gradients (l2: 68 x 4 B, l1: 99 x 4 B), is what the optimizer reads
    grads = sorted(a.requested_bytes for a in allocations(r, Category.GRADIENT)
                   if a.op == "aten.empty.memory_format")
    assert grads == [272, 396]
    rs_inputs = [a.requested_bytes for a in allocations(r, Category.COMMUNICATION, "backward")
                 if a.module in ("l2", "(backward)") and a.op == "aten.empty.memory_format"]
    assert 1088 in rs_inputs and 1584 in rs_inputs


@needs_fsdp2
def test_uneven_shards_list_the_ranks_that_differ():
    r = two()
    assert r.parallel == "FSDP 4" and r.world_size == 4
    assert [rp.ranks for rp in r.ranks] == [(0, 1, 2), (3,)]
    assert r.peak_bytes == max(rp.peak_bytes for rp in r.ranks)
    assert r.rank in r.ranks[[rp.peak_bytes for rp in r.ranks].index(r.peak_bytes)].ranks
    assert r.notes[0].startswith(f"Rank {r.rank} of 4 (FSDP 4)") and "Ranks 0-2; 3" in r.notes[0]
    assert r.to_dict()["parallel"]["ranks"] == [{"ranks": [0, 1, 2], "peak_bytes": r.ranks[0].peak_bytes},
                                                {"ranks": [3], "peak_bytes": r.ranks[1].peak_bytes}]


@needs_fsdp2
def test_even_shards_trace_one_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    r = memtrace.report(model, (4, 16), device="cpu", parallel={"fsdp": 2, "replicate": 2})
    assert [rp.ranks for rp in r.ranks] == [(0, 1, 2, 3)] and r.parallel == "HSDP 2 x FSDP 2"


@needs_fsdp2
def test_sharding_halves_the_parameters_and_optimizer_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    one = memtrace.report(model, (8, 64), device="cpu", optimizer="adam")
    two_ranks = memtrace.report(model, (8, 64), device="cpu", optimizer="adam", parallel={"fsdp": 2})
    params = sum(a.requested_bytes for a in held(one, Category.PARAMETER))
    assert sum(a.requested_bytes for a in held(two_ranks, Category.PARAMETER)) == params // 2
    state = [a for a in two_ranks.allocations if a.category is Category.OPTIMIZER_STATE and a.requested_bytes > 4]
    # exp_avg and exp_avg_sq of each parameter's shard: 2 x (32 x 64 + 32) x 4 B per Linear
    assert sum(a.requested_bytes for a in state) == 2 * 2 * (32 * 64 + 32) * 4


@needs_fsdp2
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_stepping_the_local_shards_is_stepping_the_dtensors(monkeypatch, optimizer):
    from memtrace import parallel

    torch.manual_seed(0)
    args = dict(input_shape=(4, 10), device="cpu", optimizer=optimizer, parallel={"fsdp": 4, "units": ["l1", "l2"]})
    fast = memtrace.report(Two(), **args)
    monkeypatch.setattr(parallel, "local_shards", lambda params, options: None)
    torch.manual_seed(0)
    slow = memtrace.report(Two(), **args)
    assert [rp.peak_bytes for rp in fast.ranks] == [rp.peak_bytes for rp in slow.ranks]
    assert fast.by_category == slow.by_category
    assert [(a.requested_bytes, a.category) for a in fast.allocations] == \
        [(a.requested_bytes, a.category) for a in slow.allocations]


@needs_fsdp2
def test_mixed_precision_gathers_in_bf16():
    r = two(mp_policy={"param_dtype": "bfloat16", "reduce_dtype": "float32"})
    comm = sorted(a.requested_bytes for a in allocations(r, Category.COMMUNICATION, "forward"))
    # test_all_gather_and_reduce_scatter_buffers' buffers in bf16, half the bytes: the parameters are cast
    # into the all-gather buffer, and the float32 shards stay as they were
    assert comm == [16, 72, 528, 544, 720, 792]
    assert sorted(a.requested_bytes for a in held(r, Category.PARAMETER)) == [8, 36, 264, 360]
    assert "mixed precision param_dtype=bfloat16" in r.parallel


@needs_fsdp2
def test_keeping_parameters_gathered_raises_the_peak():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    resharded = memtrace.report(model, (2, 64), device="cpu", parallel={"fsdp": 4})
    kept = memtrace.report(model, (2, 64), device="cpu", parallel={"fsdp": 4, "reshard_after_forward": False})
    assert kept.peak_bytes > resharded.peak_bytes
    assert kept.parallel == "FSDP 4 (reshard_after_forward=False)"


@needs_fsdp2
def test_the_users_own_plan():
    from torch.distributed.fsdp import fully_shard

    seen = []

    def plan(model, mesh):
        seen.append(mesh.size())
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    r = memtrace.report(model, (4, 16), device="cpu", parallel=plan, world_size=2)
    assert seen == [2] and r.parallel == "plan over 2 ranks"
    assert sum(a.requested_bytes for a in held(r, Category.PARAMETER)) == (16 * 32 + 32 + 32 * 16 + 16) * 2


@needs_fsdp2
def test_the_users_model_and_process_group_are_left_as_they_were(tmp_path):
    import torch.distributed as dist

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    before = [(type(p), p.shape, p.data_ptr()) for p in model.parameters()]
    assert not dist.is_initialized()
    memtrace.report(model, (4, 16), device="cpu", parallel={"fsdp": 2})
    assert not dist.is_initialized()
    assert [(type(p), p.shape, p.data_ptr()) for p in model.parameters()] == before
    assert type(model) is nn.Sequential

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        memtrace.report(model, (4, 16), device="cpu", parallel={"fsdp": 2})
        assert dist.is_initialized() and dist.group.WORLD is group and dist.get_world_size() == 1
        t = torch.ones(3)
        dist.all_reduce(t)  # the user's group still works
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


@needs_fsdp2
@pytest.mark.parametrize("parallel, kwargs, message", [
    ({"fsdp": 4, "shards": 2}, {}, "parallel= has 'shards'"),
    ({"fsdp": 0}, {}, "fsdp must be an int >= 1"),
    ({"fsdp": 1}, {}, "describes one GPU"),
    ({"fsdp": 4}, {"world_size": 8}, "world_size=8 but parallel="),
    ({"fsdp": 2, "tp": 2}, {"world_size": 6}, "world_size=6 but parallel=.* spans 4 ranks"),
    ({"fsdp": 4, "units": ["blocks.9"]}, {}, "units names 'blocks.9', which is neither a submodule"),
    ({"fsdp": 4, "reshard_after_forward": 3}, {}, "must be True, False or an int that divides fsdp=4"),
    ({"fsdp": 4, "mp_policy": {"param": "bf16"}}, {}, "mp_policy has 'param'"),
])
def test_bad_parallel_arguments_are_refused(parallel, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        memtrace.report(Two(), (4, 10), device="cpu", parallel=parallel, **kwargs)


@needs_fsdp2
def test_other_refusals():
    with pytest.raises(ValueError, match="give world_size= for its mesh"):
        memtrace.report(Two(), (4, 10), device="cpu", parallel=lambda m, mesh: m)
    with pytest.raises(ValueError, match="world_size=2 given without parallel="):
        memtrace.report(Two(), (4, 10), device="cpu", world_size=2)
    with pytest.raises(ValueError, match="ReLU, which has no parameters to shard"):
        memtrace.report(nn.ReLU(), (4, 10), device="cpu", parallel={"fsdp": 2})
    with pytest.raises(ValueError, match="verify=True measures the step in this one process"):
        memtrace.report(Two(), (4, 10), device="cpu", parallel={"fsdp": 2}, verify=True)
    with pytest.raises(ValueError, match="cannot measure a parallel= step"):
        memtrace.measure(Two(), (4, 10), device="cpu", parallel={"fsdp": 2})
    with pytest.raises(ValueError, match="parallel= predicts a training step"):
        memtrace.report(Two(), (4, 10), device="cpu", parallel={"fsdp": 2}, train=False)
    with pytest.raises(ValueError, match="Two carries no tensor-parallel plan; give tp_plan="):
        memtrace.report(Two(), (4, 10), device="cpu", parallel={"fsdp": 2, "tp": 2})


@pytest.mark.skipif(HAS_FSDP2, reason="this PyTorch has FSDP2 on a CPU mesh")
def test_old_pytorch_says_what_it_needs():
    with pytest.raises(RuntimeError, match="FSDP2 on a CPU device mesh, which needs PyTorch 2.6 or later"):
        memtrace.report(Two(), (4, 10), device="cpu", parallel={"fsdp": 2})
    with pytest.raises(RuntimeError, match="DDP on a fake process group, which needs PyTorch 2.6 or later"):
        memtrace.report(Two(), (4, 10), device="cpu", parallel={"ddp": 2})


@needs_fsdp2
def test_cli_fsdp(capsys):
    from memtrace.cli import main

    assert main(["torchvision.models:resnet18", "--input-shape", "2,3,32,32", "--device", "cpu",
                 "--fsdp", "2", "--mp-param-dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "Rank 0 of 2 (FSDP 2 (mixed precision param_dtype=bfloat16))" in out
    assert "communication" in out
    assert main(["torchvision.models:resnet18", "--input-shape", "2,3,32,32", "--device", "cpu", "--fsdp", "2",
                 "--fsdp-units", "layer1,BasicBlock"]) == 0
    assert "fully_shard wraps 9 modules ('layer1', ...)" in capsys.readouterr().out  # layer1 and 8 BasicBlocks
    with pytest.raises(SystemExit):
        main(["torchvision.models:resnet18", "--input-shape", "2,3,32,32", "--replicate", "2"])
    assert "--replicate goes with --fsdp N" in capsys.readouterr().err


# ---- DistributedDataParallel ----------------------------------------------------------------------------
# DDP's reducer allocates flat gradient buckets at construction: one per dtype holding every parameter
# until the first iteration has shown the order gradients arrive in; then it rebuilds them (before the
# second forward) in that order, closing a bucket once it reaches the first bucket's 1 MiB, then each
# bucket_cap_mb. Two(): 601 float32 parameters, 2,404 B.


def ddp(model=None, shape=(4, 10), **kw):
    torch.manual_seed(0)
    return memtrace.report(model or Two(), shape, device="cpu", optimizer="sgd", steps=2,
                           parallel={"ddp": 4, **kw})


@needs_fsdp2
def test_ddp_buckets_hold_a_copy_of_the_gradients():
    r, alone = ddp(), memtrace.report(Two(), (4, 10), device="cpu", optimizer="sgd", steps=2)
    buckets = [a for a in allocations(r, Category.COMMUNICATION) if a.op == "aten.empty.memory_format"]
    assert [(a.requested_bytes, a.phase.value, a.iteration) for a in buckets] == [(2404, "setup", 0), (2404, "forward", 1)]
    assert buckets[0].free_event is not None and buckets[1].free_event is None  # rebuilt before forward 2
    assert r.peak_bytes - alone.peak_bytes == 2404  # one more copy of the gradients, all step long
    assert r.world_size == 4 and r.ranks == (memtrace.RankPeak((0, 1, 2, 3), r.peak_bytes),)
    assert "Every rank holds the same memory" in r.notes[0]
    cuda = memtrace.report(Two(), (4, 10), optimizer="sgd", steps=2, parallel={"ddp": 4})
    alone = memtrace.report(Two(), (4, 10), optimizer="sgd", steps=2)
    assert cuda.peak_bytes - alone.peak_bytes == 2560  # the caching allocator's 512-byte blocks


@needs_fsdp2
def test_ddp_gradients_as_bucket_views():
    r = ddp(gradient_as_bucket_view=True)
    assert [a.op for a in allocations(r, Category.COMMUNICATION)] == ["aten.cat.default"]  # the broadcast at setup
    # the bucket holds the gradients; each gradient autograd makes is copied in and freed
    assert [a.requested_bytes for a in held(r, Category.GRADIENT)] == [2404]
    assert r.peak_bytes < ddp().peak_bytes


@needs_fsdp2
def test_ddp_rebuilds_its_buckets_in_gradient_order():
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    r = ddp(model, (2, 1024), bucket_cap_mb=5)
    # gradients arrive last layer first: [2.bias, 2.weight] pass the first bucket's 1 MiB; then
    # [1.bias, 1.weight, 0.bias, 0.weight] pass 5 MiB
    layer = 1024 * 1024 * 4 + 1024 * 4
    first, *rebuilt = [a.requested_bytes for a in allocations(r, Category.COMMUNICATION)
                       if a.op == "aten.empty.memory_format"]
    assert first == 3 * layer and sorted(rebuilt) == [layer, 2 * layer]


@needs_fsdp2
def test_ddp_broadcasts_buffers_before_each_forward():
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
    flat = 2 * 16 * 4  # running_mean and running_var, flattened into one tensor to broadcast
    synced = [a for a in allocations(ddp(model), Category.COMMUNICATION, "forward") if a.op == "aten.cat.default"]
    assert [a.requested_bytes for a in synced] == [flat, flat]
    quiet = ddp(model, broadcast_buffers=False)
    assert not [a for a in allocations(quiet, Category.COMMUNICATION, "forward") if a.op == "aten.cat.default"]
    # at construction rank 0's parameters are broadcast to the others, flattened by dtype, and its buffers
    # too unless broadcast_buffers=False
    params = (10 * 16 + 16 + 16 * 2 + 16 * 2 + 2) * 4
    assert [a.requested_bytes for a in allocations(quiet, Category.COMMUNICATION, "setup")][0] == params
    assert [a.requested_bytes for a in allocations(ddp(model), Category.COMMUNICATION, "setup")][0] == params + flat


@needs_fsdp2
@pytest.mark.parametrize("parallel, message", [
    ({"ddp": 4, "fsdp": 2}, "DDP replicates the whole model on every rank"),
    ({"ddp": 4, "tp": 2}, "gives 'ddp' with 'tp'"),
    ({"ddp": 4, "bucket_cap_mb": 0}, "bucket_cap_mb=0 must be a positive number"),
    ({"ddp": 4, "gradient_as_bucket_view": 1}, "must be True or False"),
    ({"fsdp": 4, "bucket_cap_mb": 5}, "'bucket_cap_mb' is an option of DDP"),
    ({"ddp": 4, "find_unused_parameters": True}, "parallel= has 'find_unused_parameters'"),
])
def test_bad_ddp_arguments_are_refused(parallel, message):
    with pytest.raises(ValueError, match=message):
        memtrace.report(Two(), (4, 10), device="cpu", parallel=parallel)


@needs_fsdp2
def test_a_plan_with_cpu_offload_is_refused():
    from torch.distributed.fsdp import CPUOffloadPolicy

    def plan(model, mesh):
        fully_shard(model, mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False))  # pinning fails earlier

    with pytest.raises(NotImplementedError, match="CPUOffloadPolicy, which memtrace does not predict yet"):
        memtrace.report(Two(), (4, 10), device="cpu", parallel=plan, world_size=2)


@needs_fsdp2
def test_a_plan_that_wraps_in_ddp_is_refused():
    with pytest.raises(memtrace.TraceError, match=r"give parallel=\{'ddp': N, ...\} for DDP"):
        memtrace.report(Two(), (4, 10), device="cpu", parallel=lambda m, mesh: nn.parallel.DistributedDataParallel(m),
                        world_size=2)


@needs_fsdp2
def test_cli_ddp(capsys):
    from memtrace.cli import main

    assert main(["torchvision.models:resnet18", "--input-shape", "2,3,32,32", "--device", "cpu", "--ddp", "2",
                 "--gradient-as-bucket-view", "--bucket-cap-mb", "10", "--zero", "1", "--no-levers"]) == 0
    out = capsys.readouterr().out
    assert "of 2 (DDP 2 + ZeroRedundancyOptimizer (bucket_cap_mb=10.0, gradient_as_bucket_view=True))" in out
    with pytest.raises(SystemExit):
        main(["torchvision.models:resnet18", "--input-shape", "2,3,32,32", "--ddp", "2", "--fsdp", "2"])
    assert "--ddp and --fsdp are two ways" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["torchvision.models:resnet18", "--input-shape", "2,3,32,32", "--gradient-as-bucket-view"])
    assert "--gradient-as-bucket-view goes with --ddp N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["torchvision.models:resnet18", "--input-shape", "2,3,32,32", "--ddp", "2", "--tp", "2"])
    assert "--ddp replicates the whole model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["torchvision.models:resnet18", "--input-shape", "2,3,32,32", "--tp", "2", "--mp-param-dtype", "bf16"])
    assert "--mp-param-dtype goes with --fsdp N" in capsys.readouterr().err


# ---- tensor parallel --------------------------------------------------------------------------------------
# parallelize_module with the plan: ColwiseParallel shards a Linear's weight and bias on dim 0,
# RowwiseParallel its weight on dim 1 (the bias is replicated) and all-reduces its output.
class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


MLP_PLAN = {"up": "colwise", "down": "rowwise"}


@needs_fsdp2
def test_tensor_parallel_shards_columns_then_rows():
    r = memtrace.report(Mlp(), (4, 16), device="cpu", optimizer="sgd", steps=1,
                        parallel={"tp": 2, "tp_plan": MLP_PLAN})
    # up.weight 16 x 16, up.bias 16, down.weight 8 x 16, down.bias 8 (whole)
    assert [a.requested_bytes for a in held(r, Category.PARAMETER)] == [1024, 64, 512, 32]
    assert sorted(a.requested_bytes for a in allocations(r, Category.GRADIENT)) == [32, 64, 512, 1024]
    # the row-parallel output is all-reduced out of place: a [4, 8] copy, the input's wrapper no copy
    reduced = [a for a in r.allocations if a.op == "_c10d_functional.all_reduce.default" and a.phase.value == "forward"]
    assert [a.requested_bytes for a in reduced] == [4 * 8 * 4]
    assert not [a for a in r.allocations if "_wrap_tensor_autograd" in a.op]
    assert "Rank 0 of 2 (TP 2)" in r.notes[0] and "tp_plan=" in r.notes[0]


@needs_fsdp2
def test_tensor_parallel_with_fsdp_and_a_models_own_plan():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, attn_implementation="eager")
    torch.manual_seed(0)
    ids = torch.zeros(2, 16, dtype=torch.long)
    alone = memtrace.report(LlamaForCausalLM(cfg), inputs={"input_ids": ids, "labels": ids}, device="cpu",
                            parallel={"fsdp": 4})
    both = memtrace.report(LlamaForCausalLM(cfg), inputs={"input_ids": ids, "labels": ids}, device="cpu",
                           parallel={"fsdp": 2, "tp": 2})
    assert both.world_size == 4 and both.ranks == (memtrace.RankPeak((0, 1, 2, 3), both.peak_bytes),)
    assert "LlamaForCausalLM's own tensor-parallel plan" in both.notes[0]
    rows = {name: {row.name: row.param_bytes for row in r.layers} for name, r in (("alone", alone), ("both", both))}
    # q_proj 64 x 64: 16 rows a rank either way; the final norm (64) is whole on each TP rank, halved by FSDP
    assert rows["alone"]["model.layers.0.self_attn.q_proj"] == rows["both"]["model.layers.0.self_attn.q_proj"] == 4096
    assert (rows["alone"]["model.norm"], rows["both"]["model.norm"]) == (16 * 4, 32 * 4)


@needs_fsdp2
@pytest.mark.parametrize("parallel, message", [
    ({"tp": 3, "tp_plan": MLP_PLAN}, r"tp=3 does not divide dim 0 of up.weight \(\[32, 16\]\): tensor parallel"),
    ({"tp": 2, "tp_plan": {"upp": "colwise"}}, "'upp', which matches no submodule of Mlp \\(did you mean 'up'"),
    ({"tp": 2, "tp_plan": {"up": "diagonal"}}, "'diagonal': that style is not translated"),
    ({"fsdp": 2, "tp_plan": MLP_PLAN}, "'tp_plan' without 'tp'"),
])
def test_bad_tensor_parallel_plans_are_refused(parallel, message):
    with pytest.raises(ValueError, match=message):
        memtrace.report(Mlp(), (4, 16), device="cpu", parallel=parallel)


@needs_fsdp2
def test_cli_tp(capsys):
    from memtrace.cli import main

    assert main(["tests.test_parallel:Mlp", "--input-shape", "4,16", "--device", "cpu", "--tp", "2", "--fsdp", "2",
                 "--tp-plan", '{"up": "colwise", "down": "rowwise"}', "--no-levers"]) == 0
    assert "Rank 0 of 4 (FSDP 2 x TP 2)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["tests.test_parallel:Mlp", "--input-shape", "4,16", "--tp-plan", "{}"])
    assert "--tp-plan goes with --tp N" in capsys.readouterr().err


@needs_fsdp2
def test_zero_redundancy_optimizer_shards_the_state_greedily():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 16), nn.Linear(16, 4))
    r = memtrace.report(model, (8, 64), device="cpu", optimizer="sgd", optimizer_kwargs={"momentum": 0.9},
                        steps=2, parallel={"ddp": 4, "zero": 1})
    # largest first, each to the rank holding the fewest elements: 0.weight (4,096) to rank 0, 1.weight to
    # rank 1, 2.weight to rank 2, and the five small ones (180 elements) to rank 3
    assert [g.ranks for g in r.ranks] == [(0,), (1,), (2,), (3,)] and r.rank == 0
    assert [a.requested_bytes for a in held(r, Category.OPTIMIZER_STATE)] == [64 * 64 * 4]
    assert [g.peak_bytes for g in r.ranks] == sorted((g.peak_bytes for g in r.ranks), reverse=True)
    assert "ZeroRedundancyOptimizer's partition" in r.notes[0]
    with pytest.raises(ValueError, match="stages 2 and 3 are what FSDP2 does"):
        memtrace.report(model, (8, 64), device="cpu", parallel={"ddp": 4, "zero": 3})


@needs_fsdp2
def test_ddp_levers():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    result = memtrace.levers(model, (2, 256), limit="600 KiB", device="cpu", optimizer="adam",
                             parallel={"ddp": 4})
    saved = {lv.label.split(" (")[0]: lv.saves_bytes for lv in result.levers}
    grads = 4 * (256 * 256 + 256) * 2
    assert saved["FSDP instead of DDP"] > saved["ZeRO-1"] > 0
    assert saved["DDP gradient_as_bucket_view"] == grads  # one copy of the gradients fewer, all step long


@needs_fsdp2
def test_levers_of_a_sharded_model_with_a_plan():
    from transformers import LlamaConfig, LlamaForCausalLM

    from memtrace.whatif import _candidates

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, attn_implementation="eager")
    model, ids = LlamaForCausalLM(cfg), torch.zeros(2, 16, dtype=torch.long)
    options = {"inputs": {"input_ids": ids, "labels": ids}, "device": "cpu", "parallel": {"fsdp": 4}}
    base = memtrace.report(model, **options)
    labels = dict(_candidates(model, base, options))
    assert labels["add tensor parallel (FSDP 2 x TP 2, the same 4 ranks)"] == {"parallel": {"fsdp": 2, "tp": 2}}
    assert "shard wider (FSDP 4 → 8 ranks)" in labels
    assert not [k for k in dict(_candidates(Two(), base, options)) if "tensor parallel" in k]  # Two has no plan
