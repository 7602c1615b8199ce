#!/usr/bin/env python3
"""A stand-in for `lean [--json] FILE`, for tests of the checker's process backend.

It behaves like Lean 4 on the file it is given, as far as the checker can tell: messages in the
exact `--json` shape of tests/data/lean/real-4.35.0/*.json.out (keys sorted, compact), plain
`FILE:L:C: severity: text` lines without `--json`, exit 1 on an error and 0 otherwise. With no
directive it answers the checker's `#print axioms NAME` line with "'NAME' does not depend on any
axioms", i.e. accepts.

Behaviour is chosen by directives in Lean comments of the checked file (comments pass the
checker's screening untouched): `-- fake:WHAT ARGS...`. See DIRECTIVES below.
"""
import json
import os
import re
import signal
import sys
import time

ARGS = sys.argv[1:]
JSON = "--json" in ARGS
PATH = ARGS[-1]
SRC = open(PATH, encoding="utf-8").read()
LINES = SRC.split("\n")
FILE_NAME = PATH

AUDIT_LINE, NAME = next(
    ((i + 1, m.group(1)) for i, l in enumerate(LINES) if (m := re.match(r"#print axioms (\S+)", l))),
    (len(LINES), "unknown"),
)


def directive():
    for i, line in enumerate(LINES):
        m = re.search(r"-- fake:(\S+)(.*)", line)
        if m:
            return m.group(1), m.group(2).split(), i + 1
    return None, [], 1


WHAT, WARGS, AT = directive()
OUT = []
EXIT = [0]


def message(severity, data, line, column, kind="[anonymous]", end=None, old=False):
    """Record one message; `old` drops `kind`/`isSilent` like Lean before they existed."""
    msg = {
        "caption": "",
        "data": data,
        "endPos": end if end is not None else {"column": column + 5, "line": line},
        "fileName": FILE_NAME,
        "isSilent": False,
        "keepFullRange": False,
        "kind": kind,
        "pos": {"column": column, "line": line},
        "severity": severity,
    }
    if old:
        del msg["kind"], msg["isSilent"]
    OUT.append(msg)
    if severity == "error":
        EXIT[0] = 1


def audit(axioms=None, name=None):
    name = name or NAME
    if axioms:
        text = f"'{name}' depends on axioms: [{', '.join(axioms)}]"
    else:
        text = f"'{name}' does not depend on any axioms"
    message("information", text, AUDIT_LINE, 0, end={"column": 6, "line": AUDIT_LINE})


def emit():
    out = sys.stdout
    for m in OUT:
        if JSON:
            out.write(json.dumps(m, ensure_ascii=False, separators=(",", ":"), sort_keys=True) + "\n")
        elif m["severity"] == "information":
            out.write(m["data"] + "\n")
        else:
            kind = m.get("kind", "[anonymous]")
            sev = m["severity"] if kind in ("[anonymous]", "hasSorry") else f"{m['severity']}({kind.removesuffix('._namedError')})"
            out.write(f"{FILE_NAME}:{m['pos']['line']}:{m['pos']['column']}: {sev}: {m['data']}\n")
    out.flush()


def sleep_forever():
    while True:
        time.sleep(1000)


def fork_sleeper(pidfile):
    """A child in our process group that outlives us unless the group is killed."""
    pid = os.fork()
    if pid == 0:
        with open(pidfile, "a") as f:
            f.write(f"{os.getpid()}\n")
        sleep_forever()
    with open(pidfile, "a") as f:
        f.write(f"{os.getpid()}\n")


def replay(fixture, picks):
    """Print chosen lines of a real `--json` capture, moved onto this file: `#print axioms`
    answers onto the audit line (renamed to our theorem), everything else onto the directive's
    line."""
    lines = [l for l in open(fixture, encoding="utf-8").read().split("\n") if l.startswith("{")]
    for pick in picks:
        m = json.loads(lines[int(pick) - 1])
        m["fileName"] = FILE_NAME
        answer = re.match(r"'(.*?)' (does not depend on any axioms|depends on axioms: )", m["data"])
        if answer:
            m["data"] = f"'{NAME}'" + m["data"][len(answer.group(1)) + 2:]
            m["pos"] = {"column": 0, "line": AUDIT_LINE}
            m["endPos"] = {"column": 6, "line": AUDIT_LINE}
        else:
            m["pos"]["line"] = AT + 1
            if m.get("endPos"):
                m["endPos"]["line"] = AT + 1
        OUT.append(m)
        if m["severity"] == "error":
            EXIT[0] = 1


