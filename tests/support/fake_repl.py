#!/usr/bin/env python3
"""A stand-in for leanprover-community/repl, for tests of the checker's `repl` backend.

Protocol as in tests/data/lean/repl_*.{in,out}: requests are JSON objects separated by a blank
line; each response is pretty-printed JSON followed by a blank line. `{"cmd": ...}` without
`env` starts a new environment (the header) and answers `{"env": n}`; `{"cmd": ..., "env": n}`
checks a command in it and answers `{"messages": [...], "sorries": [...], "env": m}`, messages
being `{"severity": "info"|"warning"|"error", "pos", "endPos", "data"}`.

With no directive the command is accepted: the checker's `#print axioms NAME` line gets
"'NAME' does not depend on any axioms". Directives in comments, `-- fake:WHAT ARGS`:
error, sorry, axiom NAME, hang, sleep SECONDS, die, die-once MARKER, memory MB. Options: `--pidfile PATH`
appends this worker's pid (one line per started worker); `--log PATH` appends one line per
request ("header" or "proof").
"""
import json
import os
import re
import sys
import time

ARGS = sys.argv[1:]


def option(name):
    return ARGS[ARGS.index(name) + 1] if name in ARGS else None


PIDFILE = option("--pidfile")
LOG = option("--log")
if PIDFILE:
    with open(PIDFILE, "a") as f:
        f.write(f"{os.getpid()}\n")

ENVS = [0]


def log(what):
    if LOG:
        with open(LOG, "a") as f:
            f.write(f"{os.getpid()} {what}\n")


def respond(obj):
    sys.stdout.write(json.dumps(obj, indent=1, ensure_ascii=False) + "\n\n")
    sys.stdout.flush()


def msg(severity, line, column, data):
    return {
        "severity": severity,
        "pos": {"line": line, "column": column},
        "endPos": {"line": line, "column": column + 5},
        "data": data,
    }


def check(cmd):
    lines = cmd.split("\n")
    audit_line, name = next(
        ((i + 1, m.group(1)) for i, l in enumerate(lines) if (m := re.match(r"#print axioms (\S+)", l))),
        (len(lines), "unknown"),
    )
    what, wargs, at = None, [], 1
    for i, line in enumerate(lines):
        m = re.search(r"-- fake:(\S+)(.*)", line)
        if m:
            what, wargs, at = m.group(1), m.group(2).split(), i + 1
            break
    messages, sorries, axioms = [], [], []
    if what == "error":
        messages.append(msg("error", at + 1, 2, "unsolved goals\n⊢ Nat"))
    elif what == "sorry":
        sorries.append({"proofState": 0, "pos": {"line": at + 1, "column": 2}, "goal": "⊢ True",
                        "endPos": {"line": at + 1, "column": 7}})
        messages.append(msg("warning", 1, 8, "declaration uses 'sorry'"))
        axioms = ["sorryAx"]
    elif what == "axiom":
        axioms = ["propext"] + wargs
    elif what == "hang":
        while True:
            time.sleep(1000)
    elif what == "sleep":
        time.sleep(float(wargs[0]))
    elif what == "die":
        os._exit(1)
    elif what == "die-once":
        if not os.path.exists(wargs[0]):
            open(wargs[0], "w").close()
            os._exit(1)
    elif what == "memory":
        hog = bytearray(int(wargs[0]) << 20)
        for i in range(0, len(hog), 4096):
            hog[i] = 1
        time.sleep(30)
    text = (f"'{name}' depends on axioms: [{', '.join(axioms)}]" if axioms
            else f"'{name}' does not depend on any axioms")
    messages.append(msg("info", audit_line, 0, text))
    out = {"messages": messages}
    if sorries:
        out = {"sorries": sorries, **out}
    return out


def requests():
    buf = []
    for line in sys.stdin:
        if line.strip():
            buf.append(line)
        elif buf:
            yield json.loads("".join(buf))
            buf = []
    if buf:
        yield json.loads("".join(buf))


for request in requests():
    if "cmd" not in request:
        respond({"message": "Lean error:\n<input>:1:1: unknown command"})
        continue
    if "env" not in request or request["env"] is None:
        log("header")
        out = {}
    else:
        log("proof")
        out = check(request["cmd"])
    out["env"] = ENVS[0]
    ENVS[0] += 1
    respond(out)
