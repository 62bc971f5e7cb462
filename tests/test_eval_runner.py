"""run_eval end to end on two synthetic benchmarks (fake predict_fn: this tests the runner, not a
model), the CLI verb, S3 in/out, and the judge client against a mock OpenAI-compatible server."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import httpx
import pytest

from phantom_ray import storage
from eval_synthetic import write_synthetic_benchmark
from phantom_ray.eval import load_benchmark, run_eval, score_benchmark
from phantom_ray.eval.judge import SKIP_MESSAGE, JudgeClient, JudgeConfig, JudgeError, judge_from_env

DATA = Path(__file__).parent / "data" / "eval"


@pytest.fixture
def synthetic(tmp_path):
    root = str(tmp_path / "data")
    answers = {**write_synthetic_benchmark(root, "pope", 3), **write_synthetic_benchmark(root, "sqa", 4)}
    return root, answers


def test_run_eval_writes_predictions_and_tables(synthetic, tmp_path):
    root, answers = synthetic
    out = str(tmp_path / "out")
    seen = []

    def predict(items):
        seen.append((items[0].benchmark, len(items), {i.max_new_tokens for i in items}))
        return [answers[i.id] for i in items]

    results = run_eval("pope,sqa", root, out, predict, model="BK-Lee/Phantom-0.5B")
    assert seen == [("pope", 9, {5}), ("sqa", 4, {5})]
    rows = {r["benchmark"]: r for r in results["results"]}
    assert rows["pope"]["score"] == 100.0 and rows["sqa"]["score"] == 100.0
    assert rows["sqa"]["paper"] == 83.2 and rows["pope"]["paper"] is None  # docs/phantom.md#evaluation; size from the name
    assert json.loads(Path(out, "results.json").read_text()) == results
    md = Path(out, "results.md").read_text()
    assert "| sqa | accuracy | 4 | 100.0 | 83.2 |" in md
    preds = [json.loads(x) for x in Path(out, "predictions", "sqa.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and preds[0]["scoring"]["correct"] is True and preds[0]["prediction"] == answers[preds[0]["id"]]


def test_run_eval_wrong_predictor_gets_hand_computed_score(synthetic, tmp_path):
    root, _ = synthetic
    results = run_eval(["pope", "sqa"], root, str(tmp_path / "out"), lambda items: ["No"] * len(items))
    rows = {r["benchmark"]: r for r in results["results"]}
    # synthetic POPE labels per split (n=3): adversarial yes/no/yes, popular no/yes/no, random yes/no/yes
    assert rows["pope"]["breakdown"]["popular/accuracy"] == pytest.approx(200 / 3)
    assert rows["pope"]["score"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 3) / 3 * 100)
    assert rows["sqa"]["score"] == 0.0  # "No" parses to no letter


def test_run_eval_rejects_bad_predict_fn(synthetic, tmp_path):
    root, _ = synthetic
    with pytest.raises(ValueError, match="returned 1 answers for 9 items"):
        run_eval("pope", root, str(tmp_path / "o"), lambda items: ["yes"])


def test_judge_benchmark_is_skipped_without_judge(tmp_path, monkeypatch):
    monkeypatch.delenv("PHANTOM_JUDGE_BASE_URL", raising=False)
    monkeypatch.delenv("PHANTOM_JUDGE_API_KEY", raising=False)
    assert judge_from_env() is None
    results = run_eval("mmvet", str(DATA), str(tmp_path / "o"), lambda items: ["x"] * len(items))
    row = results["results"][0]
    assert row["score"] is None and row["skipped"] == SKIP_MESSAGE and "PHANTOM_JUDGE_BASE_URL" in SKIP_MESSAGE
    assert Path(tmp_path, "o", "predictions", "mmvet.jsonl").exists()  # predictions kept for later scoring
    assert SKIP_MESSAGE in Path(tmp_path, "o", "results.md").read_text()


def _mock_judge(reply_fn, calls):
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append((request, body))
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": reply_fn(body)}}]})
    return JudgeClient(JudgeConfig("http://judge.test/v1", "sk-test", model="grader", retry_wait_s=0.0),
                       transport=httpx.MockTransport(handler))


def test_mmvet_with_mock_judge_retries_unparseable_grades():
    items = load_benchmark("mmvet", str(DATA))
    calls = []
    state = {"garbage_sent": False}

    def reply(body):
        prompt = body["messages"][-1]["content"]
        if "-1  <AND>  -5 | x = -1 | " in prompt:  # the graded row (double spaces), not the few-shot table
            return "0.5"
        if not state["garbage_sent"]:
            state["garbage_sent"] = True
            return "Correctness"
        return "1.0"

    judge = _mock_judge(reply, calls)
    score = score_benchmark("mmvet", items, ["x = -1", "a kitten"], judge)
    req, body = calls[0]
    assert str(req.url) == "http://judge.test/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-test" and body["model"] == "grader"
    assert "What is x in the equation? | -1  <AND>  -5 | x = -1 | " in body["messages"][0]["content"]
    assert len(calls) == 3 and calls[2][1]["temperature"] == 0.5  # retried once, warmer
    assert [r["grade"] for r in score.per_item] == [0.5, 1.0]
    assert score.score == pytest.approx(75.0)
    assert score.breakdown == {"rec": pytest.approx(75.0), "ocr": pytest.approx(50.0)}


def test_llava_relative_score_with_mock_judge():
    items = load_benchmark("llava", str(DATA))
    calls = []
    judge = _mock_judge(lambda b: "8 6\nAssistant 1 is better." if "famous sight" in b["messages"][1]["content"]
                        else "10 10\nEqual.", calls)
    score = score_benchmark("llava", items, ["A mountain.", "A crater by the sea."], judge)
    assert calls[0][1]["messages"][0]["role"] == "system" and calls[0][1]["temperature"] == 0.2
    assert "[Context]\nThe Diamond Head crater at Waikiki.\n\n[Question]\nWhat is the name" in calls[0][1]["messages"][1]["content"]
    assert score.breakdown["conv"] == pytest.approx(75.0) and score.breakdown["detail"] == pytest.approx(100.0)
    assert score.score == pytest.approx(100 * 16 / 18)


def test_judge_client_errors(monkeypatch):
    n = {"calls": 0}

    def handler(request):
        n["calls"] += 1
        return httpx.Response(503, text="busy") if n["calls"] < 3 else httpx.Response(401, text="bad key")

    judge = JudgeClient(JudgeConfig("http://judge.test/v1", "k", max_retries=5, retry_wait_s=0.0),
                        transport=httpx.MockTransport(handler))
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge.ask("hi")
    assert n["calls"] == 3  # 503s retried, 401 not
    with pytest.raises(ValueError, match="PHANTOM_JUDGE_BASE_URL must be an http"):
        judge_from_env({"PHANTOM_JUDGE_BASE_URL": "judge.test", "PHANTOM_JUDGE_API_KEY": "k"})
    client = judge_from_env({"PHANTOM_JUDGE_BASE_URL": "http://j/v1", "PHANTOM_JUDGE_API_KEY": "k"})
    assert client.config.model == "gpt-4-0613"


def test_cli_eval_with_plugged_generator(synthetic, tmp_path, monkeypatch, capsys):
    from phantom_ray.cli import main

    root, answers = synthetic
    got = {}

    def make_predict_fn(model, num_beams=1, batch_size=8):
        got.update(model=model, num_beams=num_beams)
        return lambda items: [answers[i.id] for i in items]

    monkeypatch.setitem(sys.modules, "phantom_ray.eval.predict", types.SimpleNamespace(make_predict_fn=make_predict_fn))
    out = str(tmp_path / "cli_out")
    rc = main(["eval", "--model", "tiny-qwen2", "--benchmarks", "sqa,pope", "--data-root", root,
               "--output", out, "--num-beams", "3", "--limit", "2"])
    assert rc == 0 and got == {"model": "tiny-qwen2", "num_beams": 3}
    results = json.loads(Path(out, "results.json").read_text())
    assert [r["n"] for r in results["results"]] == [2, 2] and results["settings"]["num_beams"] == 3
    assert "| sqa | accuracy | 2 | 100.0 |" in capsys.readouterr().out


def test_cli_eval_without_generator_says_so(synthetic, tmp_path, monkeypatch, capsys):
    from phantom_ray.cli import main

    root, _ = synthetic
    monkeypatch.setitem(sys.modules, "phantom_ray.eval.predict", None)  # import fails
    rc = main(["eval", "--model", "m", "--benchmarks", "pope", "--data-root", root, "--output", str(tmp_path / "o")])
    assert rc == 2 and "phantom_ray.eval.predict.make_predict_fn" in capsys.readouterr().err
    assert main(["eval", "--model", "m", "--benchmarks", "nope", "--data-root", root, "--output", "o"]) == 2


def test_run_eval_s3_in_and_out(s3_bucket):
    root, out = f"{s3_bucket}/eval_data", f"{s3_bucket}/runs/r1"
    answers = write_synthetic_benchmark(root, "sqa", 3)
    results = run_eval("sqa", root, out, lambda items: [answers[i.id] for i in items])
    assert results["results"][0]["score"] == 100.0
    assert load_benchmark("sqa", root)[0].images[0].startswith(f"{root}/ScienceQA/images/test/")
    assert json.loads(storage.read_text(f"{out}/results.json"))["results"][0]["n"] == 3
    assert storage.exists(f"{out}/predictions/sqa.jsonl") and storage.exists(f"{out}/results.md")