TYPE_MISMATCH = (
    "Type mismatch\n  MyEq.refl ?m.3\nhas type\n  MyEq ?m.3 ?m.3\nbut is expected to have type\n"
    "  MyEq (N.z.s.add N.z) N.z"
)
HEARTBEATS = (
    "(deterministic) timeout at `isDefEq`, maximum number of heartbeats (50) has been reached\n\n"
    "Note: Use `set_option maxHeartbeats <num>` to set the limit.\n\n"
    "Hint: Additional diagnostic information may be available using the `set_option diagnostics true` command."
)

# DIRECTIVES
if WHAT is None:
    audit()
elif WHAT == "error":
    message("error", TYPE_MISMATCH, AT + 1, 2)
    audit()
elif WHAT == "unknown-id":
    message("error", "Unknown identifier `rfl_this_is_not_a_thing`", AT + 1, 8, kind="lean.unknownIdentifier._namedError")
    audit()
elif WHAT == "sorry-old":
    message("warning", "declaration uses 'sorry'", AT - 1, 8, old=True)
    audit(["sorryAx"])
elif WHAT == "sorry-tick":
    message("warning", "declaration uses `sorry`", AT - 1, 8, kind="hasSorry")
    audit(["sorryAx"])
elif WHAT == "sorry-decl":
    message("warning", f"declaration `{NAME}` uses `sorry`", AT - 1, 8, kind="hasSorry")
    audit(["sorryAx"])
elif WHAT == "sorry-kind-only":
    message("warning", "this declaration has a hole", AT - 1, 8, kind="hasSorry")
    audit()
elif WHAT == "heartbeats":
    message("error", HEARTBEATS, AT + 1, 2, kind="runtime.maxHeartbeats")
    audit()
elif WHAT == "kernel-heartbeats":
    message("error", "(kernel) deterministic timeout", AT - 1, 0)
    audit()
elif WHAT == "axiom":
    audit(["propext"] + WARGS)
elif WHAT == "axioms-wrapped":
    message("information", f"'{NAME}' depends on axioms: [propext,\n Classical.choice,\n Quot.sound]", AUDIT_LINE, 0)
elif WHAT == "spoof-audit":
    message("information", f"'{NAME}' does not depend on any axioms", AT + 1, 2)
    audit(["sorryAx"])
elif WHAT == "no-audit":
    pass
elif WHAT == "replay":
    replay(WARGS[0], WARGS[1:])
elif WHAT == "exit":
    sys.stderr.write("lake: error: build failed\n")
    sys.exit(int(WARGS[0]))
elif WHAT == "crash":
    sys.stdout.write('{"caption":"","data":"partial')
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGSEGV)
elif WHAT == "hang":
    if WARGS:
        with open(WARGS[0], "a") as f:
            f.write(f"{os.getpid()}\n")
    sleep_forever()
elif WHAT == "slow":
    time.sleep(float(WARGS[0]))
    audit()
elif WHAT == "flood":
    chunk = ("x" * 1023 + "\n") * 1024
    for _ in range(int(WARGS[0]) if WARGS else 50):
        sys.stdout.write(chunk)
    audit()
elif WHAT == "fork-exit":
    fork_sleeper(WARGS[0])
    audit()
elif WHAT == "fork-hang":
    fork_sleeper(WARGS[0])
    sleep_forever()
elif WHAT == "memory":
    hog = bytearray(int(WARGS[0]) << 20)
    for i in range(0, len(hog), 4096):
        hog[i] = 1
    time.sleep(30)
    audit()
else:
    sys.stderr.write(f"fake_lean.py: unknown directive {WHAT}\n")
    sys.exit(2)

emit()
sys.exit(EXIT[0])
