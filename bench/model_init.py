"""``phantom-ray model init`` at a real size on synthetic weights: time, peak memory, bytes.

    .venv/bin/python bench/model_init.py                       # phantom-0.5b (InternVL2-1B layout, ~1.9 GB), ~1 min
    .venv/bin/python bench/model_init.py --size phantom-1.8b   # InternVL2-2B layout, ~4.4 GB

Writes an InternVL2-layout checkpoint at the size's preset shapes (random bfloat16 tensors, in
shards with an index, written by tests/upstream_checkpoints.py; a word-level tokenizer of the
preset's vocabulary with the chat and InternVL tokens at the preset's ids) into a temporary
directory, then runs ``python -m phantom_ray.cli model init`` on it in a child process and prints
the wall time, the child's peak resident memory next to the source's size (the conversion keeps
one copy of the result, plus one shard's bytes while writing: docs/checkpoints.md#memory), and the
output's size. Needs free disk and memory of about three times the source.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the upstream-layout writer is a test helper

FAMILY = {"phantom-0.5b": "qwen2", "phantom-1.8b": "internlm2", "phantom-3.8b": "phi3", "phantom-7b": "internlm2"}
# token -> id, as in the InternVL2 tokenizers (docs/phantom.md#prompts)
SPECIALS = {
    "qwen2": {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
    "internlm2": {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_end|>": 92542, "<|im_start|>": 92543},
    "phi3": {"<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 32000, "<|assistant|>": 32001, "<|system|>": 32006,
             "<|end|>": 32007, "<|user|>": 32010},
}


def word_level_tokenizer(size: str):
    """A tokenizer of the preset's vocabulary size with the family's chat tokens and InternVL's nine
    tokens at the preset's ids (``<img>`` = img_start_token_index, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from phantom_ray.model.config import PhantomConfig
    from phantom_ray.processing.tokenizers import INTERNVL_TOKENS

    cfg = PhantomConfig.from_preset(size)
    specials = dict(SPECIALS[FAMILY[size]])
    specials.update({t: cfg.img_start_token_index + i for i, t in enumerate(INTERNVL_TOKENS)})
    vocab = {f"w{i}": i for i in range(cfg.llm_config.vocab_size)}
    for t, i in specials.items():
        vocab.pop(f"w{i}")
        vocab[t] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(specials))
    end = "<|end|>" if FAMILY[size] == "phi3" else "<|im_end|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=end, pad_token=end)


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="phantom-0.5b", choices=sorted(FAMILY))
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the source and output go (default: a temporary dir)")
    args = ap.parse_args()
    from upstream_checkpoints import write_internvl2

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-init-"))
    try:
        t0 = time.perf_counter()
        src = write_internvl2(work / "src", FAMILY[args.size], size=args.size, shards=args.shards,
                              dtype=torch.bfloat16, tokenizer=word_level_tokenizer(args.size))
        print(f"{args.size}: synthetic InternVL2-layout source {dir_bytes(src) / 1e9:.2f} GB "
              f"({args.shards} shards) written in {time.perf_counter() - t0:.1f} s")
        out = work / "out"
        t0 = time.perf_counter()
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-m", "phantom_ray.cli", "model", "init", "--size", args.size,
                               "--source", str(src), "--output", str(out)], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"model init failed:\n{proc.stderr[-3000:]}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
        info = json.loads((out / "init.json").read_text())
        print(proc.stdout.strip())
        print(f"model init: {wall:.1f} s wall, peak RSS {peak / 1e9:.2f} GB "
              f"({peak / dir_bytes(src):.2f}x the source), output {dir_bytes(out) / 1e9:.2f} GB, "
              f"{info['copied']} tensors copied, {info['fresh']} fresh ({info['fresh_params']:,d} parameters)")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
