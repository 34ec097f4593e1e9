"""The vLLM backend against ``TransformersGenerator`` on the embedded model: greedy completions
equal, the engine follows the policy's weights after optimizer steps, a LoRA policy's merged
weights reach it, and the sampling settings map as said. Skipped where vLLM is not installed
(CI); bench/vllm_venv.sh makes a venv where they run (docs/testing.md)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (bench/vllm_venv.sh makes a venv with it)")

from stepwise_lit.data.chat import PromptFormat  # noqa: E402
from stepwise_lit.data.synthetic import generate_pairs  # noqa: E402
from stepwise_lit.data.tokenizer import load_tokenizer  # noqa: E402
from stepwise_lit.errors import SettingError  # noqa: E402
from stepwise_lit.models.generate import (  # noqa: E402
    GenerationSettings,
    TransformersGenerator,
    VLLMSettings,
    generator_class,
)
from stepwise_lit.models.loading import LoraSettings, TinyModelConfig, apply_lora, build_tiny_model  # noqa: E402
from stepwise_lit.models.vllm_generate import VLLMGenerator, merged_weights, sampling_params  # noqa: E402
from tests.helpers.architectures import build_model  # noqa: E402

# The embedded model as the configs shape it, but with 2 heads: head_dim 32, which vLLM's CPU kernel takes.
SHAPE = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192)
ENGINE_SETTINGS = VLLMSettings(kv_cache_memory_bytes=2**28)  # 256 MiB, not vLLM's CPU default of a quarter of memory


def settings(**values) -> GenerationSettings:
    return GenerationSettings(vllm=ENGINE_SETTINGS, **values)


GREEDY = settings(max_new_tokens=48, batch_size=16)
FORMAT = PromptFormat()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def prompts():
    return [row["prompt"] for row in generate_pairs(64, seed=3)]


def embedded_model(tokenizer, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_tiny_model(tokenizer, SHAPE).eval()


def both(model, tokenizer, prompts, settings=GREEDY):
    """The completions of the transformers backend and of the vLLM backend, in that order."""
    hf = TransformersGenerator(model, tokenizer, FORMAT, progress=False).generate(prompts, settings)
    vllm = VLLMGenerator(model, tokenizer, FORMAT, progress=False).generate(prompts, settings)
    return hf, vllm


def test_generator_vllm_names_this_backend():
    assert generator_class("vllm", "online.generator") is VLLMGenerator


def test_greedy_completions_equal_transformers_on_64_prompts(tokenizer, prompts):
    """fp32 weights, the same prompt ids: every one of the 64 greedy completions is the same text."""
    hf, vllm = both(embedded_model(tokenizer), tokenizer, prompts)
    assert len(vllm) == 64 and all(len(samples) == 1 for samples in vllm)
    assert sum(len(samples[0]) for samples in hf) > 64 * 20  # completions of some length, not only EOS
    mismatched = [index for index, (a, b) in enumerate(zip(hf, vllm)) if a != b]
    assert mismatched == []


def test_the_engine_generates_from_the_policys_new_weights_after_optimizer_steps(tokenizer, prompts):
    """Three AdamW steps change the greedy completions; the engine (built before the steps, not
    rebuilt) gives the updated policy's completions, not the old ones."""
    model = embedded_model(tokenizer)
    before, _ = both(model, tokenizer, prompts[:16])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    batch = tokenizer([p + "Step 1: 7 + 5 = 12\n" for p in prompts[:8]], return_tensors="pt", padding=True)
    model.train()
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after_hf, after_vllm = both(model, tokenizer, prompts[:16])
    assert after_hf != before
    assert after_vllm == after_hf


def test_a_lora_policys_merged_weights_reach_the_engine(tokenizer, prompts):
    """With non-zero LoRA B matrices the adapted policy decodes differently from its base; the
    engine decodes as the adapted policy, and the policy is left unmerged."""
    policy = apply_lora(embedded_model(tokenizer), LoraSettings(r=4, alpha=16))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    policy.eval()
    state_before = {k: v.clone() for k, v in policy.state_dict().items()}
    with policy.disable_adapter():
        base, _ = both(policy, tokenizer, prompts[:16])
    adapted_hf, adapted_vllm = both(policy, tokenizer, prompts[:16])
    assert adapted_hf != base
    assert adapted_vllm == adapted_hf
    assert all(torch.equal(state_before[k], v) for k, v in policy.state_dict().items())


