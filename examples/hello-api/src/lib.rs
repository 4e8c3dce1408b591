//! The contract between the `hello` binary and its plugins.
//!
//! The binary never names a plugin. It knows only these types: the messages it sends, and
//! [`Route`], a contribution type of its own that plugins provide through
//! [`PluginRegistrar::contribute`](cqrs_core::PluginRegistrar::contribute). The core knows
//! nothing about routes: contributions are open.

use cqrs_core::{Command, Event};
use serde::{Deserialize, Serialize};

/// Greets someone; answers with the greeting.
#[derive(Debug, Command)]
#[cqrs(name = "hello.greet", output = String)]
pub struct Greet {
    /// Who to greet.
    pub name: String,
}

/// Someone was greeted.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Event)]
#[cqrs(name = "hello.greeted")]
pub struct Greeted {
    /// Who was greeted.
    pub name: String,
}

/// A server-defined contribution: an entry point a plugin offers. (A real server would carry an
/// HTTP router here; this one only lists them.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The path, such as `/greet`.
    pub path: &'static str,
    /// What it does.
    pub description: &'static str,
}
