"""`phantom-ray quickstart`: the whole platform end to end on one machine, on embedded defaults.

    phantom-ray quickstart [--workdir PATH] [--budget small|full]

On a local Ray instance with local storage (no cluster, no S3, no network) it:

1. synthesises a small shapes corpus with a learnable ground truth and packs it into parquet shards,
2. saves a freshly initialised tiny Phantom model and measures its held-out answer accuracy,
3. trains step 1 (vision projector + phantom modules) and step 2 (everything) with Phantom
   Optimization, 2 Ray Train workers under DeepSpeed ZeRO-2, and exports the model,
4. measures the held-out answer accuracy again,
5. captions the held-out images with the Ray Data batch pipeline,
6. serves the model with Ray Serve and sends one OpenAI-style chat request with an image,
7. prints a summary (also written to ``<workdir>/summary.json``).

The same stages run at scale from ``jobs/`` and ``cluster/`` (see the README).
"""

from __future__ import annotations

import argparse
import base64
import glob
import html
import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("phantom_ray.quickstart")


@dataclass(frozen=True)
class Budget:
    num_samples: int  # synthetic training triples (the held-out split is 10% on top)
    step1_steps: int  # step 1 optimizer steps (vision_proj + phantom modules)
    step2_epochs: int  # step 2 epochs over the corpus (all parameters)
    eval_limit: int  # held-out questions scored before/after
    caption_images: int
    max_tokens: int


# The tiny model needs many distinct samples to generalise (repeating a small corpus for several
# epochs memorises it): one pass over 9,600 triples reaches ~0.44 held-out accuracy vs 0.28 chance.
BUDGETS = {
    "small": Budget(num_samples=6400, step1_steps=10, step2_epochs=1, eval_limit=120, caption_images=12,
                    max_tokens=8),
    "full": Budget(num_samples=9600, step1_steps=40, step2_epochs=1, eval_limit=240, caption_images=48,
                   max_tokens=16),
}

PRESET = "tiny-qwen2"


def _train_config(workdir: str, budget: Budget, step: int, init_from: str) -> "TrainConfig":  # noqa: F821
    from phantom_ray.train.config import TrainConfig

    return TrainConfig.from_dict({
        "model": {"preset": PRESET, "init_from": init_from, "attn_implementation": "sdpa"},
        "data": {"shards": [os.path.join(workdir, "packed")], "task": "po", "batch_size": 8,
                 "shuffle_buffer_size": 64, "num_preprocess_tasks": 1, "preprocess_num_cpus": 0.25,
                 "max_length": 256},
        "synth": {"enabled": True, "num_samples": budget.num_samples, "layout": "triples", "image_size": 32},
        "loss": {"kind": "po", "beta": 2.0, "gamma": 0.5, "pref_weight": 0.3},
        "recipe": {"step": step},
        # 1e-3 learnt the tiny task in a few hundred steps; 1e-2 did not learn it at all (measured)
        "optim": {"lr": 1e-3, "warmup_steps": 10, "weight_decay": 0.0, "grad_clip": 1.0},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 0.25},
        "run": {"name": f"step{step}", "storage_path": os.path.join(workdir, "runs"),
                "epochs": 1 if step == 1 else budget.step2_epochs, "max_steps": budget.step1_steps if step == 1 else None,
                "checkpoint_every": 200,
                "report_every": 1 if step == 1 and budget.step1_steps <= 50 else 10, "max_failures": 1,
                "export": os.path.join(workdir, f"step{step}-export")},
    })


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Stages:
    def __init__(self, total: int):
        self.total, self.i, self.t0 = total, 0, time.perf_counter()

    def __call__(self, title: str) -> None:
        self.i += 1
        print(f"\n[{self.i}/{self.total}] {title}  (t={time.perf_counter() - self.t0:.0f}s)", flush=True)


# ---- training progress and curves ----------------------------------------------------------------------

