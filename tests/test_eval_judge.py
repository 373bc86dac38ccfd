"""The LLM judge against a small fake OpenAI-compatible server on 127.0.0.1."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fedtune import config as C
from fedtune.errors import DataError
from fedtune.eval import judge as J


class FakeJudge:
    """Serves /v1/chat/completions. Single grading: 8 for an answer containing 'good',
    else 3. Pairwise: prefers the answer containing 'good' (tie if both or neither);
    mode 'always_a' always answers [[A]] (a position-biased judge); mode 'garbage'
    never uses the format; `fail_first` answers HTTP 500 that many times first."""

    def __init__(self, mode="fair", fail_first=0, status=None):
        self.mode, self.fail_first, self.status = mode, fail_first, status
        self.requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if fake.status:
                    return self._send(fake.status, {"error": {"message": "invalid api key"}})
                if fake.fail_first > 0:
                    fake.fail_first -= 1
                    return self._send(500, {"error": "busy"})
                self._send(200, {"id": "x", "object": "chat.completion",
                                 "choices": [{"index": 0, "message": {"role": "assistant",
                                                                      "content": fake.reply(body["messages"])}}]})

            def _send(self, code, obj):
                raw = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def reply(self, messages):
        user = messages[-1]["content"]
        if self.mode == "garbage":
            return "I think both are fine."
        if "[The Start of Assistant A's Answer]" in user:
            if self.mode == "always_a":
                return "Verdict: [[A]]"
            a = user.split("[The Start of Assistant A's Answer]")[1].split("[The End of Assistant A's Answer]")[0]
            b = user.split("[The Start of Assistant B's Answer]")[1].split("[The End of Assistant B's Answer]")[0]
            ga, gb = "good" in a, "good" in b
            return "Final verdict: " + ("[[A]]" if ga and not gb else "[[B]]" if gb and not ga else "[[C]]")
        answer = user.split("[The Start of Assistant's Answer]")[1]
        return "Explanation... Rating: [[8]]" if "good" in answer else "Weak. Rating: [[3]]"

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_single_and_pairwise_against_a_fake_endpoint(monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-test")
    with FakeJudge() as srv:
        cfg = C.load(None, [f"judge.endpoint='{srv.url}'", "judge.model='judge-1'", "judge.api_key_env='FAKE_JUDGE_KEY'"])
        judge = J.Judge.from_config(cfg.judge)
        rating, text = judge.score("Q?", "a good answer")
        assert rating == 8.0 and "[[8]]" in text
        req = srv.requests[-1]
        assert req["path"] == "/v1/chat/completions"
        assert req["headers"]["Authorization"] == "Bearer sk-test"
        assert req["body"]["model"] == "judge-1" and req["body"]["temperature"] == 0.0
        assert req["body"]["messages"][0] == {"role": "system", "content": J.SINGLE_SYSTEM}
        assert "[Question]\nQ?" in req["body"]["messages"][1]["content"]

        assert judge.compare("Q?", "good", "bad") == "A"
        assert judge.compare("Q?", "bad", "good") == "B"
        assert judge.compare("Q?", "good too", "good") == "tie"
        # both orders are asked: the second request has the answers swapped
        last_two = [r["body"]["messages"][1]["content"] for r in srv.requests[-2:]]
        assert "Assistant A's Answer]\ngood too" in last_two[0] and "Assistant A's Answer]\ngood\n" in last_two[1]

        qs = ["q1", "q2", "q3", "q4"]
        s = J.score_answers(judge, qs, ["good", "bad", "good", "bad"])
        assert s == {"judge_score": 5.5, "judge_scored": 4, "judge_errors": 0}
        p = J.compare_answers(judge, qs, ["good", "good", "bad", "good"], ["bad", "good", "good", "bad"])
        assert p == {"win": 0.5, "tie": 0.25, "loss": 0.25, "judged": 4, "errors": 0}


def test_a_verdict_that_flips_with_the_order_is_a_tie_and_garbage_is_an_error():
    with FakeJudge(mode="always_a") as srv:
        assert J.Judge(srv.url, "m").compare("Q", "x", "y") == "tie"
    with FakeJudge(mode="garbage") as srv:
        j = J.Judge(srv.url, "m")
        assert j.compare("Q", "x", "y") == "error"
        assert j.score("Q", "x")[0] is None
        s = J.score_answers(j, ["q"], ["a"])
        assert s["judge_score"] is None and s["judge_errors"] == 1


def test_retries_then_clear_errors():
    with FakeJudge(fail_first=2) as srv:
        assert J.Judge(srv.url, "m", retries=2).score("Q", "good")[0] == 8.0
        assert len(srv.requests) == 3
    with FakeJudge(status=401) as srv:
        with pytest.raises(J.JudgeError, match="HTTP 401: .*invalid api key"):
            J.Judge(srv.url, "m").score("Q", "a")
        assert len(srv.requests) == 1  # 401 is not retried
    with FakeJudge() as srv:
        port = srv.server.server_address[1]
    with pytest.raises(J.JudgeError, match="unreachable"):
        J.Judge(f"http://127.0.0.1:{port}/v1", "m", retries=0, timeout_s=2).score("Q", "a")


def test_off_unless_configured_and_config_checks():
    assert J.Judge.from_config(C.load(None).judge) is None
    with pytest.raises(Exception, match="judge.model"):
        C.load(None, ["judge.endpoint='http://127.0.0.1:1/v1'"])
    with pytest.raises(Exception, match="http"):
        C.load(None, ["judge.endpoint='127.0.0.1:1'", "judge.model='m'"])


def test_parsers():
    assert J.parse_rating("Rating: [[7]]") == 7.0 and J.parse_rating("[[7.5]]") == 7.5
    assert J.parse_rating("score [6]") == 6.0 and J.parse_rating("none") is None and J.parse_rating("[[11]]") is None
    assert J.parse_verdict("[[B]]") == "B" and J.parse_verdict("[[C]]") == "tie"
    assert J.parse_verdict("[[A]] or [[B]]") is None and J.parse_verdict("A") is None


def test_load_questions_reads_vicuna_formats(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "turns": ["How?", "Then?"]}\n{"question_id": 2, "turns": ["Why?"]}\n')
    (tmp_path / "legacy.jsonl").write_text('{"question_id": 1, "text": "What?", "category": "generic"}\n')
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1}\n')
    assert J.load_questions(tmp_path / "q.jsonl") == ["How?", "Why?"]
    assert J.load_questions(tmp_path / "q.jsonl", limit=1) == ["How?"]
    assert J.load_questions(tmp_path / "legacy.jsonl") == ["What?"]
    with pytest.raises(DataError, match="bad.jsonl:1"):
        J.load_questions(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="not found"):
        J.load_questions(tmp_path / "none.jsonl")


# ----------------------------------------------------------------------------- the HTTP client's safety


class Scripted:
    """A loopback server whose replies are scripted per request: (status, headers, body bytes,
    seconds between bytes)."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                srv.requests.append(dict(self.headers))
                status, headers, body, trickle = srv.script.pop(0) if srv.script else (200, {}, OK, 0)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not trickle:
                    self.wfile.write(body)
                    return
                for i in range(len(body)):  # one byte at a time, until the client gives up
                    try:
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                    except OSError:
                        return
                    srv.stop.wait(trickle)

        self.stop = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.stop.set()
        self.server.shutdown()


