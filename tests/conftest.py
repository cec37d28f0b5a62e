"""Shared fixtures: tiny corpora and runs made in tmp_path; real data from ../shared/data, else lmforge's hub."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmforge.chat import Assistant
from lmforge.config import ModelConfig, TokenizerConfig
from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "A stitch in time saves nine. Where there is a will, there is a way. "
    "All that glitters is not gold; the early bird catches the worm.\n"
)


# Files of ../shared/data that lmforge's hub knows under another name (the others match by file name).
_HUB_NAMES = {"sms_spam_subset.tsv": ("sms-spam", "spam_collection.csv")}
_HUB_FAILED: dict[tuple, str] = {}  # why the hub could not get a file, so that later tests skip at once


def _from_hub(parts: tuple[str, ...]) -> Path | str:
    """The file through lmforge's own hub (its registry sources, checksummed), or why it cannot be had."""
    from lmforge import hub

    entry_name, file_name = _HUB_NAMES.get(parts[-1], (None, parts[-1]))
    found = [(e, rf) for e in hub.REGISTRY.values() for rf in e.files
             if rf.name == file_name and entry_name in (None, e.name)]
    if not found:
        return "lmforge's hub has no entry for it"
    key = (parts, str(hub.cache_dir()), os.environ.get("LMFORGE_MIRROR"), hub.offline())
    if key in _HUB_FAILED:
        return _HUB_FAILED[key]
    # Fail fast with no network: short waits and one pip retry, unless the caller chose otherwise.
    env = {"LMFORGE_TIMEOUT": os.environ.get("LMFORGE_TIMEOUT") or "10",
           "PIP_RETRIES": os.environ.get("PIP_RETRIES") or "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return hub.fetch_file(*found[0])
    except hub.HubError as e:
        _HUB_FAILED[key] = f"lmforge's hub could not get it either: {e}"
        return _HUB_FAILED[key]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shared_file(*parts: str) -> Path:
    """A real data file: from ../shared/data when it is there, else through lmforge's hub; skips when neither has it."""
    path = SHARED.joinpath(*parts)
    if path.exists():
        return path
    got = _from_hub(parts)
    if isinstance(got, Path):
        return got
    pytest.skip(f"{path} is absent (no shared data folder beside the project) and {got}")


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QA = {"hi": "The quick brown fox jumps over the lazy dog.", "tell me a saying": "A stitch in time saves nine.",
      "what glitters?": "All that glitters is not gold."}


def chat_tokenizer() -> Tokenizer:
    """A BPE tokenizer of TEXT and QA with ChatML's special tokens and template."""
    tok = Tokenizer.train([TEXT * 5 + " ".join(QA)],
                          TokenizerConfig(vocab_size=320, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>")))
    tok.chat_template = CHATML
    tok.eos_id = tok.special_tokens["<|im_end|>"]
    return tok


@functools.lru_cache(maxsize=1)
def tiny_assistant() -> Assistant:
    """A 2-layer GPT over-fitted (150 steps, about a second) to answer QA (and one follow-up
    question) and to continue TEXT, so that its greedy answers are readable and end with the end token."""
    tok = chat_tokenizer()
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=128, d_model=32, n_layer=2, n_head=4))
    assistant = Assistant("tiny-chat", model, tok, "chat")
    seqs = [assistant.prompt_ids([{"role": "user", "content": q}]) + tok.encode(a) + [tok.eos_id] for q, a in QA.items()]
    two_turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": QA["hi"]},
                 {"role": "user", "content": "tell me a saying"}]
    seqs.append(assistant.prompt_ids(two_turns) + tok.encode(QA["tell me a saying"]) + [tok.eos_id])
    seqs += [tok.encode(s.strip() + " ") for s in TEXT.split(". ")]
    width = max(map(len, seqs)) - 1
    x = torch.zeros(len(seqs), width, dtype=torch.long)
    y = torch.full((len(seqs), width), -100)
    for i, s in enumerate(seqs):
        x[i, :len(s) - 1], y[i, :len(s) - 1] = torch.tensor(s[:-1]), torch.tensor(s[1:])
    overfit(model, x, y, steps=150, lr=1e-2)
    model.eval()
    return assistant


def overfit(model: GPT, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """``steps`` AdamW steps on the one batch (x, y); the last step's loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss


@contextlib.contextmanager
def another_process_holding(run: Path) -> Iterator[None]:
    """Another process that holds ``run`` as a run it trains in (``run_lock``), until the block ends;
    then it is killed as kill -9 would (the OS drops the lock with the process)."""
    code = ("import sys, time\nfrom lmforge.outputs import run_lock\nwith run_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """Thirty small documents of English-like text."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(30):
        (d / f"doc{i:02d}.txt").write_text(f"Document {i}. " + TEXT * (3 + i % 4), encoding="utf-8")
    return d


@pytest.fixture
def prepared(tmp_path, corpus_dir):
    """A trained 300-token tokenizer and prepared shards of corpus_dir: (tmp_path, tokenizer path, data dir)."""
    from lmforge.cli import main

    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--data", str(corpus_dir), "--out", str(tok), "--tokenizer.vocab_size",
                 "300"]) == 0
    data = tmp_path / "data"
    assert main(["prepare", "--data", str(corpus_dir), "--tokenizer", str(tok), "--out", str(data)]) == 0
    return tmp_path, tok, data


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def headless_chromium(window: str):
    """Debian's chromium driven by selenium, for a module-scoped ``browser`` fixture (a generator:
    yields the driver, quits it after); skips with the reason when it is not installed or cannot start."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed: pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # explicit paths: Selenium Manager never runs (it would download)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={window}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    except Exception as e:  # noqa: BLE001  (any failure to start the browser is a reason to skip, said)
        pytest.skip(f"chromium could not start: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def default_sigint() -> None:
    """``preexec_fn`` of a child that a test interrupts as a terminal would: Ctrl-C's default action.
    A shell starts background jobs with SIGINT ignored, and a child inherits an ignored signal (Python
    then installs no KeyboardInterrupt), so a suite started with `cmd &` saw no Ctrl-C reach them."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
