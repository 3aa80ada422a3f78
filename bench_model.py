"""How fast is the embedded Gemma 3 270M here? Conversion, loading and greedy generation.

    python bench_model.py                 # convert into a fresh temporary cache, then load + generate
    python bench_model.py --skip-convert  # only load (warm cache) and generate

Measures: the one-time GGUF -> safetensors conversion (cold cache), loading from the warm cache,
and greedy tokens per second at batch 1 and batch 8 after compilation (the first call of each
shape compiles the Sampler and is timed separately). Prints one JSON record.
"""

import argparse
import json
import os
import platform
import tempfile
import time

import jax

import gemma3_270m as G
import model as M
import runs

PROMPTS = [
    "The capital of France is",
    "Diffuse intrinsic pontine glioma is a childhood brain tumour that",
    "Once upon a time, in a small village by the sea,",
    "The three most important ideas in thermodynamics are",
    "A good way to learn a new programming language is",
    "The history of the printing press begins",
    "Photosynthesis converts sunlight into",
    "In 1969, the first people to walk on the Moon",
]


def time_generate(model, tokenizer, batch: int, max_new_tokens: int) -> dict:
    prompts = PROMPTS[:batch]
    start = time.time()
    M.generate(model, tokenizer, prompts, max_new_tokens, batch_size=batch, progress=False)
    first = time.time() - start
    start = time.time()
    outs = M.generate(model, tokenizer, prompts, max_new_tokens, batch_size=batch, progress=False)
    seconds = time.time() - start
    tokens = sum(o["n_tokens"] for o in outs)
    return {"first_call_s": round(first, 1), "seconds": round(seconds, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "sample": outs[0]["text"][:80]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-convert", action="store_true", help="do not time a cold conversion")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", help="also write the JSON record to this file")
    args = parser.parse_args()
    runs.setup_logging()

    record = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
              "load_average_at_start": os.getloadavg()[0],  # other work on the machine slows every figure
              "dtype": args.dtype, "max_new_tokens": args.max_new_tokens}
    if not args.skip_convert:
        saved = os.environ.get("GEMMA_CACHE_DIR")
        with tempfile.TemporaryDirectory() as cold:
            os.environ["GEMMA_CACHE_DIR"] = cold
            start = time.time()
            G.ensure_gemma3_270m()
            record["convert_cold_s"] = round(time.time() - start, 1)
        if saved is None:
            del os.environ["GEMMA_CACHE_DIR"]
        else:
            os.environ["GEMMA_CACHE_DIR"] = saved

    G.ensure_gemma3_270m()  # the real cache, converted once if it is not there yet
    start = time.time()
    model, tokenizer, _ = M.load("gemma-3-270m", dtype=args.dtype)
    record["load_warm_s"] = round(time.time() - start, 1)
    for batch in (1, 8):
        record[f"greedy_batch{batch}"] = time_generate(model, tokenizer, batch, args.max_new_tokens)
    text = json.dumps(record, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
