"""``/metrics`` against a real node and the real llama-server, parsed with prometheus-client's own parser.

Known requests go in; the counts that come out must match what the child reported in its answers (tokens),
how many requests were streamed (time to first token), granted (queue wait), refused (by reason) and how many
switches the scheduler made (their counter and their time histogram agree).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import DeferredList
from twisted.internet.task import Clock

from rolemesh_node.config import NodeConfig
from rolemesh_node.dispatcher import LinkState
from rolemesh_node.metrics import NodeMetrics
from rolemesh_node.node import Node
from tests.test_proxy_real import SLOW_TOKENS, chat_body, post, proxy_config


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(sample name, labels): value}`` from a scrape."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(scrape: dict[Any, float], name: str, **labels: str) -> float:
    """The sum of every sample called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in scrape.items() if n == name and wanted <= got)


async def scrape(service: Any) -> dict[Any, float]:
    response = await treq.get(f"http://127.0.0.1:{service.port}/metrics", persistent=False)
    assert response.code == 200
    return samples((await response.content()).decode())


def sse_events(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in body.decode().split("\n")
            if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.llama
@pytest_twisted.ensureDeferred
async def test_tokens_first_token_queue_wait_switches_and_refusals(node_service, tiny_models, llama_server_bin):
    config = proxy_config(tiny_models, max_switch_wait_s=0)
    config["models"]["ghost"] = {"path": "missing.gguf"}
    service = await node_service(config)
    prompt = completion = 0

    for max_tokens in (3, 5, 7):  # non-streamed: usage
        response = await post(service, "/v1/chat/completions", chat_body("tiny-a", max_tokens=max_tokens))
        usage = json.loads(await response.content())["usage"]
        assert response.code == 200 and usage["completion_tokens"] == max_tokens
        prompt, completion = prompt + usage["prompt_tokens"], completion + usage["completion_tokens"]
    for max_tokens in (4, 6):  # chat streams: the child sends timings, no usage
        response = await post(service, "/v1/chat/completions", chat_body("tiny-a", max_tokens=max_tokens, stream=True))
        timings = sse_events(await response.content())[-1]["timings"]
        prompt, completion = prompt + timings["prompt_n"] + timings["cache_n"], completion + timings["predicted_n"]
        assert timings["predicted_n"] == max_tokens
    body = json.dumps({"model": "tiny-a", "prompt": "hello", "max_tokens": 2, "stream": True}).encode()
    usage = sse_events(await (await post(service, "/v1/completions", body)).content())[-1]["usage"]
    prompt, completion = prompt + usage["prompt_tokens"], completion + usage["completion_tokens"]

    response = await post(service, "/v1/chat/completions", chat_body("tiny-b", max_tokens=2))  # a switch
    assert response.code == 200
    b_usage = json.loads(await response.content())["usage"]
    for _ in range(2):
        response = await post(service, "/v1/chat/completions", chat_body("ghost"))
        assert response.code == 503 and json.loads(await response.content())["error"]["code"] == "model_unavailable"

    got = await scrape(service)
    assert value(got, "rolemesh_tokens_total", model="tiny-a", kind="completion") == completion
    assert value(got, "rolemesh_tokens_total", model="tiny-a", kind="prompt") == prompt
    assert value(got, "rolemesh_tokens_total", model="tiny-b", kind="completion") == b_usage["completion_tokens"]
    assert value(got, "rolemesh_time_to_first_token_seconds_count", model="tiny-a") == 3
    assert value(got, "rolemesh_time_to_first_token_seconds_count", model="tiny-b") == 0
    assert value(got, "rolemesh_queue_wait_seconds_count", model="tiny-a") == 6
    assert value(got, "rolemesh_queue_wait_seconds_count", model="tiny-b") == 1
    assert value(got, "rolemesh_refusals_total", status="503", reason="model_unavailable") == 2
    # two switches (tiny-a loaded, then tiny-b), counted once each and timed once each
    assert value(got, "rolemesh_scheduler_switches_total", device="cpu:0") == 2
    for model in ("tiny-a", "tiny-b"):
        assert value(got, "rolemesh_scheduler_switches_total", model=model) == 1
        assert value(got, "rolemesh_model_switch_seconds_count", device="cpu:0", model=model) == 1
        assert value(got, "rolemesh_child_ready_seconds_count", device="cpu:0", model=model) == 1
    assert value(got, "rolemesh_model_switch_seconds_sum", model="tiny-b") >= value(
        got, "rolemesh_child_ready_seconds_sum", model="tiny-b")  # the switch includes the load
    assert value(got, "rolemesh_device_child_state", device="cpu:0", state="ready") == 1
    assert value(got, "rolemesh_config_reloads_total") == 0
    assert not any(name == "rolemesh_dispatcher_link_state" for name, _ in got)  # no dispatcher configured

    service.metrics.reload_done("applied")
    service.metrics.reload_done("rejected")
    got = await scrape(service)
    reloads = [value(got, "rolemesh_config_reloads_total", result=r) for r in ("applied", "rejected", "unchanged")]
    assert reloads == [1, 1, 0]
    with pytest.raises(ValueError):
        service.metrics.reload_done("maybe")


@pytest.mark.llama
@pytest_twisted.ensureDeferred
async def test_queue_full_is_counted_by_reason(node_service, tiny_models, llama_server_bin):
    service = await node_service(proxy_config(tiny_models, max_pending_requests_per_device=2,
                                              max_concurrent_requests_per_device=1))
    warm = await post(service, "/v1/chat/completions", chat_body("tiny-a"))
    await warm.content()
    slow = json.dumps({"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": SLOW_TOKENS, "ignore_eos": True}).encode()
    results = await DeferredList([post(service, "/v1/chat/completions", slow) for _ in range(3)])
    codes = sorted(response.code for _, response in results)
    for _, response in results:
        await response.content()
    assert codes == [200, 200, 429]
    got = await scrape(service)
    assert value(got, "rolemesh_refusals_total", status="429", reason="queue_full") == 1
    assert value(got, "rolemesh_requests_total", status="429") == 1


def test_dispatcher_link_state_is_one_gauge_per_state() -> None:
    clock = Clock()
    node = Node(NodeConfig(), clock, http=None, node_id="n1")
    metrics = NodeMetrics(node)

    class Link:
        state = LinkState.REGISTERING
        counts = {"register_ok": 0, "register_failed": 2, "heartbeat_ok": 0, "heartbeat_failed": 0}

    metrics.dispatcher = Link()
    got = samples(metrics.render().decode())
    assert {s.value: value(got, "rolemesh_dispatcher_link_state", state=s.value) for s in LinkState} == {
        "stopped": 0, "unregistered": 0, "registering": 1, "registered": 0}
    assert value(got, "rolemesh_dispatcher_registrations_total", result="failed") == 2


def test_switch_time_runs_from_the_decision_to_ready_across_a_drain() -> None:
    clock = Clock()
    node = Node(NodeConfig(), clock, http=None, node_id="n1")
    metrics = NodeMetrics(node)
    metrics.switch_event("switch", {"device": "cpu:0", "model": "b", "reason": "overdue"})
    clock.advance(2.0)  # the drain
    metrics.switch_event("switch", {"device": "cpu:0", "model": "b", "reason": "drained"})
    clock.advance(0.5)  # stop and load
    metrics.slot_event("ready", {"device": "cpu:0", "model": "b", "seconds": 0.25})
    metrics.switch_event("switch", {"device": "cpu:0", "model": "c", "reason": "load"})
    metrics.slot_event("failed", {"device": "cpu:0", "model": "c"})  # not timed
    metrics.slot_event("ready", {"device": "cpu:0", "model": "c", "seconds": 0.1})  # no decision pending
    got = samples(metrics.render().decode())
    assert value(got, "rolemesh_scheduler_switches_total") == 2  # overdue (drained completes it), load
    assert value(got, "rolemesh_scheduler_switches_total", reason="overdue") == 1
    assert value(got, "rolemesh_model_switch_seconds_count") == 1
    assert value(got, "rolemesh_model_switch_seconds_sum", reason="overdue") == 2.5
    assert value(got, "rolemesh_child_ready_seconds_count") == 2


def test_every_metric_the_docs_and_dashboard_name_exists() -> None:
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs"
    node = Node(NodeConfig(), Clock(), http=None, node_id="n1")
    metrics = NodeMetrics(node)

    class Link:
        state = LinkState.REGISTERED
        counts = {"register_ok": 1, "register_failed": 0, "heartbeat_ok": 0, "heartbeat_failed": 0}

    metrics.dispatcher = Link()
    exported = {family.name for family in text_string_to_metric_families(metrics.render().decode())}
    exported |= {name + "_total" for name in exported}
    for suffix in ("_bucket", "_count", "_sum"):
        exported |= {name + suffix for name in exported}
    dashboard = json.loads((docs / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    operations = (docs / "operations.md").read_text()
    named = set(re.findall(r"rolemesh_[a-z_]+", exprs + operations))
    named = {n for n in named if not n.endswith("_")}  # "rolemesh_device_memory_{total,used,free}_bytes"
    assert named - exported <= {"rolemesh_node", "rolemesh_node_plugin"}, named - exported
