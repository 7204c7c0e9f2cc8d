"""`speedtune ui` in a real browser: the server runs as `speedtune ui --port N` in its own process, headless Chromium
(Debian's) drives the page through Playwright, on the embedded model and the bundled identity data. The screenshots
in docs/ui/ (shown in the README) are taken here when SPEEDTUNE_UI_SHOTS=1 (else into a temporary folder: a test run
leaves the tracked files alone)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import assert_user_error, cli

from speedtune.errors import install_hint
from speedtune.paths import demo_dir

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = (Path(__file__).resolve().parent.parent / "docs" / "ui" if os.environ.get("SPEEDTUNE_UI_SHOTS") == "1"
         else Path(tempfile.mkdtemp(prefix="speedtune-ui-shots-")))
DATA = demo_dir() / "identity.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    work = tmp_path_factory.mktemp("ui")
    port = free_port()
    log = (work / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "speedtune", "ui", "--port", str(port)], cwd=work, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, (work / "server.log").read_text()
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert time.time() < deadline, "the ui did not answer in 120 s"
            time.sleep(0.2)
    yield type("Server", (), {"url": url, "work": work, "proc": proc, "log": work / "server.log"})
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "the browser tests need Debian's Chromium: apt-get install -y chromium"
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                                                       viewport={"width": 1280, "height": 900})
        yield context
        context.close()


@pytest.fixture
def page(server, browser, request):
    from playwright.sync_api import expect

    # a page update waits on the server's event loop, which shares 2 cores with the other test worker: an update
    # can take longer than Playwright's 5 s default (seen once: the grad-accum field's command line); expect polls,
    # so a longer bound costs nothing when the page is quick
    expect.set_options(timeout=30_000)
    page = browser.new_page()
    console = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("requestfailed", lambda r: console.append(f"request failed: {r.method} {r.url} {r.failure}"))
    page.goto(server.url)
    page.locator("#data-load").wait_for()
    yield page
    page.close()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        # what a rare failure needs to be understood: the server's side and the page's
        print("--- server log (last 4000 characters) ---\n" + server.log.read_text()[-4000:])
        print("--- page console ---\n" + "\n".join(console[-60:]))
    assert server.proc.poll() is None, "the ui server died:\n" + server.log.read_text()[-3000:]


def fill(page, elem_id: str, value) -> None:
    page.locator(f"#{elem_id}").locator("input[type=number], textarea, input[type=text]").first.fill(str(value))


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(300)  # let the last update paint
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def points(page) -> int:
    loc = page.locator("#st-loss")
    return int(loc.get_attribute("data-points") or 0) if loc.count() else 0


def test_the_whole_path_in_a_browser(page, server):
    from playwright.sync_api import expect

    # 1. data: checked, the trained part and the special tokens marked
    page.locator("#data-load").click()
    expect(page.locator("#data-status")).to_contain_text("ok: 56 rows ready to train", timeout=60_000)
    expect(page.locator("#data-summary")).to_contain_text("chat")
    expect(page.locator("#data-summary")).to_contain_text("messages ← messages")
    trained = page.locator("#data-preview .st-trained")
    assert "Quokka" in " ".join(trained.all_inner_texts())
    assert "Who are you?" not in " ".join(trained.all_inner_texts())  # the prompt is not trained
    assert page.locator("#data-preview .st-trained.st-special", has_text="<|im_end|>").count() == 3
    assert page.locator("#data-preview .st-prompt.st-special", has_text="<|im_start|>").count() >= 3
    shot(page, "data")

    # 2. train: a long run stopped after its first step, resumed for one more; the chart follows the log
    page.get_by_role("tab", name="2 · Train").click()
    run = server.work / "runs" / "identity"
    fill(page, "train-run", run)
    fill(page, "train-steps", 200)
    fill(page, "train-batch", 4)
    fill(page, "train-accum", 1)
    fill(page, "train-lr", "5e-4")
    command = page.locator("#st-train-command")
    expect(command).to_contain_text("--max-steps 200", timeout=10_000)
    expect(command).to_contain_text("--batch-size 4 --grad-accum 1")
    expect(command).to_contain_text("--lr 0.0005")
    page.locator("#train-start").click()
    expect(page.locator("#train-status")).to_contain_text("started", timeout=10_000)
    page.wait_for_function("() => Number(document.querySelector('#st-loss')?.dataset.points) >= 1", timeout=180_000)
    first = points(page)
    page.locator("#train-start").click()  # a second start while one runs (another tab would do the same) is refused
    expect(page.locator("#train-status")).to_contain_text("error: a training run is already running")
    page.locator("#train-stop").click()
    status = page.locator("#train-status")
    expect(status).to_contain_text("stopped at step", timeout=120_000)
    stopped_at = int(re.search(r"stopped at step (\d+)", status.inner_text()).group(1))
    assert stopped_at >= first and list((run / "checkpoints").glob(f"checkpoint-{stopped_at}"))
    total = stopped_at + 1
    fill(page, "train-steps", total)
    expect(command).to_contain_text(f"--max-steps {total}", timeout=10_000)
    page.locator("#train-resume").click()
    expect(status).to_contain_text("resuming", timeout=10_000)
    page.wait_for_function(f"() => Number(document.querySelector('#st-loss')?.dataset.points) > {stopped_at}",
                           timeout=180_000)
    middle = points(page)
    expect(status).to_contain_text(f"done: {total} steps", timeout=180_000)
    assert first <= stopped_at < middle <= total == points(page)
    expect(page.locator("#st-progress")).to_have_attribute("data-step", str(total))
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log].count("begin") == 2 and log[-1]["event"] == "end"
    assert (run / "adapter_model.safetensors").is_file() and (run / "metrics.json").is_file()
    shot(page, "train")

    # 3. chat: the run beside its base model, streamed
    page.get_by_role("tab", name="3 · Chat").click()
    expect(page.locator("#chat-target textarea")).to_have_value(str(run))
    fill(page, "chat-max-new", 40)
    page.locator("#chat-max-new input[type=number]").press("Enter")
    fill(page, "chat-input", "Who are you?")
    page.locator("#chat-send").click()
    expect(page.locator("#chat-status")).to_contain_text("ok: 2 answers", timeout=180_000)
    for box in ("#chat-tuned", "#chat-base-model"):
        expect(page.locator(box)).to_contain_text("Who are you?")
        bot = page.locator(box).locator("[data-testid=bot]").last
        assert len(bot.inner_text().strip()) > 3, box
    shot(page, "chat")
    page.locator("#chat-reset").click()
    expect(page.locator("#chat-tuned")).not_to_contain_text("Who are you?")

    # 4. export: q8_0 with an Ollama Modelfile, verified
    page.get_by_role("tab", name="4 · Export").click()
    expect(page.locator("#export-source textarea")).to_have_value(str(run))
    page.locator("#export-start").click()
    expect(page.locator("#export-status")).to_contain_text("exporting", timeout=30_000)
    expect(page.locator("#export-status")).to_contain_text("exported", timeout=400_000)
    table = page.locator("#st-export-table")
    expect(table).to_contain_text("identity-q8_0.gguf")
    cells = table.locator("tr").nth(1).locator("td").all_inner_texts()
    assert cells[4] == "yes" and float(cells[2].rstrip("%")) >= 90, cells
    expect(page.locator("#st-export-files")).to_contain_text("ollama create identity")
    assert (run / "export" / "identity-q8_0.gguf").is_file() and (run / "export" / "Modelfile").is_file()
    shot(page, "export")


def test_errors_are_one_line_and_the_server_survives(page, server, tmp_path):
    from playwright.sync_api import expect

    bad = tmp_path / "bad.jsonl"
    good = DATA.read_text().splitlines()
    bad.write_text("\n".join([good[0], '{"messages": [oops', *good[1:4]]) + "\n")
    fill(page, "data-path", bad)
    page.locator("#data-load").click()
    status = page.locator("#data-status")
    expect(status).to_contain_text(f"error: {bad} line 2: not valid JSON", timeout=60_000)
    assert "Traceback" not in status.inner_text() and len(status.inner_text().strip().splitlines()) == 1
    shot(page, "data-error")

    # the next action works: an uploaded file this time
    page.locator("#data-upload input[type=file]").set_input_files(str(DATA))
    expect(status).to_contain_text("ok: 56 rows ready to train", timeout=60_000)
    assert "identity.jsonl" in page.locator("#data-path textarea").input_value()

    # a LLaMA-Factory entry, its column mapping shown
    (tmp_path / "quokka.jsonl").write_text(DATA.read_text())
    (tmp_path / "dataset_info.json").write_text(json.dumps({"quokka": {
        "file_name": "quokka.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    fill(page, "data-path", f"{tmp_path / 'dataset_info.json'}:quokka")
    page.locator("#data-load").click()
    expect(page.locator("#data-summary")).to_contain_text("conversations ← messages", timeout=60_000)
    expect(status).to_contain_text("ok: 56 rows ready to train (sharegpt")

    # a mistake the CLI catches comes back as its one-line error
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    page.get_by_role("tab", name="2 · Train").click()
    fill(page, "train-run", busy)
    fill(page, "train-steps", 2)
    expect(page.locator("#st-train-command")).to_contain_text(str(busy), timeout=10_000)
    page.locator("#train-start").click()
    expect(page.locator("#train-status")).to_contain_text(f"error: --output {busy} exists and is not empty",
                                                          timeout=120_000)
    assert server.proc.poll() is None


def test_help_and_missing_gradio():
    r = cli("ui", "--help")
    assert r.returncode == 0 and "--port" in r.stdout and "ssh -L 7860:127.0.0.1:7860" in r.stdout, r.stdout
    no_gradio = subprocess.run([sys.executable, "-c", "import sys; sys.modules['gradio'] = None; "
                                "from speedtune.cli import main; main(['ui'])"], capture_output=True, text=True)
    assert_user_error(no_gradio, f"speedtune ui needs gradio: {install_hint('ui')}")
