"""Distributed pieces in one process: evaluation shards padded with weight-0 rows, decoder-layer
discovery for FSDP2, and the FSDP1 config's wrapping on CPU (FSDP1 itself needs GPUs to train:
Lightning refuses FSDPStrategy on CPU, so Lightning's wrapping step is called directly)."""

from __future__ import annotations

import importlib
import socket
from types import SimpleNamespace

import pytest
import torch
import yaml

from stepwise_lit.data.sampling import (
    MarkedRows,
    PaddedShardSampler,
    PairWeightCollator,
)
from stepwise_lit.evaluation.preference import PreferenceMetrics
from stepwise_lit.models.distributed import CausalLMWrapPolicy, decoder_layers
from stepwise_lit.models.export import gathered_policy_state_dict, whole_policy
from stepwise_lit.models.loading import LoraSettings, TinyModelConfig, apply_lora
from stepwise_lit.module import StepwiseDPOModule
from tests.helpers.paths import REPO

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def shard_rows(rows: list[dict], num_replicas: int, rank: int, batch_size: int) -> list[dict]:
    loader = torch.utils.data.DataLoader(
        MarkedRows(rows), batch_size=batch_size, sampler=PaddedShardSampler(rows, num_replicas, rank),
        collate_fn=PairWeightCollator(lambda batch: {"ids": [row["id"] for row in batch]}),
    )
    return list(loader)


def test_eval_shards_have_equal_lengths_and_count_every_row_once():
    """7 rows over 2 ranks: 4 positions each; the 8th repeats row 0 with weight 0, so the
    weighted rows of both ranks are the 7 rows exactly once."""
    rows = [{"id": i} for i in range(7)]
    shards = [shard_rows(rows, 2, rank, batch_size=3) for rank in (0, 1)]
    assert [len(batches) for batches in shards] == [2, 2]
    counted = [i for batches in shards for b in batches for i, w in zip(b["ids"], b["pair_weights"].tolist()) if w == 1]
    repeats = [i for batches in shards for b in batches for i, w in zip(b["ids"], b["pair_weights"].tolist()) if w == 0]
    assert sorted(counted) == list(range(7)) and repeats == [0]
    (single,) = [shard_rows(rows, 1, 0, batch_size=7)]
    assert single[0]["pair_weights"].tolist() == [1.0] * 7


def test_weighted_metrics_of_the_shards_equal_one_process():
    """Each rank's `PreferenceMetrics` state, summed as torchmetrics' sync does, gives the figure
    of one process over the 7 rows; counting the repeat would not."""
    values = torch.arange(7, dtype=torch.float32) ** 2

    def update(metrics: PreferenceMetrics, ids: list[int], weights: torch.Tensor) -> None:
        n = len(ids)
        logps = values[ids]
        zeros, steps = torch.zeros(2 * n), torch.zeros(2 * n, 1)
        metrics.update(zeros, steps, steps, steps.bool(), zeros, torch.cat([logps, -logps]), n, weight=weights)

    single = PreferenceMetrics()
    update(single, list(range(7)), torch.ones(7))
    ranks = [PreferenceMetrics() for _ in range(2)]
    for rank, metrics in enumerate(ranks):
        for batch in shard_rows([{"id": i} for i in range(7)], 2, rank, batch_size=3):
            update(metrics, batch["ids"], batch["pair_weights"])
    means = [metrics.pair_means["chosen_logps"] for metrics in ranks]
    assert means[0].compute() != means[1].compute()  # the value differs per rank
    total = sum(m.weighted_sum for m in means) / sum(m.total_weight for m in means)
    assert total == pytest.approx(single.compute()["chosen_logps"].item())
    assert total != pytest.approx((values.sum() + values[0]).item() / 8)


@pytest.mark.parametrize("lora", [None, LoraSettings(r=2, alpha=4, target_modules=["q_proj"])])
def test_decoder_layers_are_found_with_and_without_peft(lora):
    module = StepwiseDPOModule(tiny_model=TINY)
    module.configure_model()
    model = module.policy if lora is None else apply_lora(module.policy, lora)
    assert [type(layer).__name__ for layer in decoder_layers(model)] == ["LlamaDecoderLayer"] * TINY.num_layers


def test_lora_policy_rebuilt_from_a_gathered_state_dict_merges_like_the_policy():
    """Under FSDP the merged LoRA export rebuilds the policy from its settings and the gathered
    weights (a sharded model cannot be deep-copied): it merges to the same weights."""
    torch.manual_seed(0)
    module = StepwiseDPOModule(tiny_model=TINY, reference="adapter", lora=LoraSettings(r=2, alpha=4, target_modules=["q_proj"]))
    module.configure_model()
    with torch.no_grad():
        for name, parameter in module.policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # B starts at 0: make the adapter change the weights
    expected = whole_policy(module, None).merge_and_unload().state_dict()
    torch.manual_seed(1)  # the rebuilt model's own initialisation must not matter
    rebuilt = whole_policy(module, module.policy.state_dict()).merge_and_unload().state_dict()
    assert rebuilt.keys() == expected.keys()
    assert all(torch.equal(rebuilt[k], expected[k]) for k in expected)


