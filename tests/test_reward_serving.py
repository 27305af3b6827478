"""Reward deployments under load, and their HTTP endpoint (`raydraft serve-rewards`), on a
real local Ray cluster, real Serve and real HTTP: a burst scales a model reward from 1 to 2
replicas and back and a replica killed under it loses no request; the `http` reward's scores
equal the in-process rewards' exactly, and malformed, oversize or unauthorised requests get
a 4xx with a message, in bursts too."""

import base64
import io
import json
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
import torch
from overrides import RAY_SMALL
from PIL import Image
from ray import serve
from text_images import as_batch, render_text
from tiny_models import save_tiny_clip

from raydraft.config import ConfigError, RewardHttpConfig, RewardsConfig, load_config
from raydraft.rewards.base import to_uint8_hwc
from raydraft.rewards.http_reward import encode_request
from raydraft.rewards.registry import make_reward
from raydraft_ray.cluster import connect
from raydraft_ray.reward_http import serve_rewards_http, token_digest
from raydraft_ray.reward_serving import app_name, deploy_rewards

TOKEN_ENV = "RAYDRAFT_TEST_REWARD_TOKEN"
TOKEN = "test-token-8f3a"
PROMPTS = ['a sign that says "hello world"', 'a sign that says "hello world"']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    os.environ[TOKEN_ENV] = TOKEN
    cfg = load_config(
        "toy-flowgrpo",
        [
            *RAY_SMALL,
            "rewards.components=[{name: toy-color}, {name: ocr}]",
            f"ray.reward_http.port={free_port()}",
            f"ray.reward_http.token_env={TOKEN_ENV}",
            "ray.reward_http.max_request_mb=6",  # two 512x256 float32 images: 4 MB
            "ray.reward_http.max_image_side=512",
        ],
    )
    started = connect(None, num_cpus=4)
    try:
        yield serve_rewards_http(cfg, 120)
    finally:
        del os.environ[TOKEN_ENV]
        if started:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def images():
    return as_batch([render_text("hello world"), render_text("raydraft")])


