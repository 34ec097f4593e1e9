"""Generation throughput of the two backends on one online round of configs/online_tiny.yaml.

One round as that config samples it: 64 prompts of the embedded task (numbers up to 40), 8
samples each at temperature 0.7, at most 192 new tokens, the transformers backend in batches of
16 prompts. Each backend runs the round ``--repeats`` times, alternating (transformers, vLLM,
transformers, ...), on randomly initialised embedded models (seed 0) of two sizes: the config's
shape with 2 heads instead of 4 (vLLM's CPU attention needs a head dimension that is a multiple
of 32) and a wider one (hidden 512, 6 layers, 8 heads: bench.common's ``BENCH_MODEL``). Tokens are
the new tokens each backend decoded (``tokens_generated``); the vLLM times include pushing the
weights into the engine before every round, as the online loop does, but not building the
engine, which is timed apart. Needs vLLM: run it in the venv bench/vllm_venv.sh makes.

    /tmp/stepwise-vllm/bin/python bench/generation_backends.py [--repeats 3] [--write]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...`: this checkout's bench

import torch  # noqa: E402

from bench.common import BENCH_MODEL, Report, add_write_option  # noqa: E402
from stepwise_lit.data.chat import PromptFormat  # noqa: E402
from stepwise_lit.data.synthetic import generate_pairs  # noqa: E402
from stepwise_lit.data.tokenizer import load_tokenizer  # noqa: E402
from stepwise_lit.models.generate import GenerationSettings, TransformersGenerator, VLLMSettings  # noqa: E402
from stepwise_lit.models.loading import TinyModelConfig, build_tiny_model  # noqa: E402
from stepwise_lit.models.vllm_generate import ENGINE, VLLMGenerator  # noqa: E402

ENGINE_SETTINGS = VLLMSettings(kv_cache_memory_bytes=2**30)  # 1 GiB: one engine per model, the previous one freed
ROUND = GenerationSettings(do_sample=True, temperature=0.7, num_samples=8, max_new_tokens=192, batch_size=16, seed=0,
                           vllm=ENGINE_SETTINGS)
SHAPES = {
    "online_tiny, 2 heads": TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192),
    "hidden 512, 6 layers": TinyModelConfig(**BENCH_MODEL),
}


def timed_round(generator, prompts) -> tuple[float, int]:
    """Seconds and new tokens of one round."""
    before = generator.tokens_generated
    start = time.perf_counter()
    generator.generate(prompts, ROUND)
    return time.perf_counter() - start, generator.tokens_generated - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds per backend and model")
    add_write_option(parser, "generation_backends")
    options = parser.parse_args()
    report = Report(__doc__, "0 (model weights and sampling)")
    tokenizer = load_tokenizer(None)
    prompts = [row["prompt"] for row in generate_pairs(64, seed=0, max_value=40)]
    rows, summary = [], {}
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        model = build_tiny_model(tokenizer, shape).eval()
        parameters = sum(p.numel() for p in model.parameters())
        backends = {"transformers": TransformersGenerator(model, tokenizer, PromptFormat(), progress=False),
                    "vllm": VLLMGenerator(model, tokenizer, PromptFormat(), progress=False)}
        start = time.perf_counter()
        backends["vllm"].generate(prompts[:1], GenerationSettings(max_new_tokens=1, vllm=ENGINE_SETTINGS))  # builds the engine
        build = time.perf_counter() - start
        runs = {backend: [] for backend in backends}
        for _ in range(options.repeats):
            for backend, generator in backends.items():
                runs[backend].append(timed_round(generator, prompts))
        rates = {backend: statistics.median(tokens / seconds for seconds, tokens in results)
                 for backend, results in runs.items()}
        for backend, results in runs.items():
            rows.append([name, f"{parameters / 1e6:.2f}M", backend,
                         " / ".join(f"{seconds:.1f}" for seconds, _ in results),
                         round(statistics.median(tokens for _, tokens in results)), f"{rates[backend]:.0f}",
                         f"{rates[backend] / rates['transformers']:.2f}"])
        summary[name] = {"parameters": parameters, "engine_build_s": round(build, 2),
                         **{f"{backend}_tokens_per_s": round(rate, 1) for backend, rate in rates.items()},
                         "ratio": round(rates["vllm"] / rates["transformers"], 3)}
        report.say(f"{name}: vLLM engine built in {build:.1f} s (not in the rates below).")
        ENGINE.clear()  # the next model gets its own engine
        gc.collect()
    report.table(["model", "parameters", "backend", "round seconds", "new tokens (median)", "tokens/s (median)",
                  "vs transformers"], rows)
    report.say(f"One round: 64 prompts x 8 samples, at most 192 new tokens, temperature 0.7; {options.repeats} rounds "
               f"per backend, alternating; torch threads {torch.get_num_threads()}.")
    report.finish(summary, options.write)


if __name__ == "__main__":
    main()
