"""make_model.py OUT_DIR — a tiny Llama that real vLLM can serve, built here with no download.

    HF_HUB_OFFLINE=1 .venv-vllm/bin/python testbed/make_model.py .cache/tiny-llama

Random weights (seeded), hidden 128, 4 heads (head size 32: the smallest the CPU attention backend takes),
2 layers, 256 positions, float32 safetensors; a byte-level BPE tokenizer trained on a few generated sentences
with <s>/</s>/<pad> and a simple chat template. It produces gibberish, which is all a tracing test needs: the
requests, their timings and the spans are real.

Idempotent: a finished directory carries a stamp with the recipe's version; a run with the same version does
nothing, and the model is written to a temporary sibling and renamed, so an interrupted run leaves no half model.
Needs transformers, tokenizers, torch and safetensors (all in .venv-vllm, which scripts/setup-vllm.sh makes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is made here
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

STAMP = ".make_model.json"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class ModelRecipe:
    """Everything that decides the files: bump `version` when the recipe changes so old caches are rebuilt."""

    version: int = 1
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 256
    vocab_size: int = 512
    seed: int = 1234


def corpus(lines: int = 2000):
    """A deterministic toy corpus: enough byte pairs for a few hundred merges."""
    words = ("the request waits in the queue then the engine schedules it prefill runs the prompt through "
             "every layer decode produces one token per step the kernel launches on the stream and the host "
             "synchronizes to read the sampled tokens back tracing joins spans to the caller").split()
    for i in range(lines):
        n = 5 + i % 11
        yield " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(n)) + f" {i % 97}."


def build_tokenizer(recipe: ModelRecipe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = recipe.max_positions
    return fast


def build_model(recipe: ModelRecipe, tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def is_complete(out: Path, recipe: ModelRecipe) -> bool:
    try:
        stamp = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return stamp == asdict(recipe) and all((out / f).is_file() for f in needed)


def make_model(out: Path, recipe: ModelRecipe = ModelRecipe()) -> Path:
    out = out.resolve()
    if is_complete(out, recipe):
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = build_tokenizer(recipe)
    model = build_model(recipe, tokenizer)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / STAMP).write_text(json.dumps(asdict(recipe), indent=1))
    shutil.rmtree(out, ignore_errors=True)  # an older recipe or a broken run: replace it whole
    tmp.rename(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path, help="where the model goes (e.g. .cache/tiny-llama)")
    args = ap.parse_args(argv)
    try:
        path = make_model(args.out_dir)
    except ImportError as e:
        print(f"make_model: {e}; run it with .venv-vllm/bin/python (bash scripts/setup-vllm.sh makes it)",
              file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
