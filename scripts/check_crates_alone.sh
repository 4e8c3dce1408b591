#!/usr/bin/env bash
# Checks each publishable crate of the workspace on its own: with its default features, with
# none, and with all. A workspace build unifies features across its crates, so a crate can
# compile inside it and fail for a user who depends on it alone (cqrs-macros did: syn's
# `Clone` impls came from another crate's syn features), or with one of its own features on.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { echo "python3 is needed to read cargo metadata" >&2; exit 1; }
# Captured first: a failing `cargo metadata` (a lock file out of step) stops the script here.
metadata=$(cargo metadata --locked --no-deps --format-version 1)
# Publishable crates: those whose manifest does not say `publish = false` (an empty list).
mapfile -t crates < <(python3 -c '
import json, sys
for package in json.load(sys.stdin)["packages"]:
    if package["publish"] != []:
        print(package["name"], "default" in package["features"], bool(package["features"]))
' <<<"$metadata")
((${#crates[@]} > 0)) || { echo "cargo metadata listed no publishable crate" >&2; exit 1; }
for entry in "${crates[@]}"; do
    read -r crate has_defaults has_features <<<"$entry"
    echo "--- $crate"
    cargo check --locked --quiet -p "$crate" --lib
    if [[ $has_defaults == True ]]; then
        echo "--- $crate --no-default-features"
        cargo check --locked --quiet -p "$crate" --lib --no-default-features
    fi
    if [[ $has_features == True ]]; then
        echo "--- $crate --all-features"
        cargo check --locked --quiet -p "$crate" --lib --all-features
    fi
done
