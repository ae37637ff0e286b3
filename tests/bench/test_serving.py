"""`specserve bench serve` (bench/serving.py): flags, datasets, arrival schedule, metrics, and a whole
run against a fake OpenAI-compatible streaming server started in-process."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import socket
import statistics
import threading
from pathlib import Path

import pytest

from bench import cli, prompts, serving
from bench.serving import Lengths, RequestOutput, arrival_times, calculate_metrics, parse_args

URL = ["--base-url", "http://127.0.0.1:1"]


# --- Flags ---------------------------------------------------------------------------------------

def test_every_flag_parses():
    args = parse_args([
        "--base-url", "http://h:9", "--endpoint", "/v1/chat/completions", "--model", "m", "--tokenizer", "/tok",
        "--dataset-name", "sharegpt", "--dataset-path", "/d.json", "--num-prompts", "7", "--output-len", "9",
        "--random-input-len", "11", "--random-output-len", "12", "--max-input-len", "100", "--max-output-len", "50",
        "--request-rate", "2.5", "--burstiness", "0.5", "--max-concurrency", "3", "--goodput", "ttft:500",
        "tpot:50", "e2el:3000", "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,99.9",
        "--num-warmups", "2", "--save-result", "--result-dir", "/r", "--result-filename", "f.json", "--seed", "4",
        "--ignore-eos", "--temperature", "0.7", "--disable-tqdm"])
    assert (args.base_url, args.endpoint, args.model, args.tokenizer) == ("http://h:9", "/v1/chat/completions", "m", "/tok")
    assert (args.dataset_name, args.dataset_path, args.num_prompts, args.output_len) == ("sharegpt", "/d.json", 7, 9)
    assert (args.random_input_len, args.random_output_len, args.max_input_len, args.max_output_len) == (11, 12, 100, 50)
    assert (args.request_rate, args.burstiness, args.max_concurrency) == (2.5, 0.5, 3)
    assert args.goodput == {"ttft": 500.0, "tpot": 50.0, "e2el": 3000.0}
    assert args.percentile_metrics == ["ttft", "e2el"] and args.metric_percentiles == [50.0, 99.9]
    assert (args.num_warmups, args.save_result, args.result_dir, args.result_filename) == (2, True, "/r", "f.json")
    assert (args.seed, args.ignore_eos, args.temperature, args.disable_tqdm) == (4, True, 0.7, True)
    ramp = parse_args([*URL, "--ramp-up-strategy", "exponential", "--ramp-up-start-rps", "1",
                       "--ramp-up-end-rps", "8"])
    assert (ramp.ramp_up_strategy, ramp.ramp_up_start_rps, ramp.ramp_up_end_rps) == ("exponential", 1.0, 8.0)


def test_defaults_follow_vllm():
    args = parse_args(URL)
    assert args.endpoint == "/v1/completions" and args.model is None and args.request_rate == math.inf
    assert args.burstiness == 1.0 and args.max_concurrency is None and args.goodput == {}
    assert args.percentile_metrics == ["ttft", "tpot", "itl"] and args.metric_percentiles == [99.0]
    assert (args.max_input_len, args.max_output_len, args.temperature, args.num_prompts) == (2048, 256, 0.0, 1000)


@pytest.mark.parametrize("argv", [
    [],  # --base-url is required
    [*URL, "--goodput", "ttft=5"],
    [*URL, "--goodput", "latency:5"],
    [*URL, "--percentile-metrics", "ttft,nope"],
    [*URL, "--burstiness", "0"],
    [*URL, "--max-concurrency", "0"],
    [*URL, "--ramp-up-strategy", "linear", "--ramp-up-start-rps", "1"],
    [*URL, "--ramp-up-strategy", "linear", "--ramp-up-start-rps", "1", "--ramp-up-end-rps", "2", "--request-rate", "3"],
    [*URL, "--ramp-up-strategy", "exponential", "--ramp-up-start-rps", "4", "--ramp-up-end-rps", "2"],
    [*URL, "--dataset-name", "azure-code"],
    [*URL, "--dataset-name", "random", "--endpoint", "/v1/chat/completions"],
])
def test_bad_flags_are_refused(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_bench_cli_hands_serve_over_and_keeps_its_own_options(monkeypatch):
    seen = []
    monkeypatch.setattr(serving, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["serve", *URL]) == 0 and seen == [URL]
    args = cli.build_parser().parse_args(["runtime", "--parts", "serve", "--workload", "edits", "--rounds", "2"])
    assert (args.which, args.parts, args.workload, args.rounds) == ("runtime", "serve", "edits", 2)
    with pytest.raises(SystemExit):
        cli.main(["--quick", "serve"])  # serve's flags are its own: it must come first


# --- Datasets ------------------------------------------------------------------------------------

CONVERSATIONS = [
    {"id": "a", "conversations": [{"from": "human", "value": "Explain recursion to a child, please, briefly."},
                                  {"from": "gpt", "value": "Recursion is when a function calls itself. " * 5}]},
    {"id": "b", "conversations": [{"from": "gpt", "value": "I speak first, so vLLM's filter drops me."},
                                  {"from": "human", "value": "ok"}]},
    {"id": "c", "conversations": [{"from": "human", "value": "A lone turn with no answer is dropped too."}]},
    {"id": "d", "conversations": [{"from": "human", "value": "Write a haiku about autumn leaves falling down."},
                                  {"from": "gpt", "value": "Red leaves drift and fall / the wind carries them away "
                                                           "/ autumn says goodbye"}]},
]


def _truncated_sharegpt(path: Path) -> Path:
    text = json.dumps(CONVERSATIONS + [{"id": "e", "conversations": [{"from": "human", "value": "cut"}]}], indent=2)
    path.write_text(text[: text.rindex('"cut"') + 2])  # cut off inside the last conversation, as the package's file
    return path


def test_sharegpt_recovers_the_complete_conversations_of_a_truncated_file(tmp_path):
    path = _truncated_sharegpt(tmp_path / "sg.json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text())
    # A tiny chunk makes every element span several reads.
    assert [c["id"] for c in prompts.json_array_items(path, chunk_chars=7)] == ["a", "b", "c", "d"]
    pairs = prompts.sharegpt(path)
    assert [p for p, _ in pairs] == [CONVERSATIONS[0]["conversations"][0]["value"],
                                     CONVERSATIONS[3]["conversations"][0]["value"]]
    args = parse_args([*URL, "--dataset-name", "sharegpt", "--dataset-path", str(path), "--num-prompts", "5",
                       "--max-output-len", "20"])
    requests = serving.load_dataset(args, Lengths(None))
    assert len(requests) == 5  # two conversations, cycled
    assert all(r.prompt_len > 0 and 0 < r.output_len <= 20 for r in requests)
    assert max(r.output_len for r in requests) == 20  # the long reply is capped


def test_sharegpt_reads_the_packaged_file():
    path = prompts.sharegpt_file()
    first = list(itertools.islice(prompts.json_array_items(path), 3))
    assert len(first) == 3 and all("conversations" in c for c in first)


def _assert_within(requests, n: int, max_input: int, max_output: int) -> None:
    assert len(requests) == n
    assert all(0 < r.prompt_len <= max_input and 0 < r.output_len <= max_output for r in requests)


@pytest.mark.parametrize("name", ["mt-bench", "humaneval", "humaneval-edit"])
def test_text_datasets_respect_the_caps(name):
    args = parse_args([*URL, "--dataset-name", name, "--num-prompts", "30", "--max-input-len", "200",
                       "--max-output-len", "64"])
    requests = serving.load_dataset(args, Lengths(None))
    _assert_within(requests, 30, 200, 64)
    assert all(isinstance(r.prompt, str) and r.prompt for r in requests)
    if name == "mt-bench":  # no answer in the data: the output length is the cap unless --output-len
        assert {r.output_len for r in requests} == {64}


def test_humaneval_edits_ask_for_each_kind_of_edit():
    edits = prompts.humaneval_edits()
    asks = [q.split(" in this code")[0] for q, _ in edits]
    assert sum(a.startswith("Rename the variable") for a in asks) > 40
    assert sum(a.startswith("Add type hints") for a in asks) > 40
    assert sum(a.startswith("Add a docstring") for a in asks) > 40
    hints = next(q for q, _ in edits if "separate_paren_groups" in q.split("\n")[0])
    assert "def separate_paren_groups(paren_string):" in hints  # the hints were taken out
    for question, answer in edits:
        assert question != answer and len(answer) > 20


def test_random_prompts_have_the_asked_lengths():
    args = parse_args([*URL, "--dataset-name", "random", "--num-prompts", "5", "--random-input-len", "300",
                       "--random-output-len", "400", "--max-input-len", "100", "--max-output-len", "64"])
    requests = serving.load_dataset(args, Lengths(None))
    _assert_within(requests, 5, 100, 64)
    assert all(len(r.prompt) == r.prompt_len == 100 and r.output_len == 64 for r in requests)
    assert requests[0].prompt != requests[1].prompt


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer.json, as a model folder holds one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(prompts.mt_bench()[:20], trainer)
    folder = tmp_path_factory.mktemp("tok")
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_lengths_with_a_tokenizer_fit_prompts_to_the_token(tokenizer_dir):
    lengths = Lengths(str(tokenizer_dir))
    text = prompts.mt_bench()[0]
    for n in (5, 40, 3 * lengths.count(text)):
        assert abs(lengths.count(lengths.fit(text, n)) - n) <= 2
    ids = lengths.random_ids(serving.random.Random(0), 50)
    assert all(0 < i < 300 for i in ids)  # never the special token (id 0)


def _azure(folder: Path, name: str) -> Path:
    rows = [(f"2023-11-16 18:00:{s:02d}.5000000", c, g)
            for s, c, g in [(0, 900, 30), (2, 50, 0), (3, 5000, 700), (8, 120, 12)]]
    (folder / name).write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{t},{c},{g}\n" for t, c, g in rows))
    return folder


@pytest.mark.parametrize("name", ["azure-code", "azure-conv"])
def test_azure_traces_give_arrival_times_and_capped_lengths(tmp_path, name, tokenizer_dir):
    _azure(tmp_path, serving.TRACE_FILES[name])
    base = [*URL, "--dataset-name", name, "--dataset-path", str(tmp_path), "--num-prompts", "3",
            "--max-input-len", "1000", "--max-output-len", "256"]
    requests = serving.load_dataset(parse_args(base), Lengths(None))
    _assert_within(requests, 3, 1000, 256)
    assert [r.at for r in requests] == pytest.approx([0.0, 2.0, 3.0])
    assert [(r.prompt_len, r.output_len) for r in requests] == [(900, 30), (50, 1), (1000, 256)]
    # At 2 requests/s the same pattern spans (3 - 1) / 2 = 1 s.
    faster = serving.load_dataset(parse_args([*base, "--request-rate", "2"]), Lengths(None))
    assert [r.at for r in faster] == pytest.approx([0.0, 2 / 3, 1.0])
    fitted = serving.load_dataset(parse_args(base), Lengths(str(tokenizer_dir)))
    assert [r.prompt_len for r in fitted] == pytest.approx([900, 50, 1000], abs=2)


# --- Arrivals ------------------------------------------------------------------------------------

def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip([0.0, *times], times)]


def test_arrivals_average_the_rate_and_burstiness_sets_their_spread():
    gaps = {b: _gaps(arrival_times(4000, rate=5.0, burstiness=b, seed=1)) for b in (0.5, 1.0, 4.0)}
    for b, g in gaps.items():
        assert statistics.mean(g) == pytest.approx(0.2, rel=0.01)
        # Gamma gaps: the squared coefficient of variation is 1 / shape (1 for Poisson arrivals).
        assert statistics.variance(g) / statistics.mean(g) ** 2 == pytest.approx(1 / b, rel=0.15)
    assert arrival_times(5, rate=5.0, seed=1) == arrival_times(5, rate=5.0, seed=1)
    assert arrival_times(5, rate=math.inf) == [0.0] * 5


@pytest.mark.parametrize("ramp", ["linear", "exponential"])
def test_ramp_up_raises_the_rate(ramp):
    n = 3000
    assert serving.request_rate_at(0, n, math.inf, ramp, 1.0, 16.0) == 1.0
    assert serving.request_rate_at(n - 1, n, math.inf, ramp, 1.0, 16.0) == pytest.approx(16.0)
    gaps = _gaps(arrival_times(n, rate=math.inf, ramp=ramp, start_rps=1.0, end_rps=16.0, seed=2))
    first, last = statistics.mean(gaps[: n // 10]), statistics.mean(gaps[-n // 10 :])
    assert first > 3 * last
    assert last == pytest.approx(1 / 16, rel=0.2)


# --- Metrics -------------------------------------------------------------------------------------

def _outputs() -> list[RequestOutput]:
    return [
        # 4 tokens: TTFT 100 ms, gaps 20, 30, 50 ms, E2E 200 ms, so TPOT (200 - 100) / 3 ms.
        RequestOutput(10, True, 4, 0.100, [0.020, 0.030, 0.050], 0.200),
        # One token: no TPOT of its own (0 for goodput), TTFT = E2E = 300 ms.
        RequestOutput(20, True, 1, 0.300, [], 0.300),
        RequestOutput(30, False, error="HTTP 503: busy"),
    ]


def test_metrics_follow_vllms_definitions():
    r = calculate_metrics(_outputs(), 2.0, [50, 99.9], {}, ["ttft", "tpot", "itl", "e2el"])
    assert (r["completed"], r["failed"], r["total_input_tokens"], r["total_output_tokens"]) == (2, 1, 30, 5)
    assert r["request_throughput"] == 1.0 and r["output_throughput"] == 2.5 and r["total_token_throughput"] == 17.5
    assert r["request_goodput"] is None
    assert r["mean_ttft_ms"] == pytest.approx(200) and r["median_ttft_ms"] == pytest.approx(200)
    assert r["std_ttft_ms"] == pytest.approx(100)
    assert r["mean_tpot_ms"] == pytest.approx(100 / 3)  # the one-token request has no TPOT
    assert r["mean_itl_ms"] == pytest.approx(100 / 3) and r["median_itl_ms"] == pytest.approx(30)
    assert r["mean_e2el_ms"] == pytest.approx(250)
    assert r["p50_e2el_ms"] == pytest.approx(250) and r["p99.9_e2el_ms"] == pytest.approx(299.9)
    assert r["input_lens"] == [10, 20, 30] and r["output_lens"] == [4, 1, 0] and r["errors"][2] == "HTTP 503: busy"
    assert r["ttfts"] == [0.1, 0.3, 0.0] and r["itls"][0] == [0.020, 0.030, 0.050]
    only = calculate_metrics(_outputs(), 2.0, [99], {}, ["ttft"])
    assert "mean_tpot_ms" not in only and "p99_ttft_ms" in only


@pytest.mark.parametrize(("slos", "good"), [
    ({"ttft": 200}, 1),  # 100 ms yes, 300 ms no
    ({"ttft": 300}, 2),
    ({"tpot": 30}, 1),  # 33.3 ms no; the one-token request's TPOT counts 0
    ({"tpot": 40, "e2el": 250}, 1),
    ({"e2el": 100}, 0),
])
def test_goodput_counts_requests_within_every_slo(slos, good):
    assert calculate_metrics(_outputs(), 2.0, [99], slos, ["ttft"])["request_goodput"] == good / 2.0


def test_no_success_reports_zeros():
    r = calculate_metrics([RequestOutput(5, error="x")], 1.0, [99], {"ttft": 1}, ["ttft", "itl"])
    assert (r["completed"], r["failed"], r["mean_ttft_ms"], r["p99_itl_ms"], r["request_goodput"]) == (0, 1, 0, 0, 0)


# --- A whole run ---------------------------------------------------------------------------------

PIECES = ["Hello", " there", ",", " friend", "."]
USAGE_TOKENS = 7  # differs from the chunk count, so the test sees which one was used


def _fake_app(received: list[tuple[str, dict]]):
    """Streams PIECES; /v1/completions ends with usage, the chat endpoint (after a role-only chunk,
    which carries no token) without it."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"},
                                                        {"id": "other", "object": "model"}]})

    async def generate(request):
        body = await request.json()
        chat = request.url.path.endswith("/chat/completions")
        received.append((request.url.path, body))

        async def events():
            if chat:
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
            for piece in PIECES:
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            if not chat:
                usage = {"prompt_tokens": 3, "completion_tokens": USAGE_TOKENS, "total_tokens": 3 + USAGE_TOKENS}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", generate, methods=["POST"]),
                             Route("/v1/chat/completions", generate, methods=["POST"])])


