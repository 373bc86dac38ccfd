"""An optional LLM judge over any OpenAI-compatible chat endpoint (httpx, no SDK).

Two protocols, with the prompts of FastChat's LLM-as-a-judge (`judge_prompts.jsonl`),
the evaluation FedIT ran with GPT-4 on the Vicuna questions:

- single-answer grading (`single-v1`): the judge rates one answer 1-10 and writes
  "Rating: [[N]]";
- pairwise comparison (`pair-v2`): the judge sees answers A and B and writes "[[A]]",
  "[[B]]" or "[[C]]" (tie). Each pair is judged in both orders; as in FastChat, a verdict
  that flips with the order counts as a tie.

The judge is off unless `judge.endpoint` is set. The API key is read from the environment
variable named by `judge.api_key_env` and never written anywhere. A judgment the judge
did not format as asked is counted as an error and reported, never guessed.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import os
import re
import time
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fedtune.errors import DataError, FedtuneError


class JudgeError(FedtuneError):
    """The judge endpoint could not be reached or answered with something unusable."""


SINGLE_SYSTEM = "You are a helpful assistant."
SINGLE_TEMPLATE = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
    "evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, "
    "you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for "
    "example: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]"
)
PAIR_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of the "
    "responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. After providing your explanation, output your final verdict by strictly following this format: "
    "\"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie."
)
PAIR_TEMPLATE = (
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
    "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
    "[The End of Assistant B's Answer]"
)

_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(text: str) -> float | None:
    """The 1-10 rating in a single-answer judgment, or None (FastChat's two patterns)."""
    m = _RATING.search(text) or _RATING_BACKUP.search(text)
    if not m:
        return None
    value = float(m.group(1))
    return value if 1.0 <= value <= 10.0 else None


def parse_verdict(text: str) -> str | None:
    """'A', 'B', 'tie' or None for a pairwise judgment."""
    found = [v for v in ("A", "B", "C") if f"[[{v}]]" in text]
    if len(found) != 1:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found[0]]


RETRY_STATUS = (429, 500, 502, 503, 504)
MAX_RETRY_AFTER_S = 120.0  # a Retry-After longer than this is not waited for