def test_merged_weights_are_base_plus_scaled_lora_product(tokenizer):
    """W' = W + (alpha / r) B A for every adapted layer, under the base model's names."""
    policy = apply_lora(embedded_model(tokenizer), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    weights = dict(merged_weights(policy))
    assert set(weights) == set(embedded_model(tokenizer).state_dict())
    layer = policy.base_model.model.model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(weights["model.layers.0.self_attn.q_proj.weight"], expected)


def test_sampled_completions_come_back_in_prompt_order_and_repeat_per_seed(tokenizer, prompts):
    """8 samples per prompt, grouped by prompt in order: the same seed draws the same samples,
    another seed other ones, and the k samples of a prompt are not all alike."""
    model = embedded_model(tokenizer)
    sampled = settings(max_new_tokens=24, do_sample=True, temperature=1.0, num_samples=8, seed=5)
    generator = VLLMGenerator(model, tokenizer, FORMAT, progress=False)
    first = generator.generate(prompts[:6], sampled)
    assert [len(samples) for samples in first] == [8] * 6
    assert generator.generate(prompts[:6], sampled) == first
    # one prompt alone draws what it drew at its place in the batch: seed + its index
    assert generator.generate(prompts[2:3], replace(sampled, seed=7)) == [first[2]]
    assert generator.generate(prompts[:6], replace(sampled, seed=6)) != first
    assert all(len(set(samples)) > 1 for samples in first)


def test_step_budget_and_stop_strings_cut_as_the_transformers_backend_does(tokenizer, prompts):
    model = embedded_model(tokenizer)
    for budget in (settings(max_new_tokens=48, max_steps=1, step_end=" "), settings(max_new_tokens=48, stop_strings=["e"])):
        hf, vllm = both(model, tokenizer, prompts[:16], budget)
        assert vllm == hf
        assert any(len(samples[0]) < 40 for samples in vllm)


def test_sampling_params_map_the_settings():
    sampled = sampling_params(settings(max_new_tokens=9, do_sample=True, temperature=0.7, top_p=0.9,
                                                 num_samples=4, stop_strings=["##"]), seed=11, stop_token_ids=[2, 5])
    assert (sampled.n, sampled.temperature, sampled.top_p, sampled.seed, sampled.max_tokens) == (4, 0.7, 0.9, 11, 9)
    assert sampled.stop == ["##"] and sampled.include_stop_str_in_output and sampled.stop_token_ids == [2, 5]
    greedy = sampling_params(settings(max_new_tokens=3), seed=0, stop_token_ids=[2])
    assert greedy.temperature == 0.0 and greedy.n == 1


def test_a_head_dimension_the_cpu_kernel_refuses_names_the_setting(tokenizer):
    torch.manual_seed(0)
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=64, num_heads=4, intermediate_size=192))
    with pytest.raises(SettingError, match="head dimension that is a multiple of 32; this model's is 16"):
        VLLMGenerator(model, tokenizer, FORMAT, progress=False).generate(["1 + 1"], GREEDY)


def test_no_prompts_give_no_completions(tokenizer):
    """A DDP rank with no share of a round's prompts still calls (its engine is built) and gets []."""
    assert VLLMGenerator(embedded_model(tokenizer), tokenizer, FORMAT, progress=False).generate([], GREEDY) == []


WIDE = {"hidden_size": 64, "intermediate_size": 128}  # 2 heads of 32: what vLLM's CPU kernel takes
HEAD_DIM_32 = {  # the stand-ins of tests/helpers/architectures.py, widened to head_dim 32
    "qwen2": {**WIDE, "tie_word_embeddings": True},  # tied, as Qwen2.5-0.5B; qkv bias
    "mistral": WIDE,
    "qwen3": {**WIDE, "head_dim": 32},  # q/k norms
    "gemma2": {**WIDE, "head_dim": 32},  # softcapping; vLLM's Gemma2 has no lm_head of its own
    "gpt2": {"n_embd": 64},  # Conv1D weights, tied
    "phi3": WIDE,  # fused qkv and gate/up in the checkpoint
    "gpt_neox": WIDE,  # partial rotary
}


@pytest.mark.parametrize("model_type", list(HEAD_DIM_32))
def test_greedy_completions_equal_transformers_on_real_architectures(tokenizer, prompts, model_type):
    """vLLM maps each architecture's Hugging Face weights onto its own layers: the 16 greedy
    completions of a random-weight stand-in are the transformers backend's."""
    rank = os.environ.get("RANK")
    model = build_model(model_type, **HEAD_DIM_32[model_type]).eval()
    hf, vllm = both(model, tokenizer, prompts[:16], settings(max_new_tokens=32))
    assert vllm == hf
    # each architecture rebuilds the engine, inside the one-process group vLLM left: no RANK is
    # left behind for a later `train.py` subprocess (Lightning took one for a launched rank and hung)
    assert os.environ.get("RANK") == rank
