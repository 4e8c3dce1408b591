#!/usr/bin/env bash
# Checks each publishable crate of the workspace on its own, with its default features and
# with none: a workspace build unifies features across its crates, so a crate can compile
# inside it and fail for a user who depends on it alone (cqrs-macros did: syn's `Clone` impls
# came from another crate's syn features).
set -euo pipefail
cd "$(dirname "$0")/.."
# Publishable crates: those whose manifest does not say `publish = false`.
mapfile -t crates < <(cargo metadata --locked --no-deps --format-version 1 | python3 -c '
import json, sys
for package in json.load(sys.stdin)["packages"]:
    if package["publish"] is None:
        print(package["name"], "default" in package["features"])
')
((${#crates[@]} > 0)) || { echo "cargo metadata listed no publishable crate" >&2; exit 1; }
for entry in "${crates[@]}"; do
    read -r crate has_defaults <<<"$entry"
    echo "--- $crate"
    cargo check --locked --quiet -p "$crate" --lib
    if [[ $has_defaults == True ]]; then
        echo "--- $crate --no-default-features"
        cargo check --locked --quiet -p "$crate" --lib --no-default-features
    fi
done