@pytest.fixture
def fake_server():
    """The fake server on a free localhost port; its socket listens before the server thread starts,
    so requests wait in the backlog rather than fail."""
    import uvicorn

    received: list[tuple[str, dict]] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(_fake_app(received), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", received
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.mark.parametrize(("endpoint", "dataset", "tokens"), [
    ("/v1/completions", "random", USAGE_TOKENS),  # from the final usage
    ("/v1/chat/completions", "mt-bench", len(PIECES)),  # no usage: the content chunks
])
def test_a_whole_run_against_a_fake_server(fake_server, tmp_path, monkeypatch, capsys, endpoint, dataset, tokens):
    url, received = fake_server
    monkeypatch.setattr(serving, "machine", lambda: {"cpu_flags": ["avx2"]})
    argv = ["serve", "--base-url", url, "--endpoint", endpoint, "--dataset-name", dataset, "--num-prompts", "6",
            "--random-input-len", "16", "--max-output-len", "32", "--max-concurrency", "2", "--num-warmups", "1",
            "--goodput", "ttft:60000", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--ignore-eos", "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path),
            "--result-filename", "out.json"]
    assert cli.main(argv) == 0

    printed = capsys.readouterr().out
    assert "============ Serving Benchmark Result ============" in printed
    assert "\nSuccessful requests:" + " " * 21 + "6" in printed and "P99 ITL (ms):" in printed
    r = json.loads((tmp_path / "out.json").read_text())
    assert (r["completed"], r["failed"], r["total_output_tokens"]) == (6, 0, 6 * tokens)
    assert r["output_lens"] == [tokens] * 6 and r["errors"] == [""] * 6
    assert all(len(gaps) == len(PIECES) - 1 for gaps in r["itls"]) and all(t > 0 for t in r["ttfts"])
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])
    assert (r["model_id"], r["base_url"], r["dataset_name"], r["machine"]) == ("fake-model", url, dataset,
                                                                                {"cpu_flags": ["avx2"]})
    assert r["request_rate"] == "inf" and r["date"] and r["max_concurrency"] == 2
    for key in ("mean_ttft_ms", "median_tpot_ms", "std_itl_ms", "p50_e2el_ms", "p99_ttft_ms", "output_throughput",
                "total_token_throughput", "total_input_tokens", "input_lens", "latencies"):
        assert key in r
    assert len(received) == 7  # a warm-up and the six
    path, body = received[-1]
    assert path == endpoint and body["model"] == "fake-model" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    assert body["temperature"] == 0.0 and 0 < body["max_tokens"] <= 32
    if dataset == "random":
        assert len(body["prompt"]) == 16 and all(isinstance(i, int) for i in body["prompt"])
    else:
        assert body["messages"][0]["role"] == "user" and body["max_tokens"] == 32


def test_a_failing_server_counts_failures(fake_server, capsys):
    url, _ = fake_server
    args = parse_args(["--base-url", url, "--endpoint", "/v1/completions", "--model", "m", "--dataset-name",
                       "random", "--num-prompts", "3", "--random-input-len", "4", "--disable-tqdm"])
    args.endpoint = "/v1/missing"  # past the parser's choices: every request gets a 404
    r = asyncio.run(serving.run(args))
    assert (r["completed"], r["failed"]) == (0, 3) and all(e.startswith("HTTP 404") for e in r["errors"])