def read_train_metrics(run_dir: str, session_dir: str | None = None) -> list[dict]:
    """One dict per reported optimizer step of a training run, in step order.

    Read from the run's ``metrics.jsonl`` (one JSON object per step, written by rank 0 under the
    run directory) where the trainer writes one; else from rank 0's ``[phantom-train] {...}`` lines in
    the Ray session's worker logs (the quiet console does not stream worker lines to the driver)."""
    by_step: dict[int, dict] = {}
    files = sorted(glob.glob(os.path.join(run_dir, "**", "metrics.jsonl"), recursive=True))
    if files:
        for path in files:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line.startswith("{"):
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:  # the writer's last line, half written
                            continue
                        if isinstance(rec.get("step"), int):
                            by_step.setdefault(rec["step"], {}).update(rec)
    elif session_dir:
        marker = "[phantom-train] "
        name = os.path.basename(run_dir.rstrip("/"))
        for path in glob.glob(os.path.join(session_dir, "logs", "worker-*.out")):
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    i = line.find(marker)
                    if i < 0:
                        continue
                    try:
                        rec = json.loads(line[i + len(marker):])
                    except json.JSONDecodeError:
                        continue
                    export = str(rec.get("export") or "")
                    if rec.get("done") and name and name not in export:
                        continue
                    if isinstance(rec.get("step"), int):
                        rec["_file"] = path
                        by_step.setdefault(rec["step"], {}).update(rec)
    return [by_step[k] for k in sorted(by_step)]


class _TrainProgress:
    """A progress bar for one training run, fed from its reported metrics while ``run_training`` blocks."""

    def __init__(self, run_dir: str, session_dir: str | None, total: int, desc: str, seen_files: set[str]):
        from phantom_ray.logs import progress

        self.run_dir, self.session_dir, self.seen_files = run_dir, session_dir, seen_files
        self.bar = progress(total, desc, unit="step")
        self.n = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def records(self) -> list[dict]:
        # worker log files of earlier runs hold their own [phantom-train] lines: skip them
        return [r for r in read_train_metrics(self.run_dir, self.session_dir) if r.get("_file") not in self.seen_files]

    def _poll(self) -> None:
        recs = self.records()
        if recs:
            last = recs[-1]
            if last["step"] > self.n:
                self.bar.update(last["step"] - self.n)
                self.n = last["step"]
            # the newest step with a loss (the newest record may not carry one yet), named with its step
            scored = next((r for r in reversed(recs) if isinstance(r.get("loss"), (int, float))), None)
            if scored is not None:
                self.bar.set_postfix_str(f"loss {scored['loss']:.3f} (step {scored['step']})")

    def _loop(self) -> None:
        while not self.stop.wait(2.0):
            self._poll()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._poll()
        self.bar.close()
        self.final = self.records()  # this run's points, before its log files join the seen ones
        self.seen_files.update(r["_file"] for r in self.final if "_file" in r)


def write_curves(path: str, step1: list[dict], step2: list[dict], before: float | None, after: float | None,
                 chance: float | None) -> str:
    """Loss and preference accuracy of both training steps, side by side (each on its own step axis:
    step 1 is short); the held-out accuracy before/after training is marked on step 2's accuracy."""
    import tempfile

    from PIL import Image

    from phantom_ray.plots import Panel, Series, line_chart

    def series(recs, key, label, color):
        pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
        return Series(label, [p[0] for p in pts], [p[1] for p in pts], color=color)

    def smoothed(s: Series, window: int = 5) -> list[Series]:
        # batch accuracy over 8 samples is noisy: the raw points light, a moving average on top
        if len(s.y) < 2 * window:
            return [s]
        avg = [sum(s.y[max(0, i - window + 1): i + 1]) / len(s.y[max(0, i - window + 1): i + 1]) for i in range(len(s.y))]
        light = {"#1f77b4": "#a9cbe6", "#ff7f0e": "#f5c79a"}.get(s.color, "#cccccc")
        return [Series("per report", s.x, s.y, color=light), Series(f"mean of {window}", s.x, avg, color=s.color)]

    held = [(v, f"{name} {v:.2f}") for v, name in ((chance, "held-out chance"), (before, "held-out before"),
                                                   (after, "held-out after")) if v is not None]
    charts = []
    with tempfile.TemporaryDirectory(prefix="phantom-curves-") as d:
        for i, (recs, color, title, acc_lines) in enumerate((
                (step1, "#1f77b4", "step 1: vision projector + phantom modules", []),
                (step2, "#ff7f0e", "step 2: all parameters (from step 1's export)", held))):
            p = os.path.join(d, f"s{i}.png")
            line_chart(p, [Panel("training loss (SFT + preference terms)", [series(recs, "loss", "loss", color)],
                                 ylabel="loss"),
                           Panel("preference accuracy of the batch", smoothed(series(recs, "pref_accuracy",
                                                                                      "accuracy", color)),
                                 ylabel="accuracy", ylim=(0.0, 1.05), hlines=acc_lines)],
                       title=title, width=640, panel_height=280)
            charts.append(Image.open(p).convert("RGB"))
    out = Image.new("RGB", (sum(c.width for c in charts), max(c.height for c in charts)), "white")
    x = 0
    for c in charts:
        out.paste(c, (x, 0))
        x += c.width
    out.save(path, format="PNG")
    return path


