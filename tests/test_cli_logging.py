"""The CLI as a user runs it, and what it logs, against the real broker.

- `--help` works on every command and sub-command of the typer app (found by walking its click tree);
- logs are JSON lines when stderr is not a terminal (ours and aiokafka's), pretty key-value on a
  terminal, and ingest events carry frame_id and camera_id;
- `--loop` starts a folder or a video file again, so `--limit` frames come out in source order;
- a broker that dies mid-stream is reported: the run stops with one `error:` line and exit 1;
- topics are created with the documented partition counts and configs (read back from the broker).
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from deploy.app import app
from lineguard.events import decode_frame
from lineguard.topics import FRAMES, TOPICS
from tests.helpers import read_topic_sync

LINEGUARD = [sys.executable, "-m", "deploy"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def command_paths(command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and group under `command`, as the argument lists that name them.

    (typer 0.29 builds on its own copy of click, so a group is whatever has sub-`commands`.)
    """
    paths = [path]
    if isinstance(getattr(command, "commands", None), dict):
        for name, sub in sorted(command.commands.items()):
            paths += command_paths(sub, (*path, name))
    return paths


ROOT = typer.main.get_command(app)
PATHS = command_paths(ROOT)


def test_the_walk_finds_every_command_group():
    assert {("ingest",), ("topics", "create"), ("refs", "add"), ("bench", "store"), ("grafana", "push"),
            ("store",), ("eval",)} <= set(PATHS)
    assert len(PATHS) > 20


@pytest.mark.parametrize("path", PATHS, ids=lambda path: " ".join(path) or "lineguard")
def test_help_exits_0_on_every_command(path):
    command = ROOT
    for name in path:
        command = command.commands[name]
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    usage = next(line for line in result.output.splitlines() if line.strip())
    assert re.match(rf"\s*Usage: \S+{re.escape(''.join(' ' + name for name in path))} \[OPTIONS\]", usage), usage
    summary = (command.help or "").strip().splitlines()
    assert summary, f"`lineguard {' '.join(path)}` has no help text"
    assert summary[0].split()[0] in result.output