# ------------------------------------------------------------------------------ FSDP1


@pytest.mark.parametrize("lora", [None, LoraSettings(r=2, alpha=4, target_modules=["q_proj"])])
def test_fsdp1_wrap_policy_picks_decoder_layers_and_the_causal_lm_of_any_architecture(lora):
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2))
    model = model if lora is None else apply_lora(model, lora)
    targets = CausalLMWrapPolicy()._run_policy(model, ignored_modules=set(), root_kwargs={})
    assert sorted(type(m).__name__ for m in targets) == ["MistralDecoderLayer"] * 2 + ["MistralForCausalLM"]


@pytest.fixture
def fsdp1_on_cpu(monkeypatch):
    """A 1-process gloo group, and FSDP1 told to compute on the CPU: Lightning passes the device
    index (None on CPU) and FSDP1 then asks for an accelerator. With one rank FSDP1 does not
    shard, but it wraps as it would on GPUs."""
    from torch.distributed.fsdp import (
        FullyShardedDataParallel,
        fully_sharded_data_parallel,
    )

    class CPUFullyShardedDataParallel(FullyShardedDataParallel):
        def __init__(self, module: torch.nn.Module, *args, device_id=None, **kwargs) -> None:
            super().__init__(module, *args, device_id=device_id or torch.device("cpu"), **kwargs)

    monkeypatch.setattr(torch.distributed.fsdp, "FullyShardedDataParallel", CPUFullyShardedDataParallel)
    monkeypatch.setattr(fully_sharded_data_parallel, "FullyShardedDataParallel", CPUFullyShardedDataParallel)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def fsdp1_strategy(capsys):
    """`FSDPStrategy` built from configs/fsdp1_gpu.yaml as the CLI parses it, on the CPU."""
    from jsonargparse import Namespace
    from lightning.pytorch.strategies import FSDPStrategy

    from stepwise_lit.cli import main

    with pytest.raises(SystemExit) as printed:
        main(["fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--config", str(REPO / "configs" / "fsdp1_gpu.yaml"),
              "--print_config"])
    assert printed.value.code in (0, None)
    settings = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    assert settings["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    options = Namespace(settings["init_args"])
    assert options.state_dict_type == "full"
    return FSDPStrategy(
        parallel_devices=[torch.device("cpu")],
        auto_wrap_policy=import_class(options.auto_wrap_policy["class_path"])(),
        activation_checkpointing_policy={import_class(path) for path in options.activation_checkpointing_policy},
        sharding_strategy=options.sharding_strategy,
        state_dict_type=options.state_dict_type,
    )


def test_fsdp1_config_wraps_layers_and_models_and_keeps_the_reference_apart(fsdp1_on_cpu, capsys):
    """With the config's policy, Lightning's wrapping makes each policy decoder layer and the
    policy's `LlamaForCausalLM` an FSDP unit (decoder layers also activation-checkpointed); the
    module wraps the reference as its own root. No flat parameter holds weights of both
    models, the optimizer holds none of the reference's, and the export gathers the policy."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    strategy = fsdp1_strategy(capsys)
    torch.manual_seed(0)
    module = StepwiseDPOModule(tiny_model=TINY)
    module.configure_model()
    policy_weights = {k: v.clone() for k, v in module.policy.state_dict().items()}
    strategy.model = strategy._setup_model(module)
    module._trainer = SimpleNamespace(strategy=strategy)
    module.on_fit_start()

    def units(root: torch.nn.Module) -> dict[str, list[str]]:
        return {type(unit.module).__name__ + f"@{name}": list(unit._flat_param._fqns)
                for name, unit in root.named_modules() if isinstance(unit, FSDP) and unit._flat_param is not None}

    policy_units, reference_units = units(strategy.model), units(module.reference.model)
    assert sorted(k.split("@")[0] for k in policy_units) == ["LlamaDecoderLayer"] * 2 + ["LlamaForCausalLM"]
    assert sorted(k.split("@")[0] for k in reference_units) == ["LlamaDecoderLayer"] * 2 + ["LlamaForCausalLM"]
    policy_flat = {id(u._flat_param) for u in strategy.model.modules() if isinstance(u, FSDP)}
    assert policy_flat.isdisjoint(id(u._flat_param) for u in module.reference.model.modules() if isinstance(u, FSDP))
    checkpointed = [type(m._checkpoint_wrapped_module).__name__ for m in strategy.model.modules() if isinstance(m, CheckpointWrapper)]
    assert checkpointed == ["LlamaDecoderLayer"] * 2
    assert not any(isinstance(m, CheckpointWrapper) for m in module.reference.model.modules())

    optimized = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert optimized and optimized.isdisjoint(id(p) for p in module.reference.model.parameters())
    exported = gathered_policy_state_dict(module, module.trainer)
    assert exported.keys() == policy_weights.keys()
    assert all(torch.equal(exported[k], policy_weights[k]) for k in policy_weights)
