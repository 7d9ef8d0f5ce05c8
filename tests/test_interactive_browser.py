"""Interactive module selection, end to end in headless Chromium, plus the server's checks.

The browser test needs Debian's ``chromium`` (/usr/bin/chromium) and the ``playwright``
package (never ``playwright install``: the system browser is driven directly).
"""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading

import pytest
from torch import nn

from opendelta import LoraModel
from opendelta.tools.interactive import SelectionServer, exact_keys, interactive
from tiny_models import build

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PREFIX = "bert.encoder.layer.0.attention.self"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: bytes, headers: dict, host: str = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    hdrs = {"Content-Type": "application/json", **headers}
    if host is not None:
        conn.putrequest("POST", "/submit", skip_host=True)
        conn.putheader("Host", host)
        for k, v in {**hdrs, "Content-Length": str(len(body))}.items():
            conn.putheader(k, v)
        conn.endheaders(body)
    else:
        conn.request("POST", "/submit", body=body, headers=hdrs)
    response = conn.getresponse()
    payload = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, payload


def _pick_in_browser(model: nn.Module, actions) -> LoraModel:
    """Run ``LoraModel(model, interactive_modify=port)`` in a thread, let ``actions(page, row)``
    drive the page in headless Chromium, and return the delta model once it is built."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    port = _free_port()
    result = {}

    def build_delta():
        try:
            result["delta"] = LoraModel(model, interactive_modify=port)
        except BaseException as err:  # re-raised by the test's thread
            result["error"] = err

    worker = threading.Thread(target=build_delta, daemon=True)
    worker.start()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            for _ in range(100):  # the server starts in the worker thread
                try:
                    page.goto(f"http://127.0.0.1:{port}/")
                    break
                except sync_api.Error:
                    page.wait_for_timeout(100)
            actions(page, lambda path: page.locator(f'.row[data-path="{path}"]'))
            page.locator("#submit").click()
            page.wait_for_selector("#status.done")
        finally:
            browser.close()
    worker.join(timeout=30)
    assert not worker.is_alive(), "LoraModel(interactive_modify=port) did not return after Submit"
    if "error" in result:
        raise result["error"]
    # The server is gone: the port no longer accepts connections.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    return result["delta"]


def _lora_hosts(model: nn.Module) -> list:
    return sorted(n[: -len(".lora.lora_A")] for n, _ in model.named_parameters() if n.endswith(".lora.lora_A"))


@pytest.mark.browser
def test_select_two_modules_of_one_layer_in_chromium():
    def actions(page, row):
        # Only the root is expanded: the encoder is not rendered yet.
        assert row("bert").count() == 1 and row("bert.encoder").count() == 0
        for path in ("bert", "bert.encoder", "bert.encoder.layer"):
            row(path).locator("button.toggle").click()
            assert row(path).locator("button.toggle").inner_text() == "[-]"
        # [-] collapses and [+] expands again.
        row("bert.encoder.layer").locator("button.toggle").click()
        assert not row("bert.encoder.layer.0 bert.encoder.layer.1").is_visible()
        row("bert.encoder.layer").locator("button.toggle").click()
        folded = row("bert.encoder.layer.0 bert.encoder.layer.1")
        assert folded.locator("button.select").inner_text() == "0-1 (BertLayer)"
        folded.locator("button.unfold").dblclick()
        assert row("bert.encoder.layer.0").count() == 1 and row("bert.encoder.layer.1").count() == 1
        for path in ("bert.encoder.layer.0", "bert.encoder.layer.0.attention",
                     "bert.encoder.layer.0.attention.self"):
            row(path).locator("button.toggle").click()
        merged = row(f"{PREFIX}.query {PREFIX}.key {PREFIX}.value")
        assert merged.locator("button.select").inner_text().startswith("query,key,value (Linear)")
        # Selecting the merged node selects its three modules; unfolding keeps them selected.
        merged.locator("button.select").click()
        assert page.locator("#count").inner_text() == "3"
        merged.locator("button.unfold").dblclick()
        assert merged.count() == 0
        for name in ("query", "key", "value"):
            assert "selected" in row(f"{PREFIX}.{name}").locator("button.select").get_attribute("class")
        row(f"{PREFIX}.key").locator("button.select").click()  # a second click deselects
        assert page.locator("#count").inner_text() == "2"
        assert "selected" not in row(f"{PREFIX}.key").locator("button.select").get_attribute("class")
        assert page.locator("#selected-list li").all_inner_texts() == [f"{PREFIX}.query", f"{PREFIX}.value"]

    model = build("bert", "cls")
    delta = _pick_in_browser(model, actions)
    assert sorted(host for host, _, _ in delta.layer_entries()) == [f"{PREFIX}.query", f"{PREFIX}.value"]
    assert delta.modified_modules == [f"{PREFIX}.query", f"{PREFIX}.value"]
    assert _lora_hosts(model) == [f"{PREFIX}.query", f"{PREFIX}.value"]


@pytest.mark.browser
def test_selecting_inside_a_folded_block_selects_every_layer():
    def actions(page, row):
        for path in ("bert", "bert.encoder", "bert.encoder.layer",
                     "bert.encoder.layer.0 bert.encoder.layer.1"):
            row(path).locator("button.toggle").click()
        # Under the folded block, "intermediate" stands for both layers' modules.
        both = "bert.encoder.layer.0.intermediate bert.encoder.layer.1.intermediate"
        row(both).locator("button.toggle").click()
        row(both.replace("intermediate", "intermediate.dense")).locator("button.select").click()
        assert page.locator("#count").inner_text() == "2"

    model = build("bert", "cls")
    _pick_in_browser(model, actions)
    assert _lora_hosts(model) == [f"bert.encoder.layer.{i}.intermediate.dense" for i in (0, 1)]


def test_server_rejects_bad_submissions_then_returns_a_valid_one(capsys):
    model = build("bert", "cls")
    server = SelectionServer(model, port=0)
    server.start()
    try:
        good = {"X-Opendelta-Token": server.token}
        body = json.dumps({"names": ["bert.encoder.layer.1.output.dense"]}).encode()
        assert _post(server.port, body, {})[0] == 403                     # no token
        assert _post(server.port, body, {"X-Opendelta-Token": "wrong"})[0] == 403
        assert _post(server.port, body, good, host="evil.example:80")[0] == 403  # DNS rebinding
        status, reply = _post(server.port, json.dumps({"names": []}).encode(), good)
        assert (status, reply["error"]) == (400, "select at least one module")
        status, reply = _post(server.port, json.dumps({"names": ["bert.nope"]}).encode(), good)
        assert status == 400 and "bert.nope" in reply["error"]
        assert _post(server.port, b"not json", good)[0] == 400
        assert not server.submitted.is_set()
        status, reply = _post(server.port, body, good)
        assert (status, reply) == (200, {"ok": True, "count": 1})
    finally:
        names = server.wait(timeout=5)
    assert names == ["bert.encoder.layer.1.output.dense"]


def test_page_escapes_module_names_and_lists_the_folded_tree():
    model = build("bert", "cls")
    server = SelectionServer(model, port=0)
    try:
        page = server.page.decode()
        data = json.loads(re.search(r'type="application/json">(.*?)</script>', page, re.S).group(1))
        layer = data["tree"]["c"][0]["c"][1]["c"][0]  # bert.encoder.layer
        assert layer["c"][0]["n"] == ["0", "1"] and layer["c"][0]["t"] == "BertLayer"
        assert data["token"] == server.token
    finally:
        server.server_close()

    class Evil(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("</script><script>alert(1)</script>", nn.Linear(2, 2))

    server = SelectionServer(Evil(), port=0)
    try:
        assert "<script>alert" not in server.page.decode()
    finally:
        server.server_close()


def test_interactive_times_out_and_frees_the_port(capsys):
    port = _free_port()
    with pytest.raises(TimeoutError):
        interactive(nn.Sequential(nn.Linear(2, 2)), port=port, timeout=0.2)
    assert f"http://127.0.0.1:{port}/" in capsys.readouterr().out
    SelectionServer(nn.Sequential(nn.Linear(2, 2)), port=port).server_close()  # port is free again


def test_taken_port_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError, match="pass another port"):
            SelectionServer(nn.Linear(2, 2), port=s.getsockname()[1])


def test_exact_keys_anchor_names_that_are_tails_of_others():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(2, 2))
            self.teacher = nn.Module()
            self.teacher.encoder = nn.Sequential(nn.Linear(2, 2))

    model = Outer()
    names = {n for n, _ in model.named_modules() if n}
    keys = exact_keys(["encoder.0", "teacher.encoder.0"], names)
    assert keys == [r"[r]^encoder\.0", "teacher.encoder.0"]
    delta = LoraModel(model, modified_modules=keys[:1])
    assert [h for h, _, _ in delta.layer_entries()] == ["encoder.0"]
    # The plain name would have matched both modules.
    model2 = Outer()
    assert len(LoraModel(model2, modified_modules=["encoder.0"]).layer_entries()) == 2
