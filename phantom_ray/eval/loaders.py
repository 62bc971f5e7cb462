"""One loader per benchmark: the original files in the seed README's layout -> ``EvalItem`` lists.

``data_root`` is the README's ``Evaluation_Dataset_Path`` (local directory or ``s3://`` prefix);
file names are the original's (``config.py``). Images stored as files become URIs under
``data_root``; images stored inside parquet/TSV cells become bytes. A missing file or field raises
``ValueError``/``FileNotFoundError`` naming the file, row and field.

Deliberate departures from the original loaders (each fixes a way it lost or mislabelled items):
ChartQA ids are unique per question (the original used the image name, and its duplicate filter
then dropped every further question about the same chart); MME ground truth is attached per item;
POPE labels are attached per item (the original zipped a label file with id-sorted predictions);
VisualWebBench's action-prediction options are written as lettered lines (the original formatted
the raw array); MMBench options are missing only when empty or NaN (pandas also dropped options
whose text is "None" or "NA").
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from typing import Any, Callable

from phantom_ray import storage
from phantom_ray.eval.images import decode_cell
from phantom_ray.eval.items import EvalItem, canonical_name, max_new_tokens, with_suffix

# Paths under data_root, as in the original config.py.
PATHS = {
    "sqa": ("ScienceQA/problems.json", "ScienceQA/pid_splits.json"),
    "pope": {s: f"POPE/coco_pope_{s}.json" for s in ("adversarial", "popular", "random")},
    "mme": "MME_Benchmark_release_version/llava_mme.json",
    "mme_dir": "MME_Benchmark_release_version",
    "mmbench_dev": "MMBench/mmbench_dev_20230712.tsv",
    "mmbench_cn_dev": "MMBench/mmbench_dev_cn_20231003.tsv",
    "mmvet": "mm-vet/mm-vet.json",
    "mmvet-v2": "mm-vet-v2/mm-vet-v2.json",
    "mathvista": "MathVista",  # testmini-*.parquet
    "ai2d": "ai2d/ai2d_test.json",
    "hallusionbench": "HallusionBench/HallusionBench.json",
    "chartqa": "chartqa/test/test_augmented.json",
    "seed": "SEED-Bench/SEED-Bench.json",
    "seed-2-plus": "SEED-Bench-2-plus/SEED-Bench-2-plus-text-rich.json",
    "llava": "llava-bench-in-the-wild",  # questions.jsonl, context.jsonl, answers_gpt4.jsonl
    "llava_wilder": "LLaVA-Bench-Wilder/small/test-00000-of-00001.parquet",
    "mmstar": "MMStar/mmstar.parquet",
    "mathverse": ("MathVerse/testmini.json", "MathVerse/testmini_text_only.json"),
    "visualwebbench": "VisualWebBench",  # *.parquet, one or more per task
    "blink": "BLINK",  # <sub_task>/val-*.parquet
    "cvbench": "CV-Bench/test.parquet",
}

SEED_TYPES = {1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Location",
              4: "Instance Attributes", 5: "Instances Counting", 6: "Spatial Relation",
              7: "Instance Interaction", 8: "Visual Reasoning", 9: "Text Understanding"}

BLINK_DISCLAIMER = (
    "Disclaimer: This is not to make unfair assumptions about the people in the image and you just "
    "need to give your assessment on this question. You don't need to identify the real people. "
    "You just need to analyze based on the information I gave you.\n\n"
)
BLINK_DISCLAIMER_TASKS = ("Forensic_Detection", "Jigsaw", "Art_Style")

# VisualWebBench's task prompts (the benchmark's own templates).
VWB_PROMPTS = {
    "web_caption": (
        "You are given a screenshot of a webpage. Please generate the meta web description "
        "information of this webpage, i.e., content attribute in <meta name=\"description\" "
        "content=\"\"> HTML element.\n\nYou should use the following format, and do not output any "
        "explanation or any other contents:\n<meta name=\"description\" content=\"YOUR ANSWER\">\n"),
    "heading_ocr": (
        "You are given a screenshot of a webpage. Please generate the main text within the "
        "screenshot, which can be regarded as the heading of the webpage.\n\nYou should directly "
        "tell me the main content, and do not output any explanation or any other contents.\n"),
    "webqa": (
        "{question}\nYou should directly tell me your answer in the fewest words possible, and do "
        "not output any explanation or any other contents.\n"),
    "element_ocr": (
        "You are given a screenshot of a webpage with a red rectangle bounding box. The [x1, y1, "
        "x2, y2] coordinates of the bounding box is {bbox}.\nPlease perform OCR in the bounding box "
        "and recognize the text content within the red bounding box.\n\nYou should use the "
        "following format:\nThe text content within the red bounding box is: <YOUR ANSWER>\n"),
    "element_ground": (
        "In this website screenshot, I have labeled IDs for some HTML elements as candicates. Tell "
        "me which one best matches the description: {elem_desc}\n\nYou should directly tell me your "
        "choice in a single uppercase letter, and do not output any explanation or any other "
        "contents.\n"),
    "action_prediction": (
        "You are given a screenshot of a webpage with a red rectangle bounding box. The [x1, y1, "
        "x2, y2] coordinates of the bounding box is {bbox}.\nPlease select the best webpage "
        "description that matches the new webpage after clicking the selected element in the "
        "bounding box:\n{choices_text}\n\nYou should directly tell me your choice in a single "
        "uppercase letter, and do not output any explanation or any other contents.\n"),
    "action_ground": (
        "In this website screenshot, I have labeled IDs for some HTML elements as candicates. Tell "
        "me which one I should click to complete the following task: {instruction}\n\nYou should "
        "directly tell me your choice in a single uppercase letter, and do not output any "
        "explanation or any other contents.\n"),
}


# --- file helpers ---------------------------------------------------------------------------------
def _uri(root: str, rel: str) -> str:
    return storage.join(root, *rel.split("/"))


def _read_json(root: str, rel: str) -> Any:
    uri = _uri(root, rel)
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"benchmark file missing: {uri} (expected in the seed README layout)") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: not valid JSON ({exc})") from exc


def _read_jsonl(root: str, rel: str) -> list[dict]:
    uri = _uri(root, rel)
    try:
        text = storage.read_text(uri)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"benchmark file missing: {uri} (expected in the seed README layout)") from exc
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{uri} line {n}: not valid JSON ({exc})") from exc
    return rows


def _read_parquet(uri: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"benchmark file missing: {uri} (expected in the seed README layout)") from exc
    return pq.read_table(io.BytesIO(data)).to_pylist()


def _read_tsv(uri: str) -> list[dict]:
    try:
        text = storage.read_text(uri)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"benchmark file missing: {uri} (expected in the seed README layout)") from exc
    csv.field_size_limit(sys.maxsize)  # MMBench cells hold whole base64 images
    return list(csv.DictReader(io.StringIO(text), delimiter="\t"))


def _get(row: dict, key: str, where: str) -> Any:
    try:
        return row[key]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{where}: missing field {key!r}") from exc


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan")


def _lettered(options: list, sep: str) -> str:
    return sep.join(f"{chr(ord('A') + i)}. {opt}" for i, opt in enumerate(options))


# --- loaders --------------------------------------------------------------------------------------
def load_sqa(root: str) -> list[EvalItem]:
    problems_rel, splits_rel = PATHS["sqa"]
    problems, splits = _read_json(root, problems_rel), _read_json(root, splits_rel)
    items = []
    for qid in _get(splits, "test", _uri(root, splits_rel)):
        where = f"{_uri(root, problems_rel)} problem {qid}"
        x = problems.get(qid)
        if x is None:
            raise ValueError(f"{where}: listed in the test split but not in problems.json")
        if x.get("image") is None:
            continue  # SQA-IMG: image questions only
        choices = _get(x, "choices", where)
        question = "\n".join([_get(x, "hint", where), _get(x, "question", where), _lettered(choices, "\n")])
        items.append(EvalItem("sqa", str(qid), with_suffix("sqa", question),
                              [_uri(root, f"ScienceQA/images/test/{qid}/image.png")], max_new_tokens("sqa"),
                              int(_get(x, "answer", where)), {"num_choices": len(choices)}))
    return items


def load_ai2d(root: str) -> list[EvalItem]:
    rel = PATHS["ai2d"]
    items = []
    for n, x in enumerate(_read_json(root, rel)):
        where = f"{_uri(root, rel)} row {n}"
        meta = _get(x, "metadata", where)
        options = _get(meta, "answerTexts", where + " metadata")
        question = "\n".join([_get(x, "question", where), _lettered(options, " ")])
        folder = "abc_images" if meta.get("abcLabel") else "images"
        items.append(EvalItem("ai2d", str(_get(meta, "questionId", where + " metadata")),
                              with_suffix("ai2d", question), [_uri(root, f"ai2d/{folder}/{_get(x, 'imageName', where)}")],
                              max_new_tokens("ai2d"), int(_get(meta, "correctAnswer", where + " metadata")),
                              {"num_choices": len(options)}))
    return items


def load_chartqa(root: str) -> list[EvalItem]:
    rel = PATHS["chartqa"]
    items = []
    for n, x in enumerate(_read_json(root, rel)):
        where = f"{_uri(root, rel)} row {n}"
        img = _get(x, "imgname", where)
        items.append(EvalItem("chartqa", f"{img}#{n}", with_suffix("chartqa", _get(x, "query", where)),
                              [_uri(root, f"chartqa/test/png/{img}")], max_new_tokens("chartqa"),
                              _get(x, "label", where), {"imgname": img}))
    return items


def _choice_question(x: dict, where: str) -> str:
    keys = sorted(k for k in x if "choice" in k)
    if not keys:
        raise ValueError(f"{where}: no choice_* fields")
    return "\n".join([_get(x, "question", where), _lettered([x[k] for k in keys], "\n")])


def load_seed(root: str) -> list[EvalItem]:
    rel = PATHS["seed"]
    data = _read_json(root, rel)
    items = []
    for n, x in enumerate(_get(data, "questions", _uri(root, rel))):
        where = f"{_uri(root, rel)} questions[{n}]"
        if x.get("data_type") != "image":
            continue  # SEED-IMG only
        qtype = _get(x, "question_type_id", where)
        items.append(EvalItem("seed", str(_get(x, "question_id", where)),
                              with_suffix("seed", _choice_question(x, where)),
                              [_uri(root, f"SEED-Bench/SEED-Bench-image/{_get(x, 'data_id', where)}")],
                              max_new_tokens("seed"), _get(x, "answer", where),
                              {"question_type": SEED_TYPES.get(int(qtype), str(qtype))}))
    return items


def load_seed_2_plus(root: str) -> list[EvalItem]:
    rel = PATHS["seed-2-plus"]
    data = _read_json(root, rel)
    rows = data["questions"] if isinstance(data, dict) and "questions" in data else data
    items = []
    for n, x in enumerate(rows):
        where = f"{_uri(root, rel)} row {n}"
        items.append(EvalItem("seed-2-plus", str(_get(x, "question_id", where)),
                              with_suffix("seed-2-plus", _choice_question(x, where)),
                              [_uri(root, f"SEED-Bench-2-plus/{_get(x, 'data_id', where)}")],
                              max_new_tokens("seed-2-plus"), _get(x, "answer", where),
                              {"question_type": _get(x, "question_image_type", where)}))
    return items


def load_pope(root: str) -> list[EvalItem]:
    items = []
    for split, rel in PATHS["pope"].items():
        for n, x in enumerate(_read_jsonl(root, rel)):
            where = f"{_uri(root, rel)} line {n + 1}"
            label = str(_get(x, "label", where)).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"{where}: label must be yes or no, got {label!r}")
            items.append(EvalItem("pope", f"{split}/{_get(x, 'question_id', where)}",
                                  with_suffix("pope", _get(x, "text", where)),
                                  [_uri(root, f"coco2014/val2014/{_get(x, 'image', where)}")],
                                  max_new_tokens("pope"), label, {"split": split}))
    return items


def load_hallusionbench(root: str) -> list[EvalItem]:
    rel = PATHS["hallusionbench"]
    items = []
    for n, x in enumerate(_read_json(root, rel)):
        where = f"{_uri(root, rel)} row {n}"
        filename = x.get("filename")
        images = []
        if filename:
            rel = filename[2:] if filename.startswith("./") else filename
            # the original's path, then the one an unzip straight into HallusionBench/ gives; each
            # also with .png/.PNG swapped (the release mixes them)
            candidates = []
            for c in (f"HallusionBench/hallusion_bench/{rel}", f"HallusionBench/{rel}"):
                swapped = c.replace("png", "PNG") if "png" in c else c.replace("PNG", "png")
                candidates += [_uri(root, c), _uri(root, swapped)]
            images = [next((c for c in candidates if storage.exists(c)), candidates[0])]
        items.append(EvalItem("hallusionbench", str(n), with_suffix("hallusionbench", _get(x, "question", where)),
                              images, max_new_tokens("hallusionbench"), str(_get(x, "gt_answer", where)),
                              {"category": x.get("category"), "subcategory": x.get("subcategory")}))
    return items


_MME_SHORT = "Answer the question using a single word or phrase."


def _mme_gt_file(root: str, category: str, stem: str, cache: dict) -> dict[str, str]:
    """question -> yes/no of one image's GT file (``<cat>/questions_answers_YN/<stem>.txt`` for
    the image+folder categories, ``<cat>/<stem>.txt`` for the flat ones)."""
    key = (category, stem)
    if key not in cache:
        base = PATHS["mme_dir"]
        for rel in (f"{base}/{category}/questions_answers_YN/{stem}.txt", f"{base}/{category}/{stem}.txt"):
            uri = _uri(root, rel)
            if storage.exists(uri):
                table = {}
                for n, line in enumerate(storage.read_text(uri).splitlines(), 1):
                    if not line.strip():
                        continue
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) != 2:
                        raise ValueError(f"{uri} line {n}: expected 'question<TAB>answer'")
                    table[parts[0]] = parts[1].strip().lower()
                cache[key] = table
                break
        else:
            raise FileNotFoundError(f"MME ground truth for {category}/{stem} not found under {_uri(root, base)}")
    return cache[key]


def load_mme(root: str) -> list[EvalItem]:
    rel = PATHS["mme"]
    cache: dict = {}
    items = []
    for n, x in enumerate(_read_json(root, rel)):
        where = f"{_uri(root, rel)} row {n}"
        qid, category, text = _get(x, "question_id", where), _get(x, "category", where), _get(x, "text", where)
        stem = qid.split("/")[-1].split(".")[0]
        gt = _mme_gt_file(root, category, stem, cache)
        # re-normalise the prompt to the GT file's wording (as the original evaluator did)
        key = text.replace(_MME_SHORT, "").strip() if _MME_SHORT in text else text
        if "Please answer yes or no." not in key:
            key = key + " Please answer yes or no."
            if key not in gt:
                key = key.replace(" Please answer yes or no.", "  Please answer yes or no.")
        if key not in gt:
            raise ValueError(f"{where}: question {text!r} not found in MME ground truth for {category}/{stem}")
        items.append(EvalItem("mme", str(qid), text, [_uri(root, f"{PATHS['mme_dir']}/{_get(x, 'image', where)}")],
                              max_new_tokens("mme"), gt[key], {"category": category, "image_key": stem}))
    return items


def _load_mmbench(root: str, name: str) -> list[EvalItem]:
    uri = _uri(root, PATHS[name])
    items = []
    for n, x in enumerate(_read_tsv(uri)):
        where = f"{uri} row {n + 2}"
        options = [x[c] for c in "ABCD" if c in x and not _is_missing(x[c])]
        question = "\n".join([_get(x, "question", where), _lettered(options, "\n")])
        if not _is_missing(x.get("hint")):
            question = "\n".join([x["hint"], question])
        items.append(EvalItem(name, str(_get(x, "index", where)), with_suffix(name, question),
                              [decode_cell(_get(x, "image", where), where + " field 'image'")],
                              max_new_tokens(name), (x.get("answer") or "").strip() or None,
                              {"category": x.get("category"), "l2_category": x.get("l2-category")}))
    return items


def load_mmbench_dev(root: str) -> list[EvalItem]:
    return _load_mmbench(root, "mmbench_dev")


def load_mmbench_cn_dev(root: str) -> list[EvalItem]:
    return _load_mmbench(root, "mmbench_cn_dev")


def load_mmvet(root: str) -> list[EvalItem]:
    rel = PATHS["mmvet"]
    items = []
    for qid, x in _read_json(root, rel).items():
        where = f"{_uri(root, rel)} id {qid}"
        items.append(EvalItem("mmvet", str(qid), _get(x, "question", where),
                              [_uri(root, f"mm-vet/images/{_get(x, 'imagename', where)}")],
                              max_new_tokens("mmvet"), _get(x, "answer", where),
                              {"capability": list(_get(x, "capability", where))}))
    return items


def load_mmvet_v2(root: str) -> list[EvalItem]:
    rel = PATHS["mmvet-v2"]
    items = []
    for qid, x in _read_json(root, rel).items():
        where = f"{_uri(root, rel)} id {qid}"
        parts = _get(x, "question", where).split("<IMG>")
        is_img = [(".png" in p or ".jpg" in p) for p in parts]
        question = "".join(p for p, img in zip(parts, is_img) if not img)
        images = [_uri(root, f"mm-vet-v2/images/{p}") for p, img in zip(parts, is_img) if img]
        items.append(EvalItem("mmvet-v2", str(qid), question, images, max_new_tokens("mmvet-v2"),
                              _get(x, "answer", where), {"capability": list(_get(x, "capability", where))}))
    return items


def load_mathvista(root: str) -> list[EvalItem]:
    files = [f for f in storage.list_files(_uri(root, PATHS["mathvista"]), ".parquet")
             if storage.basename(f).startswith("testmini")]
    if not files:
        raise FileNotFoundError(f"no testmini-*.parquet under {_uri(root, PATHS['mathvista'])}")
    items = []
    for uri in files:
        for n, x in enumerate(_read_parquet(uri)):
            where = f"{uri} row {n}"
            if x.get("image"):
                images = [_uri(root, f"MathVista/{x['image']}")]
            else:
                images = [decode_cell(_get(x, "decoded_image", where), where + " field 'decoded_image'")]
            items.append(EvalItem("mathvista", str(_get(x, "pid", where)), _get(x, "query", where), images,
                                  max_new_tokens("mathvista"), _get(x, "answer", where),
                                  {k: x.get(k) for k in ("question", "question_type", "answer_type", "choices",
                                                         "precision", "unit")}))
    return items


def load_mathverse(root: str) -> list[EvalItem]:
    vision_rel, text_rel = PATHS["mathverse"]
    rows = [(x, False) for x in _read_json(root, vision_rel)]
    offset = len(rows)
    if storage.exists(_uri(root, text_rel)):
        rows += [(x, True) for x in _read_json(root, text_rel)]
    items = []
    for n, (x, text_only) in enumerate(rows):
        where = f"{_uri(root, text_rel if text_only else vision_rel)} row {n - offset if text_only else n}"
        sid = _get(x, "sample_index", where)
        images = [] if text_only or not x.get("image") else [_uri(root, f"MathVerse/images/{x['image']}")]
        items.append(EvalItem("mathverse", str(int(sid) + offset) if text_only else str(sid),
                              _get(x, "query_wo", where), images, max_new_tokens("mathverse"),
                              _get(x, "answer", where),
                              {"problem_version": _get(x, "problem_version", where),
                               "question": x.get("question"), "question_type": x.get("question_type"),
                               "metadata": x.get("metadata") or {}}))
    return items


def load_llava(root: str) -> list[EvalItem]:
    base = PATHS["llava"]
    contexts = {}
    if storage.exists(_uri(root, f"{base}/context.jsonl")):
        contexts = {c["image"]: c for c in _read_jsonl(root, f"{base}/context.jsonl")}
    refs = {}
    if storage.exists(_uri(root, f"{base}/answers_gpt4.jsonl")):
        refs = {r["question_id"]: r.get("text") for r in _read_jsonl(root, f"{base}/answers_gpt4.jsonl")}
    items = []
    for n, x in enumerate(_read_jsonl(root, f"{base}/questions.jsonl")):
        where = f"{_uri(root, base + '/questions.jsonl')} line {n + 1}"
        qid, image = _get(x, "question_id", where), _get(x, "image", where)
        caption = contexts.get(image, {}).get("caption", "")
        items.append(EvalItem("llava", str(qid), _get(x, "text", where), [_uri(root, f"{base}/images/{image}")],
                              max_new_tokens("llava"), refs.get(qid),
                              {"category": x.get("category"),
                               "caption": "\n".join(caption) if isinstance(caption, list) else caption}))
    return items


def load_llava_wilder(root: str) -> list[EvalItem]:
    uri = _uri(root, PATHS["llava_wilder"])
    items = []
    for n, x in enumerate(_read_parquet(uri)):
        where = f"{uri} row {n}"
        qid = x.get("question_id") or x.get("image_name") or str(n)
        items.append(EvalItem("llava_wilder", str(qid), _get(x, "Question", where),
                              [decode_cell(_get(x, "image", where), where + " field 'image'")],
                              max_new_tokens("llava_wilder"), x.get("Answer"), {"category": "llava_wilder"}))
    return items


def load_mmstar(root: str) -> list[EvalItem]:
    uri = _uri(root, PATHS["mmstar"])
    items = []
    for n, x in enumerate(_read_parquet(uri)):
        where = f"{uri} row {n}"
        items.append(EvalItem("mmstar", str(_get(x, "index", where)), with_suffix("mmstar", _get(x, "question", where)),
                              [decode_cell(_get(x, "image", where), where + " field 'image'")],
                              max_new_tokens("mmstar"), str(_get(x, "answer", where)),
                              {"category": _get(x, "category", where), "l2_category": _get(x, "l2_category", where)}))
    return items


def load_blink(root: str) -> list[EvalItem]:
    base = _uri(root, PATHS["blink"])
    files = [f for f in storage.list_files(base, ".parquet") if storage.basename(f).startswith("val-")]
    if not files:
        raise FileNotFoundError(f"no <sub_task>/val-*.parquet under {base}")
    items = []
    for uri in files:
        for n, x in enumerate(_read_parquet(uri)):
            where = f"{uri} row {n}"
            sub_task = _get(x, "sub_task", where)
            prompt = _get(x, "prompt", where)
            if sub_task in BLINK_DISCLAIMER_TASKS:
                prompt = BLINK_DISCLAIMER + prompt
            images = [decode_cell(x[k], f"{where} field {k!r}") for k in ("image_1", "image_2", "image_3", "image_4")
                      if x.get(k) is not None]
            items.append(EvalItem("blink", str(_get(x, "idx", where)), with_suffix("blink", prompt), images,
                                  max_new_tokens("blink"), _get(x, "answer", where),
                                  {"sub_task": sub_task, "num_choices": len(x.get("choices") or [])}))
    return items


def load_cvbench(root: str) -> list[EvalItem]:
    uri = _uri(root, PATHS["cvbench"])
    items = []
    for n, x in enumerate(_read_parquet(uri)):
        where = f"{uri} row {n}"
        items.append(EvalItem("cvbench", str(_get(x, "idx", where)), with_suffix("cvbench", _get(x, "prompt", where)),
                              [decode_cell(_get(x, "image", where), where + " field 'image'")],
                              max_new_tokens("cvbench"), _get(x, "answer", where),
                              {"source": _get(x, "source", where), "task": x.get("task")}))
    return items


def visualwebbench_prompt(x: dict, where: str) -> str:
    task = _get(x, "task_type", where)
    if task not in VWB_PROMPTS:
        raise ValueError(f"{where}: unknown VisualWebBench task_type {task!r}")
    template = VWB_PROMPTS[task]
    if task == "webqa":
        return template.format(question=_get(x, "question", where))
    if task == "element_ocr":
        return template.format(bbox=list(_get(x, "bbox", where)))
    if task == "element_ground":
        return template.format(elem_desc=_get(x, "elem_desc", where))
    if task == "action_prediction":
        return template.format(bbox=list(_get(x, "bbox", where)),
                               choices_text=_lettered(list(_get(x, "options", where)), "\n"))
    if task == "action_ground":
        return template.format(instruction=_get(x, "instruction", where))
    return template


def load_visualwebbench(root: str) -> list[EvalItem]:
    base = _uri(root, PATHS["visualwebbench"])
    files = storage.list_files(base, ".parquet")
    if not files:
        raise FileNotFoundError(f"no *.parquet under {base}")
    items = []
    for uri in files:
        for n, x in enumerate(_read_parquet(uri)):
            where = f"{uri} row {n}"
            task = _get(x, "task_type", where)
            items.append(EvalItem("visualwebbench", f"{task}/{_get(x, 'id', where)}", visualwebbench_prompt(x, where),
                                  [decode_cell(_get(x, "image", where), where + " field 'image'")],
                                  max_new_tokens("visualwebbench"), _get(x, "answer", where), {"task_type": task}))
    return items


LOADERS: dict[str, Callable[[str], list[EvalItem]]] = {
    "sqa": load_sqa, "ai2d": load_ai2d, "chartqa": load_chartqa, "seed": load_seed,
    "seed-2-plus": load_seed_2_plus, "pope": load_pope, "hallusionbench": load_hallusionbench,
    "mme": load_mme, "mathvista": load_mathvista, "mmbench_dev": load_mmbench_dev,
    "mmbench_cn_dev": load_mmbench_cn_dev, "mmvet": load_mmvet, "mmvet-v2": load_mmvet_v2,
    "llava": load_llava, "llava_wilder": load_llava_wilder, "mmstar": load_mmstar,
    "mathverse": load_mathverse, "blink": load_blink, "cvbench": load_cvbench,
    "visualwebbench": load_visualwebbench,
}


def load_benchmark(name: str, data_root: str, limit: int | None = None) -> list[EvalItem]:
    """All items of one benchmark (the first ``limit`` if given), in file order."""
    items = LOADERS[canonical_name(name)](str(data_root))
    return items[:limit] if limit is not None else items