def post(url, path, body: bytes, token: str | None = TOKEN, method="POST"):
    """(status, JSON answer) of a raw request."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + path, body, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def npy(array) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype == object)
    return base64.b64encode(buffer.getvalue()).decode()


def png(size=(64, 32), mode="RGB", image_format="PNG") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, image_format)
    return base64.b64encode(buffer.getvalue()).decode()


def truncated(encoded: str) -> str:
    """A PNG whose header is whole and whose pixel data is cut in half."""
    raw = base64.b64decode(encoded)
    return base64.b64encode(raw[: len(raw) // 2]).decode()


def body(images, prompts=("a", "b")) -> bytes:
    return json.dumps({"prompts": list(prompts), "images": images}).encode()


def pngs(*images: str) -> bytes:
    return body({"format": "png", "data": list(images)})


def npys(array) -> bytes:
    return body({"format": "npy", "data": npy(array)})


SCORE = "/v1/rewards/toy-color/score"
MALFORMED = {  # (path, body, status, message)
    "not JSON": (SCORE, b"{prompts", 400, "not JSON"),
    "not an object": (SCORE, b"[1, 2]", 400, "JSON object"),
    "unknown field": (SCORE, b'{"prompts": ["a"], "pickle": 1}', 400, "unknown fields"),
    "no prompts": (SCORE, b'{"images": {"format": "png", "data": []}}', 400, "'prompts'"),
    "bad format": (SCORE, body({"format": "bmp", "data": []}), 400, "'images' must be"),
    "not base64": (SCORE, pngs("%%%", "%%%"), 400, "not base64"),
    "a JPEG": (SCORE, pngs(*[png(image_format="JPEG")] * 2), 400, "is JPEG, not PNG"),
    "RGBA": (SCORE, pngs(*[png(mode="RGBA")] * 2), 400, "mode RGBA"),
    "not an image": (SCORE, pngs(*[base64.b64encode(b"hello").decode()] * 2), 400, "readable"),
    "cut short": (SCORE, pngs(*[truncated(png())] * 2), 400, "image 0 is not a readable PNG"),
    "sizes differ": (SCORE, pngs(png(), png((32, 32))), 400, "differ in size"),
    "too few images": (SCORE, pngs(png()), 400, "1 images for 2"),
    "oversize image": (SCORE, pngs(*[png((600, 8))] * 2), 413, "each side must be 1 to 512"),
    "pickled npy": (SCORE, npys(np.array([{}, {}], dtype=object)), 400, "without pickle"),
    "int64 npy": (SCORE, npys(np.zeros((2, 8, 8, 3), np.int64)), 400, "dtype int64"),
    "float64 npy": (SCORE, npys(np.zeros((2, 3, 8, 8))), 400, "dtype float64"),
    "float32 above 1": (SCORE, npys(np.full((2, 3, 8, 8), 2, np.float32)), 400, r"\[0, 1\]"),
    "3-d npy": (SCORE, npys(np.zeros((8, 8, 3), np.uint8)), 400, "4 dimensions"),
    "body too large": (SCORE, b" " * (6 * 2**20 + 1), 413, "exceeds"),
    "unknown reward": ("/v1/rewards/hps/score", body({}), 404, "unknown reward 'hps'"),
    "unknown route": ("/score", body({}), 404, "no route"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_requests_get_a_4xx_with_a_message(url, case):
    path, payload, status, message = MALFORMED[case]
    got, answer = post(url, path, payload)
    assert got == status, answer
    assert re.search(message, answer["error"]), answer


def test_the_token_method_and_listing(url):
    assert post(url, SCORE, body({}), token=None)[0] == 401
    status, answer = post(url, SCORE, body({}), token="wrong")
    assert status == 401 and "bearer token" in answer["error"]
    assert post(url, SCORE, b"", method="GET")[0] == 405
    assert post(url, "/v1/rewards", None, method="GET") == (200, {"rewards": ["ocr", "toy-color"]})
    client = make_reward("http", {"url": url, "reward": "ocr", "token_env": "NO_SUCH_VARIABLE"})
    with pytest.raises(RuntimeError, match=r"'http:ocr'.*answered 401: missing or wrong bearer"):
        client.score(torch.zeros(1, 3, 8, 8), ["x"], [{}])


@pytest.mark.parametrize("image_format", ["png", "npy"])
def test_served_scores_equal_the_in_process_rewards(url, images, image_format):
    """PNG carries the uint8 pixels black-box rewards score anyway; .npy the floats."""
    sent = images if image_format == "npy" else torch.from_numpy(to_uint8_hwc(images)) / 255
    if image_format == "png":
        sent = sent.permute(0, 3, 1, 2)
    for name in ("ocr", "toy-color"):
        options = {"url": url, "reward": name, "token_env": TOKEN_ENV}
        client = make_reward("http", {**options, "image_format": image_format})
        local = make_reward(name)
        expected = local.score(sent, PROMPTS, [{}, {}])
        assert torch.equal(client.score(images, PROMPTS, [{}, {}]), expected), name
        assert client.last_details.keys() == getattr(local, "last_details", {}).keys()
        for key, values in client.last_details.items():  # the OCR engine's failures
            assert torch.equal(values, local.last_details[key]), key
    assert make_reward("ocr").score(images, PROMPTS, [{}, {}]).tolist() == [1.0, 0.0]


def test_a_burst_of_malformed_requests_leaves_the_endpoint_answering(url, images):
    cases = [MALFORMED[c] for c in ("not JSON", "pickled npy", "oversize image", "a JPEG")] * 16
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda case: post(url, case[0], case[1]), cases))
    assert [status for status, _ in answers] == [case[2] for case in cases]
    valid = encode_request(images, PROMPTS, [{}, {}], "npy")
    status, answer = post(url, SCORE, valid)
    assert status == 200 and answer["reward"] == "toy-color"
    assert answer["scores"] == make_reward("toy-color").score(images, PROMPTS, []).tolist()


def test_a_wider_host_needs_a_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match=rf"'0.0.0.0' is not loopback.*{TOKEN_ENV}"):
        token_digest(RewardHttpConfig(host="0.0.0.0", token_env=TOKEN_ENV))
    assert token_digest(RewardHttpConfig(host="127.0.0.1", token_env=TOKEN_ENV)) is None
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert token_digest(RewardHttpConfig(host="0.0.0.0", token_env=TOKEN_ENV)) is not None


def running_replicas(name: str) -> int:
    app = serve.status().applications[app_name(name)]
    return app.deployments[name].replica_states.get("RUNNING", 0)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.2)


def test_a_burst_scales_a_model_reward_up_and_down_and_a_killed_replica_loses_nothing(
    url, tmp_path
):
    """PickScore on a tiny CLIP, one image per request, one request per replica at a time:
    32 at once ask for 2 replicas; one of them killed under load loses none (the caller
    retries on the survivor or the replacement); idle, it scales back to 1."""
    serving = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
               "upscale_delay_s": 0, "downscale_delay_s": 1, "look_back_period_s": 1,
               "max_batch_size": 1, "max_ongoing_requests": 1, "images_per_request": 1,
               "max_retries": 5, "num_cpus": 0.1}  # fmt: skip
    options = {"path": save_tiny_clip(tmp_path / "clip")}
    rewards = RewardsConfig(components=[{"name": "pickscore", "options": options,
                                         "serving": serving}])  # fmt: skip
    # Callers report their load to Serve's autoscaler every 0.2 s (default 10 s).
    push = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.2"}

    @ray.remote(num_cpus=0.1, runtime_env={"env_vars": push})
    class Caller:  # a rollout worker's view of the reward (defined here: sent by value)
        def __init__(self, serving_cfg):
            from raydraft_ray.reward_serving import remote_reward

            self.reward = remote_reward(rewards, serving_cfg)

        def score(self, images, prompts):
            return self.reward.score(images, prompts, [{} for _ in prompts])

    images = torch.rand(32, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = [f"prompt {i}" for i in range(32)]
    local = make_reward("pickscore", options)
    expected = torch.cat(
        [local.score(images[i : i + 1], prompts[i : i + 1], []) for i in range(32)]
    )
    base = load_config("toy-flowgrpo").ray.reward_serving
    deploy_rewards(rewards, base, 120)
    try:
        caller = Caller.remote(base)
        assert running_replicas("pickscore") == 1
        results = []
        deadline = time.monotonic() + 90
        while running_replicas("pickscore") < 2:
            assert time.monotonic() < deadline, "the burst did not scale the reward to 2"
            results.append(ray.get(caller.score.remote(images, prompts)))
        handle = serve.get_deployment_handle("pickscore", app_name("pickscore"))
        victim = handle.pid.remote().result()
        under_load = caller.score.remote(images.repeat(4, 1, 1, 1), prompts * 4)
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        assert not ray.wait([under_load], timeout=0)[0], "the kill came after the load"
        results += ray.get(under_load).chunk(4)
        for scores in results:  # every request answered, each by its own image's score
            assert torch.equal(scores, expected)
        wait_for(lambda: running_replicas("pickscore") == 1, 60, "scale-down to 1 replica")
    finally:
        serve.delete(app_name("pickscore"))
