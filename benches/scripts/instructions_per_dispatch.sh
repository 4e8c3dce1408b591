#!/usr/bin/env bash
# Instructions per dispatch of one criterion case of the `dispatch` bench, under callgrind:
# the difference between a 1 s and a 3 s `--profile-time` run (so the bench's start-up cancels
# out), divided by the difference in calls to the handler (one per dispatch). Deterministic,
# unlike time on a shared machine.
#
#   benches/scripts/instructions_per_dispatch.sh 'command_dispatch/bus_bare$'
#   benches/scripts/instructions_per_dispatch.sh 'command_dispatch/boxed_async_trait$' local
#
# The first argument is criterion's filter for one case, group included: it must start with
# `command_dispatch/` or `query_dispatch/`, end in `$`, and name the case with letters, digits
# and `_` only (no other regex). Otherwise the script
# refuses it: `bus_bare$` would profile both groups' cases and `command_dispatch/bus_bare` also
# `bus_bare_yielding`, while the dispatches counted are one case's. The second argument `local`
# counts calls to the baseline's handler (`LocalCommandHandler`, `LocalQueryHandler` for the
# `query_dispatch` cases) instead of the bus's. Needs valgrind and python3; builds the bench
# first.
set -euo pipefail
case_regex=${1:-}
case_name=${case_regex#*/}
case_name=${case_name%\$}
if [[ ("$case_regex" != command_dispatch/* && "$case_regex" != query_dispatch/*) ||
      "$case_regex" != *'$' || ! "$case_name" =~ ^[a-z0-9_]+$ ]]; then
  echo "usage: $0 'command_dispatch/<case>\$' [local]  (or 'query_dispatch/<case>\$')" >&2
  echo "one case: starting with command_dispatch/ or query_dispatch/, ending in \$, its name" \
    "letters, digits and '_' only; got: '$case_regex'" >&2
  exit 2
fi
# The script counts calls to the fixture's `handle`: the cases whose handler is another (the
# `_yielding` ones) or that call the logic without it count none.
case "$case_name" in
  *_yielding | direct_await | tower_box_service | mpsc_oneshot_task)
    echo "$case_name calls no \`handle\` of the counted handler: this script cannot count its" \
      "dispatches" >&2
    exit 2
    ;;
esac
if [[ "$case_regex" == query_dispatch/* ]]; then
  fixture=LookupHandler
  trait='cqrs_core::handler::QueryHandler<cqrs_benches::fixtures::Lookup>'
  [[ "${2:-}" == local ]] && trait='cqrs_benches::baseline::LocalQueryHandler'
else
  fixture=IncrementHandler
  trait='cqrs_core::handler::CommandHandler<cqrs_benches::fixtures::Increment>'
  [[ "${2:-}" == local ]] && trait='cqrs_benches::baseline::LocalCommandHandler'
fi
handler="^<cqrs_benches::fixtures::${fixture} as ${trait}>::handle\$"
# The binary cargo names for this build (not the newest file in the target directory: a
# build with other settings may have left a newer one, and `CARGO_TARGET_DIR` may move it).
bin=$(cargo bench -p cqrs-benches --bench dispatch --no-run --message-format=json-render-diagnostics |
  python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message["target"]["name"] == "dispatch" \
            and message.get("executable"):
        print(message["executable"])
')
[[ -n "$bin" ]] || { echo "cargo named no dispatch bench binary" >&2; exit 1; }
out=$(mktemp -d)
for seconds in 1 3; do
  valgrind --tool=callgrind --callgrind-out-file="$out/$seconds.out" \
    "$bin" --bench --profile-time "$seconds" "$case_regex" >/dev/null 2>&1
done
python3 - "$out" "$handler" <<'PY'
import re, sys
out, handler = sys.argv[1], re.compile(sys.argv[2])

def totals(path):
    """Total instructions, and calls into functions whose name matches `handler`."""
    names, total, calls, callee, pending = {}, 0, 0, "", None
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?$", line)
        if m:
            kind, ident, name = m.groups()
            if name:
                names[ident] = name
            if kind == "cfn":
                callee = names.get(ident, "")
            continue
        if line.startswith("calls="):
            pending = int(line.split()[0][len("calls="):])
        elif line.startswith(("summary:", "totals:")):
            total = int(line.split()[1])
        elif pending is not None and (line[:1].isdigit() or line[:1] in "+-*"):
            # The cost line of the call: it counts once `pending` says how many calls.
            if handler.search(callee):
                calls += pending
            pending = None
    return total, calls

(i1, c1), (i3, c3) = totals(f"{out}/1.out"), totals(f"{out}/3.out")
if c3 == c1:
    sys.exit("no calls to the handler counted: is the case name right?")
print(f"{(i3 - i1) / (c3 - c1):.0f} instructions per dispatch ({c3 - c1} dispatches)")
PY
rm -r "$out"
