"""`phantom-ray model info PRESET|CHECKPOINT`: parameter counts per part, without allocating weights."""

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


def register(sub) -> None:
    from phantom_ray.logs import add_verbose_flag

    p = sub.add_parser("model", help="inspect model presets and checkpoints",
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
    lst = msub.add_parser("list", help="list presets", epilog="example:\n  phantom-ray model list",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose_flag(lst)
    lst.set_defaults(func=lambda a: print("\n".join(__import__("phantom_ray.model", fromlist=["x"]).list_presets())) or 0)