def retry_after_seconds(value: str | None, default: float) -> float:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), else `default`."""
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    if when is None:
        return default
    return max(0.0, when.timestamp() - time.time())


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class Judge:
    """A chat-completions client for one judge model (httpx; redirects are never followed, so
    the API key is only ever sent to judge.endpoint's own host)."""

    endpoint: str  # base URL, e.g. http://127.0.0.1:8000/v1 ; /chat/completions is appended
    model: str
    api_key: str = field(default="", repr=False)  # never printed, never logged
    timeout_s: float = 60.0  # bound on one whole request (connect, send, the full reply)
    max_tokens: int = 512
    retries: int = 2

    def __post_init__(self):
        parts = urllib.parse.urlsplit(self.endpoint)
        if self.api_key and parts.scheme == "http" and not _loopback(parts.hostname or ""):
            warnings.warn(f"judge.endpoint {self.endpoint} is plain http: the API key would cross the network "
                          "unencrypted; use https (or a loopback address you control)", stacklevel=2)

    @classmethod
    def from_config(cls, jc) -> "Judge | None":
        """The judge of a `[judge]` config section, or None when no endpoint is set."""
        if not jc.endpoint:
            return None
        return cls(jc.endpoint, jc.model, os.environ.get(jc.api_key_env, "") if jc.api_key_env else "",
                   timeout_s=jc.timeout_s, max_tokens=jc.max_tokens)

    @property
    def url(self) -> str:
        return self.endpoint.rstrip("/") + "/chat/completions"

    def _post(self, body: bytes, headers: dict) -> httpx.Response:
        """One request, the whole of it bounded by timeout_s (a server that trickles its reply
        is cut off after at most one more read timeout)."""
        deadline = time.monotonic() + self.timeout_s
        with httpx.Client(timeout=self.timeout_s, follow_redirects=False) as client:
            with client.stream("POST", self.url, content=body, headers=headers) as resp:
                chunks = []
                for chunk in resp.iter_bytes():
                    chunks.append(chunk)
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout(f"the reply took longer than judge.timeout_s = {self.timeout_s:g}s")
                resp._content = b"".join(chunks)
                return resp

    def chat(self, system: str, user: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens,
                           "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            try:
                resp = self._post(body.encode("utf-8"), headers)
            except httpx.HTTPError as e:  # connect errors, timeouts, protocol errors
                last = f"{type(e).__name__}: {e}"
                if attempt < self.retries:
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise JudgeError(f"judge endpoint {self.url} unreachable: {last} (judge.endpoint, "
                                 "judge.timeout_s)") from None
            if resp.is_redirect:
                raise JudgeError(f"judge endpoint {self.url}: HTTP {resp.status_code} redirect to "
                                 f"{resp.headers.get('location', '?')}; redirects are not followed (the API key "
                                 "would go with it): set judge.endpoint to the final URL")
            if resp.status_code >= 400:
                last = f"HTTP {resp.status_code}: {resp.content[:300].decode('utf-8', 'replace')}"
                wait = retry_after_seconds(resp.headers.get("retry-after"), 0.5 * 2**attempt)
                if resp.status_code in RETRY_STATUS and attempt < self.retries and wait <= MAX_RETRY_AFTER_S:
                    time.sleep(wait)
                    continue
                raise JudgeError(f"judge endpoint {self.url}: {last}")
            try:
                return json.loads(resp.content)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise JudgeError(f"judge endpoint {self.url}: not an OpenAI chat-completions reply: "
                                 f"{resp.content[:200].decode('utf-8', 'replace')!r}") from None
        raise JudgeError(f"judge endpoint {self.url}: {last}")  # not reached

    # ---------------------------------------------------------------- the two protocols

    def score(self, question: str, answer: str) -> tuple[float | None, str]:
        """(rating 1-10 or None if unparseable, the judgment text)."""
        text = self.chat(SINGLE_SYSTEM, SINGLE_TEMPLATE.format(question=question, answer=answer))
        return parse_rating(text), text

    def compare(self, question: str, answer_a: str, answer_b: str) -> str:
        """'A', 'B', 'tie' (also when the two orders disagree), or 'error'."""
        first = parse_verdict(self.chat(PAIR_SYSTEM, PAIR_TEMPLATE.format(
            question=question, answer_a=answer_a, answer_b=answer_b)))
        swapped = parse_verdict(self.chat(PAIR_SYSTEM, PAIR_TEMPLATE.format(
            question=question, answer_a=answer_b, answer_b=answer_a)))
        if first is None or swapped is None:
            return "error"
        second = {"A": "B", "B": "A", "tie": "tie"}[swapped]  # back in the original order
        return first if first == second else "tie"


# ----------------------------------------------------------------------------- batch helpers


def score_answers(judge: Judge, questions: list[str], answers: list[str], progress=None) -> dict:
    """Mean single-answer rating over the answers that got a parseable rating."""
    ratings = []
    errors = 0
    for q, a in zip(questions, answers):
        r, _ = judge.score(q, a)
        if r is None:
            errors += 1
        else:
            ratings.append(r)
        if progress is not None:
            progress(1)
    return {"judge_score": sum(ratings) / len(ratings) if ratings else None, "judge_scored": len(ratings),
            "judge_errors": errors}


def compare_answers(judge: Judge, questions: list[str], answers_a: list[str], answers_b: list[str],
                    progress=None) -> dict:
    """Win / tie / loss rates of A against B (errors counted apart, not in the rates)."""
    counts = {"A": 0, "B": 0, "tie": 0, "error": 0}
    for q, a, b in zip(questions, answers_a, answers_b):
        counts[judge.compare(q, a, b)] += 1
        if progress is not None:
            progress(1)
    n = counts["A"] + counts["B"] + counts["tie"]
    return {"win": counts["A"] / n if n else None, "tie": counts["tie"] / n if n else None,
            "loss": counts["B"] / n if n else None, "judged": n, "errors": counts["error"]}


def load_questions(path: str | Path, limit: int = 0) -> list[str]:
    """First-turn questions from a Vicuna / MT-Bench `question.jsonl` (`turns`) or the
    legacy Vicuna eval table (`text`)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"judge.questions: file not found: {p}")
    out = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{lineno}: malformed JSON: {e.msg}") from None
        q = (rec.get("turns") or [None])[0] if isinstance(rec, dict) and "turns" in rec else \
            rec.get("text") if isinstance(rec, dict) else None
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{p}:{lineno}: expected a question with 'turns' (list of strings) or 'text'")
        out.append(q)
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{p}: no questions")
    return out
