#!/usr/bin/env python3
"""A Lean REPL stand-in that answers with real REPL output, for the kimina contract test.

tests/lean_kimina_server.rs starts the real kimina-lean-server (PyPI kimina-ast-server) with this
script as its REPL (`lake env REPL` there, a `lake` shim here). Protocol as in
tests/data/lean/repl_*.{in,out}: a request is a JSON object followed by a blank line
(`{"cmd": ..., "env": n}`; kimina sends the import header first without `env`, then each body
with `"env": 0, "gc": true`); an answer is a JSON object followed by a blank line.

Answers come from the real REPL fixtures, chosen by a directive in the command,
`-- fake:WHAT [ARG]`:

  (none)       repl_v4.33.0-rc2_line_breaks.out #3: `{"env": 2}`, a clean proof
  error        repl_v4.33.0-rc2_incomplete.out #1: `unsolved goals` error
  sorry        repl_v4.33.0-rc2_line_breaks.out #2: `sorries` + `declaration uses `sorry`` warning
  repl-error   repl_v4.33.0-rc2_unknown_tactic.out #2: a REPL-level `{"message": ...}`
  sleep S      the clean answer after S seconds
  hang         no answer (until the parent, the server, kills us or goes away)
  die          exit without an answer (a REPL crash)

The fixture's `env` is replaced by this process's own counter, and a command that contains
`#print axioms NAME` also gets Lean's answer to it (the real message texts, as in
tests/data/lean/leanjson_*.jsonl) as an info message on that line: `[sorryAx]` after an error or
a sorry, none otherwise. A command made only of `import` lines (kimina's header) answers
`{"env": n}`. `--log PATH` appends one line per command: `header`, `proof WHAT` or `other`.
"""
import json
import os
import re
import sys
import time
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "data" / "lean"
ARGS = sys.argv[1:]
LOG = ARGS[ARGS.index("--log") + 1] if "--log" in ARGS else None
PARENT = os.getppid()
ENV = [0]


def fixture(name, index):
    """Response `index` (0-based) of a fixture's pretty-printed, blank-line separated answers."""
    text = (FIXTURES / name).read_text(encoding="utf-8")
    return [json.loads(part) for part in text.split("\n\n") if part.strip()][index]


ANSWERS = {
    None: ("repl_v4.33.0-rc2_line_breaks.out", 2),
    "sleep": ("repl_v4.33.0-rc2_line_breaks.out", 2),
    "error": ("repl_v4.33.0-rc2_incomplete.out", 0),
    "sorry": ("repl_v4.33.0-rc2_line_breaks.out", 1),
    "repl-error": ("repl_v4.33.0-rc2_unknown_tactic.out", 1),
}


def log(what):
    if LOG:
        with open(LOG, "a") as f:
            f.write(f"{what}\n")


def respond(obj):
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n\n")
    sys.stdout.flush()


def wait_for_death():
    # Sleep in short steps so that a server killed without reaping us does not leave us behind.
    while os.getppid() == PARENT:
        time.sleep(0.2)
    os._exit(0)


def answer(cmd):
    lines = cmd.split("\n")
    if all(not l.strip() or l.strip().startswith("import ") for l in lines):
        log("header")
        return {}
    directive = re.search(r"-- fake:(\S+)[ \t]*(\S*)", cmd)
    what, arg = (directive.group(1), directive.group(2)) if directive else (None, "")
    audit = next(
        ((i + 1, m.group(1)) for i, l in enumerate(lines) if (m := re.match(r"#print axioms (\S+)", l))),
        None,
    )
    log(f"proof {what}" if audit else "other")
    if what == "hang":
        wait_for_death()
    if what == "die":
        os._exit(1)
    if what == "sleep":
        time.sleep(float(arg))
    out = fixture(*ANSWERS.get(what, ANSWERS[None]))
    if "message" in out or audit is None:
        return out
    line, name = audit
    text = (f"'{name}' depends on axioms: [sorryAx]" if what in ("error", "sorry")
            else f"'{name}' does not depend on any axioms")
    out.setdefault("messages", []).append({
        "severity": "info",
        "pos": {"line": line, "column": 0},
        "endPos": {"line": line, "column": 13},
        "data": text,
    })
    return out


def requests():
    buf = []
    for line in sys.stdin:
        if line.strip():
            buf.append(line)
        elif buf:
            yield json.loads("".join(buf))
            buf = []


for request in requests():
    out = answer(request.get("cmd", ""))
    if "message" not in out:
        out["env"] = ENV[0]
        ENV[0] += 1
    respond(out)
