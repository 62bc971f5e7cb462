"""`phantom-ray model info|list|init`: inspect presets and checkpoints; write step-1 starting weights.

``model info PRESET|CHECKPOINT``: parameter counts per part, without allocating weights.
``model init``: a step-1 starting checkpoint from public upstream checkpoints (docs/checkpoints.md).
"""

from __future__ import annotations

import argparse
import json


def _info(args: argparse.Namespace) -> int:
    from phantom_ray.model.config import PhantomConfig, list_presets
    from phantom_ray.model.info import parameter_counts

    if args.model in list_presets():
        cfg = PhantomConfig.from_preset(args.model)
    else:
        from phantom_ray.model.loading import resolve_checkpoint

        cfg = PhantomConfig.from_json_file(resolve_checkpoint(args.model) / "config.json")
    counts = parameter_counts(cfg)
    if args.json:
        print(json.dumps({"model": args.model, "family": cfg.family, **counts}))
        return 0
    llm = cfg.llm_config
    print(f"{args.model}: family {cfg.family}, LLM hidden {llm.hidden_size} x {llm.num_hidden_layers} layers, "
          f"heads {llm.num_attention_heads}/{llm.num_key_value_heads} kv, head_dim {llm.head_dim}, "
          f"{cfg.num_image_token} image tokens per tile at {cfg.image_size}px")
    for part in ("vision", "projector", "llm", "phantom", "total"):
        print(f"  {part:<10} {counts[part]:>15,d}  ({counts[part] / 1e9:.3f} B)")
    return 0


INIT_EXAMPLE = ("phantom-ray model init --size phantom-0.5b --source OpenGVLab/InternVL2-1B "
                "--output s3://phantom-ray/init/phantom-0.5b")


def _init(args: argparse.Namespace) -> int:
    from phantom_ray.convert import init_checkpoint

    res = init_checkpoint(args.size, args.output, source=args.source, vision=args.vision, llm=args.llm,
                          seed=args.seed, dtype=args.dtype, overwrite=args.overwrite,
                          max_shard_bytes=int(args.max_shard_gb * 1024**3))
    c = res.counts
    added = ", ".join(f"{t}" for t in res.added_tokens) or "none"
    print(f"{args.size}: {c['copied']} tensors copied, {c['fresh']} fresh ({c['fresh_params']:,d} parameters, "
          f"seed {args.seed}), vocabulary {res.vocab_size} (source rows {res.source_vocab_rows}), "
          f"tokens added: {added}")
    print(f"wrote {res.output}")
    return 0


def add_init_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``model init`` flags (shared with ``jobs/init.py``)."""
    from phantom_ray.logs import add_verbose_flag
    from phantom_ray.model.config import list_presets

    p.add_argument("--size", required=True, choices=list_presets(),
                   help="the Phantom size (preset) to start; the sources must have its shapes")
    p.add_argument("--source", default=None,
                   help="an InternVL2 checkpoint (InternVL2-1B/2B/4B/8B for 0.5b/1.8b/3.8b/7b): hub id, dir or s3://")
    p.add_argument("--vision", default=None,
                   help="instead of --source: an InternViT-300M-448px checkpoint (hub id, dir or s3://) ...")
    p.add_argument("--llm", default=None,
                   help="... plus the base LLM in Hugging Face layout (Qwen2 / InternLM2 / Phi-3); projector fresh")
    p.add_argument("--output", required=True, help="directory or s3://bucket/prefix for the HF-layout checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh phantom modules (and projector)")
    p.add_argument("--dtype", default="source", choices=("source", "float32", "bfloat16", "float16"),
                   help="dtype of the written tensors (default: as the source stores them)")
    p.add_argument("--max-shard-gb", type=float, default=2.0,
                   help="safetensors shard size; the writer holds one shard's bytes next to the model")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already at --output")
    add_verbose_flag(p)
    p.set_defaults(func=_init)
    return p


def register(sub) -> None:
    from phantom_ray.logs import add_verbose_flag

    p = sub.add_parser("model", help="inspect model presets and checkpoints; write starting weights",
                       epilog="example:\n  phantom-ray model info tiny-qwen2",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    msub = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    msub.required = True
    info = msub.add_parser("info", help="parameter counts per part (meta device, no weights allocated)",
                           epilog="example:\n  phantom-ray model info phantom-0.5b --json",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose_flag(info)
    info.add_argument("model", help="preset name (see list) or checkpoint dir / s3:// URI")
    info.add_argument("--json", action="store_true", help="print one JSON line")
    info.set_defaults(func=_info)
    init = msub.add_parser("init", help="step-1 starting weights from InternVL2 (or InternViT + base LLM) checkpoints",
                           description="Write a step-1 starting checkpoint for a size from public upstream "
                                       "checkpoints (docs/checkpoints.md).",
                           epilog="examples:\n  " + INIT_EXAMPLE + "\n  phantom-ray model init --size phantom-1.8b "
                                  "--vision OpenGVLab/InternViT-300M-448px --llm internlm/internlm2-chat-1_8b "
                                  "--output runs/init/phantom-1.8b",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_init_arguments(init)
    lst = msub.add_parser("list", help="list presets", epilog="example:\n  phantom-ray model list",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose_flag(lst)
    lst.set_defaults(func=lambda a: print("\n".join(__import__("phantom_ray.model", fromlist=["x"]).list_presets())) or 0)
