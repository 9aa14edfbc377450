"""Every grpcurl command in the README's grpcurl section, run by the real grpcurl (1.8.6,
installed into tools/bin by scripts/tools.sh) against a live server: ids are filled in
from earlier answers, every command must succeed, and the answers are checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from typing import Any

from conftest import BINARY, REPO, Server

README = os.path.join(REPO, "README.md")
GRPCURL_DIR = os.path.join(REPO, "tools", "bin")
SERVICE = "krisp.ingest.v1.IngestService"


def blocks() -> list[list[str]]:
    """The README's grpcurl section as a list of code blocks, each a list of commands
    (continued lines joined, here-documents kept with their command)."""
    text = open(README, encoding="utf-8").read()
    section = text.split("### grpcurl\n", 1)[1].split("\n## ", 1)[0]
    found: list[list[str]] = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        commands: list[str] = []
        current, heredoc = "", False
        for line in block.splitlines():
            if heredoc:
                current += "\n" + line
                if line == "EOF":
                    commands.append(current)
                    current, heredoc = "", False
                continue
            if not current and (not line.strip() or line.startswith("#")):
                continue
            current += line
            if line.endswith("\\"):
                current += "\n"
            elif line.endswith("<<'EOF'"):
                heredoc = True
            else:
                commands.append(current)
                current = ""
        found.append(commands)
    return found


def run(
    command: str, address: str, ids: dict[str, str] | None = None, env: dict[str, str] | None = None
) -> tuple[list[Any], str]:
    """Runs one README command with bash; returns its answers (JSON objects)."""
    command = command.replace("localhost:50051", address)
    for placeholder, actual in (ids or {}).items():
        command = command.replace(placeholder, actual)
    env = dict(env or os.environ)
    env["PATH"] = GRPCURL_DIR + os.pathsep + os.path.dirname(BINARY) + os.pathsep + env["PATH"]
    done = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stdout}{done.stderr}"
    answers, position, decoder, out = [], 0, json.JSONDecoder(), done.stdout
    while True:
        while position < len(out) and out[position].isspace():
            position += 1
        if position >= len(out) or out[position] != "{":
            break
        value, position = decoder.raw_decode(out, position)
        answers.append(value)
    return answers, done.stdout


def field(message: dict[str, Any], name: str) -> Any:
    """A field of grpcurl's JSON output (lowerCamelCase JSON names)."""
    camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)
    return message[camel] if camel in message else message[name]


def test_every_readme_grpcurl_command_works_with_the_real_grpcurl(server: str) -> None:
    examples, _keys, protoset = blocks()
    _, listed = run(f"grpcurl -plaintext localhost:50051 list {SERVICE}", server)
    methods = {line.rsplit(".", 1)[1] for line in listed.split()}
    shown = {m for c in examples for m in re.findall(SERVICE + r"/(\w+)", c)}
    assert methods and not methods - shown, f"no README example for {sorted(methods - shown)}"

    ids: dict[str, str] = {}
    for command in examples:
        answers, out = run(command, server, ids)
        method = re.search(SERVICE + r"/(\w+)|grpc\.health\.v1\.Health/(\w+)", command)
        name = method and (method.group(1) or method.group(2))
        if name is None:  # list, describe
            assert SERVICE in out, out
        elif name == "Check":
            assert answers == [{"status": "SERVING"}], out
        elif name == "CreateUser":
            ids["USER_ID"] = field(answers[0], "user")["id"]
        elif name == "CreateSession":
            ids["SESSION_ID"] = field(answers[0], "session")["id"]
        elif name == "JoinSession":
            ids["PARTICIPATION_ID"] = field(answers[0], "participation")["id"]
        elif name == "GetUser":
            assert field(field(answers[0], "user"), "external_id") == "caller-42", out
        elif name in ("StreamSentiments", "StreamEvents"):
            stored = int(field(field(answers[0], "receipt"), "items_stored"))
            assert stored == (2 if name == "StreamSentiments" else 1), out
        elif name == "GetTimeline" and "chunked" in command:
            # [10:02, 10:04): the 2 streamed sentiments and the streamed event, one message.
            assert len(answers) == 1 and len(answers[0]["entries"]) == 3, out
        elif name == "GetTimeline":
            # 1 recorded + 2 streamed sentiments, 1 recorded + 1 streamed event.
            assert len(answers) == 5, out
        elif name == "LiveFeed":
            assert [next(iter(a)) for a in answers] == ["opened", "ack", "closed"], out
            assert int(field(answers[-1]["closed"], "items_stored")) == 2, out
    assert {"USER_ID", "SESSION_ID", "PARTICIPATION_ID"} <= ids.keys()

    # The contract snapshot as a protoset, no reflection needed.
    for command in protoset:
        _, out = run(command, server)
        assert SERVICE in out, out


def test_the_readme_grpcurl_commands_with_an_api_key_work_and_need_it() -> None:
    """The README's key example on a server of its own (keys apply to every call)."""
    _, keys, _ = blocks()
    create, *calls = keys
    assert create.startswith("KEY=$(krisp-ingest keys create")
    server = Server()
    try:
        out = subprocess.run(["bash", "-c", create + '\necho "$KEY"'], env=dict(
            server.env, PATH=os.path.dirname(BINARY) + os.pathsep + os.environ["PATH"]),
            capture_output=True, text=True, timeout=60, check=True).stdout
        env = dict(os.environ, KEY=out.strip().splitlines()[-1])
        time.sleep(6)  # the server re-reads its keys every 5 s
        for command in calls:
            _, answer = run(command, server.address, env=env)
            assert answer.strip(), command
            # The same command without the key is refused.
            bare = command.replace('-H "authorization: Bearer $KEY" ', "")
            assert bare != command
            refused = subprocess.run(
                ["bash", "-c", bare.replace("localhost:50051", server.address)],
                env=dict(env, PATH=GRPCURL_DIR + os.pathsep + os.environ["PATH"]),
                capture_output=True, text=True, timeout=60)
            assert refused.returncode != 0 and "Unauthenticated" in refused.stderr, refused
    finally:
        server.stop()