def write_gallery(path: str, items: list[dict], captions: dict[str, str], before: dict[str, str],
                  title: str = "phantom_ray quickstart: held-out images") -> str:
    """An HTML page of held-out images (embedded as data URIs) with the model's caption, the question,
    its answer before and after training and whether the answer is right. All text is escaped."""
    from phantom_ray import storage

    cards = []
    n_right = sum(1 for it in items if it["correct"])
    for it in items:
        img = base64.b64encode(storage.read_bytes(it["image"])).decode()
        name = os.path.basename(it["image"])
        ok = it["correct"]
        prev = before.get(it["image"] + "\0" + it["question"])
        cards.append(
            f'<div class="card {"ok" if ok else "bad"}"><img src="data:image/png;base64,{img}" alt="{html.escape(name)}">'
            f'<div class="name">{html.escape(name)}</div>'
            f'<div><b>caption:</b> {html.escape(captions.get(name, "(not captioned)"))}</div>'
            f'<div><b>Q:</b> {html.escape(it["question"])}</div>'
            f'<div><b>answer:</b> {html.escape(it["answer"])} {"&#10004; right" if ok else "&#10008; wrong"}'
            f'{"" if ok else " (expected " + html.escape(it["chosen"]) + ")"}</div>'
            + (f'<div class="prev">before training: {html.escape(prev)}</div>' if prev is not None else "")
            + "</div>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 12px; }}
.card {{ border: 2px solid #ccc; border-radius: 6px; padding: 8px; font-size: 14px; }}
.card.ok {{ border-color: #2ca02c; }} .card.bad {{ border-color: #d62728; }}
.card img {{ width: 192px; height: 192px; image-rendering: pixelated; display: block; margin-bottom: 6px; }}
.name {{ color: #666; font-size: 12px; }} .prev {{ color: #666; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{n_right} of {len(items)} answers right after training. Captions from the Ray Data batch pipeline;
answers are the option the model scores highest.</p>
<div class="grid">
{chr(10).join(cards)}
</div></body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def run_quickstart(workdir: str, budget_name: str = "full", verbose: bool = False) -> dict:
    from phantom_ray.logs import setup_logging

    budget = BUDGETS[budget_name]
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    # first, so that libraries imported below find the quiet console in place
    logs = setup_logging(workdir, verbose=verbose, name="quickstart", quiet_imports=("deepspeed",))

    import ray

    from phantom_ray.data.synth import LAYOUT_FILES
    from phantom_ray.caption import CaptionConfig, read_outputs, run_caption as caption
    from phantom_ray.infer.api import SamplingParams
    from phantom_ray.loader import local_model_dir
    from phantom_ray.train.evaluate import choice_accuracy
    from phantom_ray.train.ray_trainer import plan_steps, prepare_synthetic, run_training

    stage = _Stages(7)
    t_start = time.perf_counter()
    summary: dict = {"workdir": workdir, "budget": budget_name, "preset": PRESET, "logs": str(logs.dir)}
    logs.init_ray(num_cpus=max(2, os.cpu_count() or 2))
    session = str(logs.ray_session) if logs.ray_session else None
    try:
        stage("synthesise and pack the shapes corpus")
        cfg1 = _train_config(workdir, budget, 1, os.path.join(workdir, "init"))
        prepare_synthetic(cfg1)
        synth_root = os.path.join(workdir, "packed", "_synth")
        heldout = os.path.join(synth_root, "heldout", LAYOUT_FILES["triples"])
        manifest = json.load(open(os.path.join(workdir, "packed", "manifest.json")))
        summary["corpus"] = {"packed": os.path.join(workdir, "packed"), "rows": manifest.get("rows"),
                             "heldout": heldout}
        print(f"packed {manifest.get('rows')} training rows into {summary['corpus']['packed']}")

        stage("initial model and its held-out accuracy")
        init_dir = os.path.join(workdir, "init")
        if not os.path.exists(os.path.join(init_dir, "config.json")):
            # the preset's random weights + tiny tokenizer, written once into the cache by the loader
            shutil.copytree(local_model_dir(PRESET, seed=0), init_dir, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(".complete"))
        items_before: list[dict] = []
        before = choice_accuracy(init_dir, heldout, limit=budget.eval_limit, items=items_before)
        summary["accuracy_before"] = before
        print(f"held-out accuracy before training: {before['accuracy']:.3f} "
              f"(chance {before['chance']:.3f}, n={before['n']})")

        seen: set[str] = set()
        stage("train step 1 (vision_proj + phantom modules), 2 Ray Train workers, DeepSpeed ZeRO-2")
        with _TrainProgress(os.path.join(workdir, "runs", "step1"), session, plan_steps(cfg1)[1],
                            "train step 1", seen) as p1:
            m1 = run_training(cfg1)
        curve1 = p1.final
        cfg2 = _train_config(workdir, budget, 2, m1["export"])
        stage("train step 2 (all parameters) from step 1's export")
        with _TrainProgress(os.path.join(workdir, "runs", "step2"), session, plan_steps(cfg2)[1],
                            "train step 2", seen) as p2:
            m2 = run_training(cfg2)
        curve2 = p2.final
        export = m2["export"]
        summary["training"] = {"step1": {k: m1.get(k) for k in ("step", "loss", "export")},
                               "step2": {k: m2.get(k) for k in ("step", "loss", "pref_acc", "export")}}
        print(f"step 1: {m1.get('step')} steps, final loss {_num(m1.get('loss'))}; "
              f"step 2: {m2.get('step')} steps, final loss {_num(m2.get('loss'))}")
        print(f"exported model: {export}")

        stage("held-out accuracy after training")
        items_after: list[dict] = []
        after = choice_accuracy(export, heldout, limit=budget.eval_limit, items=items_after)
        summary["accuracy_after"] = after
        print(f"held-out accuracy after training: {after['accuracy']:.3f} (before {before['accuracy']:.3f}, "
              f"chance {after['chance']:.3f})")
        curves = write_curves(os.path.join(workdir, "training_curves.png"), curve1, curve2, before["accuracy"],
                              after["accuracy"], after["chance"])
        summary["curves"] = {"png": curves, "step1_points": len(curve1), "step2_points": len(curve2)}

        stage("caption the held-out images with the Ray Data batch pipeline")
        # the gallery's images: those of the first held-out questions, one card per image
        gallery_items, names = [], set()
        for it in items_after:
            name = os.path.basename(it["image"])
            if name not in names and len(names) < budget.caption_images:
                names.add(name)
                gallery_items.append(it)
        images_dir = os.path.join(workdir, "caption-input")
        os.makedirs(images_dir, exist_ok=True)
        src_images = [it["image"] for it in gallery_items]
        for src in src_images:
            dst = os.path.join(images_dir, os.path.basename(src))
            if not os.path.exists(dst):
                shutil.copyfile(src, dst)
        cap_out = os.path.join(workdir, "captions")
        cap_summary = caption(CaptionConfig(
            input=images_dir, output=cap_out, model=export, prompt="Describe the image.",
            sampling=SamplingParams(max_tokens=budget.max_tokens), engine="torch", batch_size=8, min_replicas=1,
            max_replicas=1, num_gpus=0, num_cpus=0.5, shard_size=16, progress=False))
        rows = read_outputs(cap_out)
        captions = {os.path.basename(r["image_uri"]): r["caption"] or f"(error: {r.get('error')})" for r in rows}
        summary["captions"] = {"output": cap_out, "images": len(rows),
                               "examples": [{"image": os.path.basename(r["image_uri"]), "caption": r["caption"]}
                                            for r in rows[:4]],
                               "errors": sum(1 for r in rows if r.get("error"))}
        summary["captions"]["summary"] = {k: cap_summary.get(k) for k in ("images", "errors", "wall_s", "tokens_per_s")
                                          if k in cap_summary}
        print(f"captioned {len(rows)} images into {cap_out} ({summary['captions']['errors']} errors)")
        prev = {it["image"] + "\0" + it["question"]: it["answer"] for it in items_before}
        gallery = write_gallery(os.path.join(workdir, "gallery.html"), gallery_items, captions, prev)
        summary["gallery"] = {"html": gallery, "images": len(gallery_items),
                              "right": sum(1 for it in gallery_items if it["correct"])}

        stage("serve the model (Ray Serve, OpenAI-compatible API) and send one request")
        first = os.path.join(images_dir, os.path.basename(src_images[0])) if src_images else None
        summary["serve"] = _serve_and_ask(export, first, logs)
        print(f"served answer: {summary['serve']['answer']!r}")
        summary["wall_s"] = round(time.perf_counter() - t_start, 1)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    finally:
        ray.shutdown()
        logs.close()
    print_summary(summary)
    return summary


def _num(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else str(v)


def _serve_and_ask(export: str, image_path: str | None, logs) -> dict:
    from openai import OpenAI
    from ray import serve

    from phantom_ray.serving.app import build_app

    port = _free_port()
    logs.quiet()  # importing ray.serve gave the "ray.serve" logger a console handler
    logging_config = logs.serve_logging_config()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config)
    logs.quiet()
    try:
        # the torch engine: the numerical reference, and what a CPU laptop runs without vLLM's CPU build
        # (engine "auto" picks vLLM wherever it is installed; `phantom-ray serve` configs choose freely)
        app = build_app({"models": [{"name": "phantom-quickstart", "checkpoint": export, "num_cpus": 0.5,
                                     "engine": "torch",
                                     "max_batch_size": 4}], "ingress_num_cpus": 0.25})
        serve.run(app, name="quickstart", route_prefix="/", logging_config=logging_config)
        logs.quiet()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        content: list[dict] = [{"type": "text", "text": "What colour is the shape?"}]
        if image_path:
            b64 = base64.b64encode(open(image_path, "rb").read()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}})
        resp = client.chat.completions.create(model="phantom-quickstart", max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": content}])
        return {"url": f"http://127.0.0.1:{port}/v1", "model": resp.model, "question": "What colour is the shape?",
                "image": os.path.basename(image_path) if image_path else None,
                "answer": resp.choices[0].message.content, "usage": resp.usage.model_dump() if resp.usage else None}
    finally:
        serve.shutdown()


def print_summary(s: dict) -> None:
    b, a = s["accuracy_before"], s["accuracy_after"]
    print("\n==== phantom_ray quickstart summary ====")
    print(f"workdir:            {s['workdir']} (budget {s['budget']}, model {s['preset']})")
    print(f"packed corpus:      {s['corpus']['packed']} ({s['corpus']['rows']} rows)")
    print(f"held-out accuracy:  before {b['accuracy']:.3f} -> after {a['accuracy']:.3f} "
          f"(chance {a['chance']:.3f}, n={a['n']})")
    print(f"exported model:     {s['training']['step2']['export']}")
    print(f"captions:           {s['captions']['output']} ({s['captions']['images']} images, "
          f"{s['captions']['errors']} errors)")
    for ex in s["captions"]["examples"]:
        print(f"    {ex['image']}: {ex['caption']!r}")
    print(f"served:             {s['serve']['url']} model {s['serve']['model']}: "
          f"{s['serve']['question']!r} -> {s['serve']['answer']!r}")
    print(f"training curves:    {s['curves']['png']}")
    print(f"gallery:            {s['gallery']['html']} ({s['gallery']['right']}/{s['gallery']['images']} answers right)")
    print(f"logs:               {s['logs']}")
    print(f"wall time:          {s['wall_s']} s")


def _run(args: argparse.Namespace) -> int:
    run_quickstart(args.workdir, args.budget, verbose=args.verbose)
    return 0


def register(sub) -> None:
    from phantom_ray.logs import add_verbose_flag

    p = sub.add_parser("quickstart", help="synthesise, pack, train (2 steps), export, caption and serve, locally",
                       description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  phantom-ray quickstart --budget small --workdir /tmp/phantom-quickstart")
    p.add_argument("--workdir", default=".phantom_ray_quickstart", help="where everything is written")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="full",
                   help="full: the README's run (under 15 min on 2 cores); small: a shorter run for tests")
    add_verbose_flag(p)
    p.set_defaults(func=_run)