OK = json.dumps({"choices": [{"message": {"content": "Rating: [[7]]"}}]}).encode()


def test_a_redirect_is_not_followed_so_the_key_never_reaches_another_host():
    other = Scripted([])
    first = Scripted([(307, {"Location": other.url + "/chat/completions"}, b"", 0)])
    try:
        judge = J.Judge(first.url, "m", api_key="sk-secret-123")
        with pytest.raises(J.JudgeError, match="redirect .* not followed"):
            judge.chat("s", "u")
        assert other.requests == []  # the other host never saw a request, let alone the key
        assert first.requests[0]["Authorization"] == "Bearer sk-secret-123"
    finally:
        first.close(), other.close()


def test_the_key_is_not_in_repr_and_plain_http_to_a_remote_host_warns():
    judge = J.Judge("http://127.0.0.1:9/v1", "m", api_key="sk-secret-123")
    assert "sk-secret-123" not in repr(judge) and "sk-secret-123" not in str(judge)
    with pytest.warns(UserWarning, match="plain http"):
        J.Judge("http://judge.example.org/v1", "m", api_key="sk-secret-123")


def test_retry_after_is_honoured_and_a_long_one_is_not_waited_for():
    srv = Scripted([(429, {"Retry-After": "0"}, b"slow down", 0), (200, {}, OK, 0)])
    try:
        assert J.Judge(srv.url, "m").chat("s", "u") == "Rating: [[7]]" and len(srv.requests) == 2
    finally:
        srv.close()
    srv = Scripted([(503, {"Retry-After": "3600"}, b"maintenance", 0)])
    try:
        with pytest.raises(J.JudgeError, match="HTTP 503"):
            J.Judge(srv.url, "m").chat("s", "u")
        assert len(srv.requests) == 1  # an hour is not waited for: the error says so at once
    finally:
        srv.close()
    assert J.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 5.0) == 0.0  # a date in the past
    assert J.retry_after_seconds(None, 5.0) == 5.0 and J.retry_after_seconds("junk", 5.0) == 5.0


def test_the_timeout_bounds_the_whole_request_not_each_read():
    srv = Scripted([(200, {}, OK, 0.15)] * 3)  # every byte arrives well within a per-read timeout
    try:
        judge = J.Judge(srv.url, "m", timeout_s=0.5, retries=0)
        with pytest.raises(J.JudgeError, match="longer than judge.timeout_s"):
            judge.chat("s", "u")
    finally:
        srv.close()