def test_console_script_help_runs_as_a_process():
    lineguard = os.path.join(os.path.dirname(sys.executable), "lineguard")
    result = subprocess.run([lineguard, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ingest" in result.stdout and "grafana" in result.stdout


# -- logging ----------------------------------------------------------------------------------------
def ingest_env(cli_env, settings, **extra) -> dict:
    env = cli_env | {"LINEGUARD_TOPIC_PREFIX": settings.topic_prefix, "LINEGUARD_LOG_LEVEL": "DEBUG"} | extra
    env.pop("LINEGUARD_LOG_JSON")   # let the logger decide from the terminal
    return env


def json_lines(text: str) -> list[dict]:
    """Every line of `text` as a JSON object (fails on a line that is not one)."""
    events = []
    for line in text.splitlines():
        event = json.loads(line)
        assert isinstance(event, dict) and {"event", "level", "timestamp"} <= set(event), line
        events.append(event)
    return events


def test_logs_are_json_lines_off_a_terminal_with_frame_and_camera_ids(cli_env, settings):
    result = subprocess.run([*LINEGUARD, "ingest", "simulator", "--limit", "4", "--cameras", "2", "--size", "64"],
                            env=ingest_env(cli_env, settings), capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    *log_lines, summary = result.stderr.strip().splitlines()
    assert summary.startswith("published 4 frame(s)")
    events = json_lines("\n".join(log_lines))
    sent = [e for e in events if e["event"] == "frame_sent"]
    assert [e["level"] for e in sent] == ["debug"] * 4
    done = [e for e in events if e["event"] == "ingest_done"]
    assert len(done) == 1 and done[0]["published"] == 4 and done[0]["per_camera"] == {"cam-0": 2, "cam-1": 2}
    # the ids in the log are those of the frames on the topic
    metas = [decode_frame(r.value, r.headers)[0] for r in read_topic_sync(settings, FRAMES, expect=4)]
    assert sorted((e["frame_id"], e["camera_id"]) for e in sent) == sorted((m.frame_id, m.camera_id) for m in metas)


def test_logs_are_pretty_key_values_on_a_terminal(cli_env, settings):
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen([*LINEGUARD, "ingest", "simulator", "--limit", "2", "--size", "64"],
                                   env=ingest_env(cli_env, settings), stdout=subprocess.DEVNULL, stderr=follower)
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:          # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(60) == 0, output.decode(errors="replace")
    finally:
        os.close(leader)
    lines = [ANSI.sub("", line) for line in output.decode().splitlines() if line.strip()]
    sent = [line for line in lines if "frame_sent" in line]
    assert len(sent) == 2
    for line in sent:
        assert not line.lstrip().startswith("{")
        assert re.search(r"frame_id=line-1\.cam-0\.\w+\.000000[01]", line) and "camera_id=cam-0" in line


# -- --loop ----------------------------------------------------------------------------------------
def run_ingest(args, env, timeout=90):
    return subprocess.run([*LINEGUARD, "ingest", *args], env=env, capture_output=True, text=True, timeout=timeout)


def published_frames(settings, n: int):
    records = read_topic_sync(settings, FRAMES, expect=n, idle_s=1.5)
    return [decode_frame(r.value, r.headers)[0] for r in records]   # one camera: one partition, in order


def test_loop_starts_a_folder_again_until_the_limit(cli_env, settings, tmp_path):
    folder = tmp_path / "widget"
    folder.mkdir()
    names = [f"part_{i}.png" for i in range(3)]
    for i, name in enumerate(names):
        cv2.imwrite(str(folder / name), np.full((40, 56, 3), 60 * i, np.uint8))
    env = ingest_env(cli_env, settings)

    once = run_ingest([str(folder), "--limit", "7"], env)   # without --loop the folder ends after 3
    assert once.returncode == 0, once.stderr
    assert "published 3 frame(s)" in once.stderr
    looped = run_ingest([str(folder), "--limit", "7", "--loop"], env)
    assert looped.returncode == 0, looped.stderr
    assert "published 7 frame(s)" in looped.stderr

    metas = published_frames(settings, 10)
    assert [os.path.basename(m.source) for m in metas] == names + (names * 3)[:7]
    again = metas[3:]
    assert [m.seq for m in again] == list(range(7)) and len({m.frame_id for m in again}) == 7
    assert {m.product for m in metas} == {"widget"}


def test_loop_starts_a_video_file_again(cli_env, settings, tmp_path):
    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    for i in range(3):
        writer.write(np.full((48, 64, 3), 60 * i, np.uint8))
    writer.release()

    result = run_ingest([str(path), "--product", "disc", "--limit", "8", "--loop"], ingest_env(cli_env, settings))
    assert result.returncode == 0, result.stderr
    assert "published 8 frame(s)" in result.stderr
    records = read_topic_sync(settings, FRAMES, expect=8, idle_s=1.5)
    levels = []
    for record in records:
        meta, jpeg = decode_frame(record.value, record.headers)
        assert meta.product == "disc" and meta.source == str(path)
        levels.append(int(round(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).mean() / 60)))
    assert levels == [0, 1, 2, 0, 1, 2, 0, 1]      # the file starts again from its first frame


def test_loop_on_the_endless_simulator_still_stops_at_the_limit(cli_env, settings):
    result = run_ingest(["simulator", "--limit", "5", "--loop", "--size", "64"], ingest_env(cli_env, settings))
    assert result.returncode == 0, result.stderr
    assert "published 5 frame(s)" in result.stderr
    assert len(published_frames(settings, 5)) == 5


# -- delivery failures -----------------------------------------------------------------------------
def test_broker_dying_mid_stream_is_one_error_line_and_exit_1(cli_env, tmp_path):
    """The frames in flight when the broker dies are never acknowledged: ingest says so and exits 1,
    within the acknowledgement deadline (2 x the 10 s request timeout), instead of waiting for ever."""
    from lineguard.settings import load_settings
    from lineguard.stack import EmbeddedStack

    own = EmbeddedStack(load_settings(state_dir=tmp_path / "state", embedded_kafka_port=0), with_influx=False)
    own.start()
    log_path = tmp_path / "ingest.log"
    env = cli_env | {"LINEGUARD_KAFKA_BOOTSTRAP": own.kafka_bootstrap, "LINEGUARD_LOG_LEVEL": "DEBUG",
                     "LINEGUARD_KAFKA_REQUEST_TIMEOUT_MS": "5000"}   # the embedded floor is 10 s
    try:
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen([*LINEGUARD, "ingest", "simulator", "--rate", "20", "--size", "64"], env=env,
                                       stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            deadline = time.monotonic() + 60
            while log_path.read_text().count('"frame_sent"') < 10:
                assert time.monotonic() < deadline and process.poll() is None, log_path.read_text()[-2000:]
                time.sleep(0.1)
            os.killpg(own.pids["tansu"], signal.SIGKILL)      # the broker dies mid-stream
            killed = time.monotonic()
            code = process.wait(60)
            took = time.monotonic() - killed
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    finally:
        own.stop()
    *log_lines, last = log_path.read_text().strip().splitlines()
    assert code == 1, last
    assert took < 45, f"ingest took {took:.0f} s to give up"
    assert re.fullmatch(rf"error: (\d+) frame\(s\) were not acknowledged by {re.escape(own.kafka_bootstrap)} "
                        r"\((\d+) acknowledged\); see the frame_delivery_failed log lines", last), last
    events = json_lines("\n".join(log_lines))        # aiokafka's own errors are JSON lines too
    failed = [e for e in events if e["event"] == "frame_delivery_failed"]
    assert int(re.search(r"error: (\d+)", last).group(1)) == len(failed) > 0
    assert all(e["frame_id"].startswith(f"line-1.{e['camera_id']}.") and e["error"] for e in failed)
    assert any(e.get("logger", "").startswith("aiokafka") for e in events)
    assert not [e for e in events if e["event"] == "ingest_done"]


# -- topics ------------------------------------------------------------------------------------------
def test_topics_have_the_documented_partitions_and_configs(settings):
    """Read back from the broker with the admin client: DescribeTopics and DescribeConfigs (Tansu has both)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from lineguard import tansu
    from lineguard.kafka import client_kwargs, start_client
    from lineguard.topics import DAY_MS

    names = [settings.topic(t.name) for t in TOPICS]

    async def describe():
        admin = AIOKafkaAdminClient(**client_kwargs(settings) | tansu.admin_overrides())
        await start_client(settings, admin)
        try:
            topics = await admin.describe_topics(names)
            configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
        finally:
            await admin.close()
        return topics, configs

    topics, responses = asyncio.run(describe())
    partitions = {info["topic"]: len(info["partitions"]) for info in topics}
    assert partitions == {settings.topic(name): n for name, n in
                          [("frames", 6), ("verdicts", 6), ("heatmaps", 6), ("labels", 3), ("model-updates", 1),
                           ("deadletter", 1)]}
    configs = {}
    for response in responses:
        for error_code, _, _, name, entries in response.resources:
            assert error_code == 0, name
            configs[name] = {entry[0]: entry[1] for entry in entries}
    retention_days = {"frames": 1, "verdicts": 7, "heatmaps": 1, "labels": 30, "model-updates": 30, "deadletter": 30}
    for name, days in retention_days.items():
        config = configs[settings.topic(name)]
        assert config["retention.ms"] == str(days * DAY_MS), name
        assert config["max.message.bytes"] == str(settings.kafka_max_message_bytes), name
