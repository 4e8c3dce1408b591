//! The core's rustdoc examples are compiled in this crate, which depends on `async-trait`,
//! `chrono`, `tower`, `serde_json`, `uuid`, `thiserror`, `tracing` and `metrics`; a user's
//! crate set up as the guide says has none of them. An example that names one directly compiles here and fails with E0432 once
//! copied, so the examples reach them through `cqrs_core::async_trait` and
//! `cqrs_core::reexports`.

use std::path::{Path, PathBuf};

/// Crates the core depends on that a user's crate does not (`serde` and `tokio` it has: the
/// derives, and the runtime).
const NOT_A_USERS: [&str; 8] = [
    "async_trait",
    "chrono",
    "tower",
    "serde_json",
    "uuid",
    "thiserror",
    "tracing",
    "metrics",
];

#[test]
fn doc_examples_import_only_what_a_users_crate_has() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    assert!(files.len() > 20, "found the sources: {files:?}");
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let mut in_code = false;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_start();
            let Some(doc) = line
                .strip_prefix("///")
                .or_else(|| line.strip_prefix("//!"))
            else {
                continue;
            };
            let doc = doc.trim_start();
            if doc.starts_with("```") {
                in_code = !in_code;
                continue;
            }
            if in_code && let Some(name) = names_directly(doc) {
                found.push(format!("{}:{}: `{name}::` in {doc}", file.display(), n + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "doc examples that name a crate a user's crate does not have (use \
         `cqrs_core::async_trait` or `cqrs_core::reexports::..`):\n{}",
        found.join("\n")
    );
}

/// The first of [`NOT_A_USERS`] that `code` names as the start of a path (`chrono::Utc`, not
/// `reexports::chrono::Utc`).
fn names_directly(code: &str) -> Option<&'static str> {
    NOT_A_USERS.into_iter().find(|name| {
        let path = format!("{name}::");
        code.match_indices(&path).any(|(at, _)| {
            !code[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c == ':' || c == '_' || c.is_alphanumeric())
        })
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn a_direct_name_is_told_from_a_reexported_one() {
    assert_eq!(
        names_directly("use chrono::{TimeZone, Utc};"),
        Some("chrono")
    );
    assert_eq!(
        names_directly("#[async_trait::async_trait]"),
        Some("async_trait")
    );
    assert_eq!(
        names_directly("let v = serde_json::json!({});"),
        Some("serde_json")
    );
    assert_eq!(
        names_directly("use cqrs_core::reexports::chrono::{TimeZone, Utc};"),
        None
    );
    assert_eq!(names_directly("use cqrs_core::async_trait;"), None);
    assert_eq!(names_directly("my_uuid::Thing"), None);
}
