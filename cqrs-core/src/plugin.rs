//! Plugins: crates that join a server by being linked into it.
//!
//! A plugin implements [`Plugin`] and registers itself with [`register_plugin!`](crate::register_plugin).
//! The server calls [`Plugins::collect`], which finds every registered plugin in the binary
//! (through [`inventory`]), orders them so that dependencies come first, and
//! [`Plugins::install`]s them into a [`PluginRegistrar`]: each plugin adds its bus handlers and
//! whatever else the server asks plugins for (HTTP routes, OpenAPI fragments, migrations) as
//! [contributions](PluginRegistrar::contribute) of the server's own types.
//!
//! **The linker drops crates that nothing names.** A plugin crate that is only listed in
//! `Cargo.toml` is not linked, and its registration never runs. Name it once in the binary's
//! crate root (and in each test, bench or example crate that needs it):
//!
//! ```ignore
//! use helpdesk_tickets as _;
//! ```
//!
//! [`Plugins::expect`] turns a forgotten line into a start-up error that says so.

use crate::{BoxError, CommandHandlers, EventHandlers, MessageType, QueryHandlers};
use std::any::{Any, TypeId, type_name};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// A unit of functionality that registers handlers and contributions with a server.
///
/// ```
/// use cqrs_core::{BoxError, Plugin, PluginRegistrar, register_plugin};
/// # use cqrs_core::doc::OpenTicketHandler;
///
/// struct TicketsPlugin;
///
/// impl Plugin for TicketsPlugin {
///     fn name(&self) -> &'static str { "tickets" }
///     fn version(&self) -> &'static str { env!("CARGO_PKG_VERSION") }
///     fn depends_on(&self) -> &'static [&'static str] { &[] }
///
///     fn register(&self, registrar: &mut PluginRegistrar) -> Result<(), BoxError> {
///         registrar.commands().add(OpenTicketHandler);
///         Ok(())
///     }
/// }
///
/// register_plugin!(TicketsPlugin);
/// ```
pub trait Plugin: Send + Sync + 'static {
    /// A unique name, such as `"tickets"`: 1 to 64 ASCII letters, digits, `.`, `_` and `-`
    /// ([`PluginError::InvalidName`] otherwise).
    fn name(&self) -> &'static str;

    /// The plugin's version, usually `env!("CARGO_PKG_VERSION")`.
    fn version(&self) -> &'static str;

    /// Names of plugins that must be installed before this one.
    fn depends_on(&self) -> &'static [&'static str] {
        &[]
    }

    /// Adds handlers and contributions. Called once, after every dependency's `register`.
    fn register(&self, registrar: &mut PluginRegistrar) -> Result<(), BoxError>;
}

/// One plugin in the binary's inventory. Made by [`register_plugin!`](crate::register_plugin);
/// not used directly.
#[doc(hidden)]
#[derive(Debug)]
pub struct PluginRegistration {
    make: fn() -> Box<dyn Plugin>,
}

impl PluginRegistration {
    #[doc(hidden)]
    pub const fn new(make: fn() -> Box<dyn Plugin>) -> Self {
        Self { make }
    }
}

inventory::collect!(PluginRegistration);

/// Registers a plugin so that [`Plugins::collect`] finds it in any binary that links this crate.
///
/// The argument is an expression that builds the plugin; it is evaluated when plugins are
/// collected, not at load time.
///
/// ```
/// # use cqrs_core::{BoxError, Plugin, PluginRegistrar};
/// struct Audit;
/// # impl Plugin for Audit {
/// #     fn name(&self) -> &'static str { "audit" }
/// #     fn version(&self) -> &'static str { "1.0.0" }
/// #     fn register(&self, _: &mut PluginRegistrar) -> Result<(), BoxError> { Ok(()) }
/// # }
/// cqrs_core::register_plugin!(Audit);
/// ```
#[macro_export]
macro_rules! register_plugin {
    ($plugin:expr) => {
        $crate::__private::inventory::submit! {
            $crate::__private::PluginRegistration::new(|| ::std::boxed::Box::new($plugin))
        }
    };
}

/// Why plugins could not be collected or installed. Each message names the plugins involved.
/// Its `Debug` is that message too, which says what to do: a `main` that returns the error
/// (`fn main() -> Result<(), Box<dyn Error>>`) prints the `Debug` form.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// Two plugins share a name. Rename one, or link only one of them.
    #[error("{}", duplicate_message(name, first, second))]
    Duplicate {
        /// The shared name.
        name: String,
        /// The first one's version.
        first: String,
        /// The second one's version.
        second: String,
    },
    /// A plugin's name is empty, longer than 64 bytes, or holds a character outside ASCII
    /// letters, digits, `.`, `_` and `-`. Rename it (its [`name()`](Plugin::name)): the name goes into relay,
    /// checkpoint and metric names, and an empty one is what the buses call the server's own.
    #[error(
        "plugin {} (version {version}) cannot be named so: {problem}; rename it (its `name()`)",
        if name.is_empty() { "``".to_owned() } else { format!("{name:?}") }
    )]
    InvalidName {
        /// The name.
        name: String,
        /// The plugin's version, to tell which one it is.
        version: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A plugin depends on plugins that are not linked, or names them wrongly. Link them, or
    /// fix the names in the dependent plugin's [`depends_on()`](Plugin::depends_on). When
    /// several plugins miss dependencies, this names the first of them by name.
    #[error(
        "plugin `{plugin}` depends on {}, which {}, or fix {} in `depends_on()` of `{plugin}` (found: {})",
        quoted_list(dependencies),
        missing_advice(*given, dependencies.len()),
        if dependencies.len() == 1 { "the name" } else { "the names" },
        found_list(found)
    )]
    MissingDependency {
        /// The dependent plugin.
        plugin: String,
        /// Every plugin it depends on that is missing, in its `depends_on()` order.
        dependencies: Vec<String>,
        /// The plugins that were found, by name.
        found: Vec<String>,
        /// Whether the plugins were given ([`Plugins::from_plugins`]) rather than collected
        /// from the binary ([`Plugins::collect`]).
        given: bool,
    },
    /// Plugins depend on each other in a cycle. Remove one of the dependencies from its
    /// plugin's [`depends_on()`](Plugin::depends_on), for instance by moving what both need
    /// into a plugin of its own.
    #[error("{}", cycle_message(plugins))]
    Cycle {
        /// The plugins in the cycle.
        plugins: Vec<String>,
    },
    /// A plugin the server expects is not linked (or not in the list given).
    #[error("expected plugin(s) {} {} (found: {})", missing.join(", "), missing_advice(*given, missing.len()), found_list(found))]
    NotLinked {
        /// The expected plugins that are missing.
        missing: Vec<String>,
        /// The plugins that were found.
        found: Vec<String>,
        /// Whether the plugins were given ([`Plugins::from_plugins`]) rather than collected
        /// from the binary ([`Plugins::collect`]).
        given: bool,
    },
    /// A plugin's `register` failed.
    #[error("plugin `{plugin}` failed to register: {source}")]
    Register {
        /// The plugin.
        plugin: String,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// Plugins contributed values of types the server never took
    /// ([`PluginRegistrar::check_contributions_taken`]): the server asks for another type
    /// than the one contributed (a `Box<T>` or `&T` instead of `T`; a `T` of another version
    /// of the crate that defines it), or does not ask at all.
    #[error("{}", untaken_message(untaken))]
    UntakenContributions {
        /// Each type never taken, by type name.
        untaken: Vec<UntakenContribution>,
    },
    /// A plugin asked for a resource the server did not provide.
    #[error(
        "plugin `{plugin}` needs a `{}`, which the server did not provide: call `PluginRegistrar::provide::<{}>(..)` before installing plugins (resources are found by their exact type: an `Arc<InMemoryEventStore>` provided is no `Arc<dyn EventStore>`, so name the type)",
        as_written(resource),
        as_written(resource)
    )]
    MissingResource {
        /// The plugin.
        plugin: String,
        /// The resource's type name.
        resource: &'static str,
    },
}

impl fmt::Debug for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)?;
        // `Register` shows its source in its message: its causes start one level deeper.
        let mut cause = std::error::Error::source(self);
        if matches!(self, PluginError::Register { .. }) {
            cause = cause.and_then(std::error::Error::source);
        }
        while let Some(error) = cause {
            write!(f, "\n  caused by: {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

/// A type's name as its user writes it: `std::any::type_name` names the crates that define
/// what `std` re-exports (`alloc::sync::Arc`, `core::time::Duration`). Only a path that starts
/// with one of them is renamed, not a name that ends in one (`cqrs_core::`, `a::core::`).
pub(crate) fn as_written(type_name: &str) -> String {
    let mut written = String::with_capacity(type_name.len());
    let mut rest = type_name;
    while let Some(c) = rest.chars().next() {
        let starts_a_path = written
            .chars()
            .next_back()
            .is_none_or(|before| !(before.is_alphanumeric() || before == '_' || before == ':'));
        if starts_a_path
            && let Some(after) = ["alloc::", "core::"]
                .iter()
                .find_map(|krate| rest.strip_prefix(krate))
        {
            written.push_str("std::");
            rest = after;
            continue;
        }
        written.push(c);
        rest = &rest[c.len_utf8()..];
    }
    written
}

/// The plugins found, by name, or "none".
fn found_list(found: &[String]) -> String {
    if found.is_empty() {
        "none".to_owned()
    } else {
        found.join(", ")
    }
}

/// `` `a` ``, `` `a` and `b` ``, `` `a`, `b` and `c` ``.
fn quoted_list(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => quoted.concat(),
    }
}

/// A contributed type the server never took ([`PluginError::UntakenContributions`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct UntakenContribution {
    /// The type, as `std::any::type_name` writes it.
    pub type_name: String,
    /// The plugins that contributed it, in installation order (an empty name for the
    /// server's own).
    pub plugins: Vec<String>,
}

/// Which contributed types nobody took, from whom, and what to check.
fn untaken_message(untaken: &[UntakenContribution]) -> String {
    let listed: Vec<String> = untaken
        .iter()
        .map(|UntakenContribution { type_name, plugins }| {
            let from: Vec<String> = plugins
                .iter()
                .map(|plugin| {
                    if plugin.is_empty() {
                        "the server".to_owned()
                    } else {
                        format!("plugin `{plugin}`")
                    }
                })
                .collect();
            format!("`{}` (from {})", as_written(type_name), from.join(", "))
        })
        .collect();
    format!(
        "contributions of {} the server never took: {}; the server takes each type it asks \
         plugins for with `take_contributions::<T>()`, and only values of exactly that type: \
         check that the plugin contributes the server's type (not a `Box` or a reference of \
         it, nor the type of another version of the crate that defines it: `cargo tree -d`)",
        if untaken.len() == 1 {
            "a type"
        } else {
            "types"
        },
        listed.join(", ")
    )
}

/// Two plugins of one name: two versions of one crate linked (`cargo tree -d` shows them),
/// or, of one version, a crate registered twice or two crates that chose one name.
fn duplicate_message(name: &str, first: &str, second: &str) -> String {
    let (versions, cause) = if first == second {
        (
            format!("both version {first}"),
            "a crate registers it twice (`register_plugin!` twice, a linked plugin passed to \
             `Plugins::collect_with` as well, or one listed twice for `Plugins::from_plugins`), \
             or two crates chose the same name",
        )
    } else {
        (
            format!("versions {first} and {second}"),
            "two versions of one plugin crate are linked (check `cargo tree -d`), or two \
             crates chose the same name",
        )
    };
    format!(
        "two plugins are named `{name}` ({versions}); plugin names must be unique: rename one \
         (its `name()`), or link only one of them ({cause})"
    )
}

/// What is wrong with a plugin's name, if anything. The wire names' rule: a name goes into
/// relay, checkpoint and metric names, and the empty one means "the server's own" (handlers
/// added on the bus builder, `take_contributions_by_plugin`).
fn name_problem(name: &str) -> Option<String> {
    use crate::record::{MAX_WIRE_NAME_LEN, is_wire_name_char};
    if name.is_empty() {
        return Some("a plugin name cannot be empty".to_owned());
    }
    if name.len() > MAX_WIRE_NAME_LEN {
        return Some(format!(
            "a plugin name is at most {MAX_WIRE_NAME_LEN} bytes; this one has {}",
            name.len()
        ));
    }
    name.chars().find(|c| !is_wire_name_char(*c)).map(|c| {
        format!("a plugin name takes ASCII letters, digits, `.`, `_` and `-` only, not {c:?}")
    })
}

/// A cycle, `a -> b -> a`; a plugin that names itself is said so.
fn cycle_message(plugins: &[String]) -> String {
    if let [only, again] = plugins
        && only == again
    {
        return format!(
            "plugin `{only}` depends on itself; remove `{only}` from its own `depends_on()`"
        );
    }
    format!(
        "plugins depend on each other in a cycle: {}; remove one of these dependencies from its \
         plugin's `depends_on()` (move what both need into a plugin of its own)",
        plugins.join(" -> ")
    )
}

/// What to do about a plugin that was not found: link its crate, or, when the plugins were
/// given in a list, add it there; in the singular for a `count` of 1, else in the plural.
fn missing_advice(given: bool, count: usize) -> String {
    let (verb, them) = if count == 1 {
        ("is", "it")
    } else {
        ("are", "them")
    };
    if given {
        format!("{verb} not in the list given to `Plugins::from_plugins`; add {them} there")
    } else {
        format!(
            "{verb} not linked into this binary; each needs its crate as a dependency and a \
             `use <crate> as _;` line in the crate root (or, when not registered through \
             inventory, a place in the list given to `Plugins::collect_with`); a plugin crate \
             built against another version of cqrs-core registers with that version and is \
             not found either (`cargo tree -d -i cqrs-core` lists them)"
        )
    }
}

/// The plugins linked into this binary, in installation order: each after its dependencies,
/// and otherwise by name.
pub struct Plugins {
    ordered: Vec<Box<dyn Plugin>>,
    /// Given to `from_plugins`, not collected from the binary: what a missing one needs.
    given: bool,
}

impl fmt::Debug for Plugins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.ordered.iter().map(|p| (p.name(), p.version())))
            .finish()
    }
}

impl Plugins {
    /// Every plugin registered with [`register_plugin!`](crate::register_plugin) in the crates
    /// linked into this binary, ordered.
    pub fn collect() -> Result<Self, PluginError> {
        Self::order(
            inventory::iter::<PluginRegistration>
                .into_iter()
                .map(|r| (r.make)())
                .collect(),
            false,
        )
    }

    /// The plugins linked into this binary ([`collect`](Self::collect)) and `extra`, handed
    /// over directly (a test's plugin, or a server's own that it does not register through
    /// inventory), ordered together. A name in both is a [`PluginError::Duplicate`].
    pub fn collect_with(extra: Vec<Box<dyn Plugin>>) -> Result<Self, PluginError> {
        Self::order(
            inventory::iter::<PluginRegistration>
                .into_iter()
                .map(|r| (r.make)())
                .chain(extra)
                .collect(),
            false,
        )
    }

    /// Orders an explicit list of plugins (tests, or servers that do not use inventory).
    pub fn from_plugins(plugins: Vec<Box<dyn Plugin>>) -> Result<Self, PluginError> {
        Self::order(plugins, true)
    }

    fn order(mut plugins: Vec<Box<dyn Plugin>>, given: bool) -> Result<Self, PluginError> {
        // Inventory hands plugins over in link order: sorted first, the same plugins give the
        // same error, whatever the order of the crates on the linker's command line.
        plugins.sort_by(|a, b| (a.name(), a.version()).cmp(&(b.name(), b.version())));
        let mut by_name: BTreeMap<&'static str, Box<dyn Plugin>> = BTreeMap::new();
        for plugin in plugins {
            if let Some(problem) = name_problem(plugin.name()) {
                return Err(PluginError::InvalidName {
                    name: plugin.name().to_owned(),
                    version: plugin.version().to_owned(),
                    problem,
                });
            }
            if let Some(first) = by_name.get(plugin.name()) {
                return Err(PluginError::Duplicate {
                    name: plugin.name().to_owned(),
                    first: first.version().to_owned(),
                    second: plugin.version().to_owned(),
                });
            }
            by_name.insert(plugin.name(), plugin);
        }
        for plugin in by_name.values() {
            let mut missing: Vec<String> = Vec::new();
            for dependency in plugin.depends_on() {
                if !by_name.contains_key(dependency) && !missing.iter().any(|m| m == dependency) {
                    missing.push((*dependency).to_owned());
                }
            }
            if !missing.is_empty() {
                return Err(PluginError::MissingDependency {
                    plugin: plugin.name().to_owned(),
                    dependencies: missing,
                    found: by_name.keys().map(|name| (*name).to_owned()).collect(),
                    given,
                });
            }
        }
        // Kahn's algorithm; the ready set is ordered by name, so the order is deterministic.
        let mut waiting_on: BTreeMap<&'static str, BTreeSet<&'static str>> = by_name
            .values()
            .map(|p| (p.name(), p.depends_on().iter().copied().collect()))
            .collect();
        let mut ready: BTreeSet<&'static str> = waiting_on
            .iter()
            .filter(|(_, deps)| deps.is_empty())
            .map(|(name, _)| *name)
            .collect();
        let mut ordered = Vec::with_capacity(by_name.len());
        while let Some(name) = ready.pop_first() {
            waiting_on.remove(name);
            for (other, deps) in waiting_on.iter_mut() {
                if deps.remove(name) && deps.is_empty() {
                    ready.insert(other);
                }
            }
            if let Some(plugin) = by_name.remove(name) {
                ordered.push(plugin);
            }
        }
        if !waiting_on.is_empty() {
            return Err(PluginError::Cycle {
                plugins: find_cycle(&waiting_on),
            });
        }
        Ok(Self { ordered, given })
    }

    /// Fails, naming them, when any of the expected plugins is not linked.
    ///
    /// ```
    /// use cqrs_core::Plugins;
    ///
    /// let err = Plugins::from_plugins(vec![]).unwrap().expect(&["tickets"]).unwrap_err();
    /// assert!(err.to_string().contains("not in the list given to `Plugins::from_plugins`"));
    /// ```
    pub fn expect(self, names: &[&str]) -> Result<Self, PluginError> {
        let missing: Vec<String> = names
            .iter()
            .filter(|n| !self.ordered.iter().any(|p| p.name() == **n))
            .map(|n| (*n).to_owned())
            .collect();
        if missing.is_empty() {
            Ok(self)
        } else {
            Err(PluginError::NotLinked {
                missing,
                found: self.names().map(str::to_owned).collect(),
                given: self.given,
            })
        }
    }

    /// The plugins' names, in installation order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.ordered.iter().map(|p| p.name())
    }

    /// The plugins, in installation order.
    pub fn iter(&self) -> impl Iterator<Item = &dyn Plugin> + '_ {
        self.ordered.iter().map(|p| p.as_ref())
    }

    /// How many plugins there are.
    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }

    /// Calls every plugin's `register`, in order, and stops at the first that fails. A
    /// `register` that panics fails too ([`PluginError::Register`], naming the plugin and the
    /// panic's message; the panic hook has printed it already), unless the build aborts on
    /// panic (`panic = "abort"`). What the plugins before it, and the failing one up to its failure,
    /// contributed stays in `registrar`: a failed install is a start-up error, so discard the
    /// registrar (and do not build buses from it).
    pub fn install(&self, registrar: &mut PluginRegistrar) -> Result<(), PluginError> {
        for plugin in &self.ordered {
            registrar.current = plugin.name();
            // Caught so that the error names the plugin, and so that what the server adds
            // after a caught panic is not credited to it.
            let result = catch_unwind(AssertUnwindSafe(|| plugin.register(registrar)))
                .unwrap_or_else(|payload| {
                    Err(format!("it panicked: {}", crate::panic::into_message(payload)).into())
                });
            registrar.current = "";
            result.map_err(|source| match source.downcast::<MissingResource>() {
                Ok(missing) => PluginError::MissingResource {
                    plugin: plugin.name().to_owned(),
                    resource: missing.resource,
                },
                Err(source) => PluginError::Register {
                    plugin: plugin.name().to_owned(),
                    source,
                },
            })?;
        }
        Ok(())
    }
}

fn find_cycle(waiting_on: &BTreeMap<&'static str, BTreeSet<&'static str>>) -> Vec<String> {
    // Every plugin left waits on another one left, so walking first dependencies must revisit.
    let Some(mut at) = waiting_on.keys().next().copied() else {
        return Vec::new();
    };
    let mut path: Vec<&'static str> = Vec::new();
    while !path.contains(&at) {
        path.push(at);
        match waiting_on.get(at).and_then(|deps| deps.iter().next()) {
            Some(next) => at = next,
            None => break,
        }
    }
    let start = path.iter().position(|p| *p == at).unwrap_or(0);
    let mut cycle: Vec<String> = path[start..].iter().map(|s| (*s).to_owned()).collect();
    cycle.push(at.to_owned());
    cycle
}

/// What plugins register into: bus handlers, contributions of the server's own types, and
/// resources the server provides to plugins (a database pool, a configuration).
///
/// ```
/// use cqrs_core::PluginRegistrar;
///
/// /// A server's own contribution type: plugins hand it HTTP paths.
/// struct Route(&'static str);
///
/// let mut registrar = PluginRegistrar::new();
/// registrar.provide(String::from("postgres://..."));
/// registrar.contribute(Route("/tickets"));
/// let routes: Vec<Route> = registrar.take_contributions();
/// assert_eq!(routes[0].0, "/tickets");
/// ```
#[derive(Default)]
pub struct PluginRegistrar {
    commands: CommandHandlers,
    queries: QueryHandlers,
    events: EventHandlers,
    contributions: HashMap<TypeId, Contributions>,
    resources: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    /// Each with the plugin that declared it ("" for the server's own).
    required: Vec<(&'static str, MessageType)>,
    current: &'static str,
}

/// A plugin asked for a resource the server did not [`provide`](PluginRegistrar::provide).
#[derive(thiserror::Error)]
#[error(
    "the server did not provide a `{}` (resources are found by their exact type)",
    as_written(resource)
)]
pub struct MissingResource {
    /// The resource's type name.
    pub resource: &'static str,
}

impl fmt::Debug for MissingResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Debug for PluginRegistrar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginRegistrar")
            .field("commands", &self.commands)
            .field("queries", &self.queries)
            .field("events", &self.events)
            .field("contributions", &self.contributions.len())
            .field("resources", &self.resources.len())
            .finish()
    }
}

/// The contributions of one type, not taken yet.
struct Contributions {
    /// The type's name, for an error when nobody takes them.
    type_name: &'static str,
    /// The plugins that made them, each once, in order.
    plugins: Vec<&'static str>,
    /// A `Vec<(&'static str, T)>`: each value with the plugin that made it.
    items: Box<dyn Any + Send>,
}

impl PluginRegistrar {
    /// An empty registrar.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes a value available to plugins through [`resource`](Self::resource), under its
    /// exact type: a plugin that asks for `Arc<dyn EventStore>` finds only a value provided
    /// as that type, so name it where the value is of another (`Arc<InMemoryEventStore>`):
    ///
    /// ```
    /// use cqrs_core::PluginRegistrar;
    /// use cqrs_core::memory::InMemoryEventStore;
    /// use cqrs_core::ports::EventStore;
    /// use std::sync::Arc;
    ///
    /// let mut registrar = PluginRegistrar::new();
    /// registrar.provide::<Arc<dyn EventStore>>(Arc::new(InMemoryEventStore::new()));
    /// assert!(registrar.resource::<Arc<dyn EventStore>>().is_ok());
    /// ```
    pub fn provide<T: Clone + Send + Sync + 'static>(&mut self, resource: T) -> &mut Self {
        self.resources.insert(TypeId::of::<T>(), Box::new(resource));
        self
    }

    /// A resource the server provided, or an error that names the missing type. Use `?`: the
    /// installation then fails with [`PluginError::MissingResource`].
    ///
    /// ```
    /// use cqrs_core::PluginRegistrar;
    ///
    /// let mut registrar = PluginRegistrar::new();
    /// registrar.provide(42_u32);
    /// assert_eq!(registrar.resource::<u32>().unwrap(), 42);
    /// assert!(registrar.resource::<String>().unwrap_err().to_string().contains("String"));
    /// ```
    pub fn resource<T: Clone + Send + Sync + 'static>(&self) -> Result<T, MissingResource> {
        self.try_resource::<T>().ok_or(MissingResource {
            resource: type_name::<T>(),
        })
    }

    /// A resource the server may or may not provide.
    pub fn try_resource<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.resources
            .get(&TypeId::of::<T>())
            .and_then(|r| r.downcast_ref::<T>())
            .cloned()
    }

    /// The command handlers registered so far; add to them.
    pub fn commands(&mut self) -> &mut CommandHandlers {
        self.commands.plugin = self.current;
        &mut self.commands
    }

    /// The query handlers registered so far; add to them.
    pub fn queries(&mut self) -> &mut QueryHandlers {
        self.queries.plugin = self.current;
        &mut self.queries
    }

    /// The event handlers registered so far; add to them. Each is attributed to the plugin
    /// adding it ([`EventHandlers::by_plugin`]).
    pub fn events(&mut self) -> &mut EventHandlers {
        self.events.plugin = self.current;
        &mut self.events
    }

    /// Declares that this plugin sends a command or query that some plugin must handle;
    /// checked by [`check_required`](Self::check_required) against the built buses. An event
    /// may have any number of handlers, none included, so a required event is not checked.
    pub fn require(&mut self, message: MessageType) -> &mut Self {
        self.required.push((self.current, message));
        self
    }

    /// Every message some plugin declared it sends, with the plugin's name (empty for one the
    /// server declared itself, outside any plugin's `register`).
    pub fn required(&self) -> impl Iterator<Item = (&'static str, MessageType)> + '_ {
        self.required.iter().copied()
    }

    /// Adds a value of a type the server defines (HTTP routes, OpenAPI fragments, migrations).
    /// The server takes them by that exact type; one nobody takes is an error at
    /// [`check_contributions_taken`](Self::check_contributions_taken).
    pub fn contribute<T: Send + 'static>(&mut self, value: T) -> &mut Self {
        let current = self.current;
        let contributions = self
            .contributions
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Contributions {
                type_name: type_name::<T>(),
                plugins: Vec::new(),
                items: Box::new(Vec::<(&'static str, T)>::new()),
            });
        if !contributions.plugins.contains(&current) {
            contributions.plugins.push(current);
        }
        if let Some(items) = contributions.items.downcast_mut::<Vec<(&'static str, T)>>() {
            items.push((current, value));
        }
        self
    }

    /// Fails, naming each type and the plugins that contributed it, when a contribution was
    /// never taken: call it once the server took every type it asks plugins for, so that a
    /// plugin contributing a type the server does not take (a `Box<Route>` where it takes
    /// `Route`) is a start-up error, not a route that silently is not there.
    ///
    /// ```
    /// use cqrs_core::PluginRegistrar;
    ///
    /// struct Route(&'static str);
    ///
    /// let mut registrar = PluginRegistrar::new();
    /// registrar.contribute(Box::new(Route("/tickets")));
    /// let routes: Vec<Route> = registrar.take_contributions();
    /// assert!(routes.is_empty());
    /// let err = registrar.check_contributions_taken().unwrap_err();
    /// assert!(err.to_string().contains("Box<"), "{err}");
    /// ```
    pub fn check_contributions_taken(&self) -> Result<(), PluginError> {
        let mut untaken: Vec<UntakenContribution> = self
            .contributions
            .values()
            .map(|c| UntakenContribution {
                type_name: c.type_name.to_owned(),
                plugins: c.plugins.iter().map(|p| (*p).to_owned()).collect(),
            })
            .collect();
        if untaken.is_empty() {
            return Ok(());
        }
        untaken.sort_by(|a, b| a.type_name.cmp(&b.type_name));
        Err(PluginError::UntakenContributions { untaken })
    }

    /// Takes every contribution of type `T`, in plugin order.
    pub fn take_contributions<T: Send + 'static>(&mut self) -> Vec<T> {
        self.take_contributions_by_plugin::<T>()
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    /// Takes every contribution of type `T` with the name of the plugin that made it.
    pub fn take_contributions_by_plugin<T: Send + 'static>(&mut self) -> Vec<(&'static str, T)> {
        self.contributions
            .remove(&TypeId::of::<T>())
            .and_then(|c| c.items.downcast::<Vec<(&'static str, T)>>().ok())
            .map(|items| *items)
            .unwrap_or_default()
    }

    /// Takes the command handlers out, to build a [`CommandBus`](crate::CommandBus).
    pub fn take_commands(&mut self) -> CommandHandlers {
        let mut commands = std::mem::take(&mut self.commands);
        // What the server adds from here on is its own, not the last plugin's.
        commands.plugin = "";
        commands
    }

    /// Takes the query handlers out, to build a [`QueryBus`](crate::QueryBus).
    pub fn take_queries(&mut self) -> QueryHandlers {
        let mut queries = std::mem::take(&mut self.queries);
        queries.plugin = "";
        queries
    }

    /// Takes the event handlers out, to build an [`EventBus`](crate::EventBus).
    pub fn take_events(&mut self) -> EventHandlers {
        let mut events = std::mem::take(&mut self.events);
        // What the server adds from here on is its own, not the last plugin's.
        events.plugin = "";
        events
    }

    /// Checks that every required command and query has a handler on the built buses.
    pub fn check_required(
        &self,
        commands: &crate::CommandBus,
        queries: &crate::QueryBus,
    ) -> Result<(), crate::BuildError> {
        let mut problems: Vec<String> = Vec::new();
        for &(plugin, message) in &self.required {
            let checked = match message.kind() {
                crate::MessageKind::Command => commands.check([message]),
                crate::MessageKind::Query => queries.check([message]),
                crate::MessageKind::Event => Ok(()),
            };
            let Err(e) = checked else { continue };
            let by = if plugin.is_empty() {
                "the server".to_owned()
            } else {
                format!("plugin `{plugin}`")
            };
            for problem in e.problems {
                let problem = format!("{problem} (required by {by})");
                if !problems.contains(&problem) {
                    problems.push(problem);
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(crate::BuildError { problems })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only paths that start with `alloc` or `core` are renamed: the framework's own crate is
    /// `cqrs_core`, whose trait objects a missing resource often names.
    #[test]
    fn type_names_are_shown_as_written() {
        for (name, written) in [
            (
                "alloc::sync::Arc<dyn cqrs_core::ports::EventStore>",
                "std::sync::Arc<dyn cqrs_core::ports::EventStore>",
            ),
            ("core::time::Duration", "std::time::Duration"),
            (
                "(alloc::string::String, core::option::Option<u8>)",
                "(std::string::String, std::option::Option<u8>)",
            ),
            ("my_core::Foo", "my_core::Foo"),
            ("mycrate::core::Bar", "mycrate::core::Bar"),
            ("sqlx_core::pool::Pool<x>", "sqlx_core::pool::Pool<x>"),
            ("&[alloc::vec::Vec<u8>]", "&[std::vec::Vec<u8>]"),
        ] {
            assert_eq!(as_written(name), written, "{name}");
        }
    }

    /// A failed registration's causes below the one its message shows are listed too.
    #[test]
    fn a_failed_registrations_debug_lists_its_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("connecting")]
        struct Connecting(#[source] std::io::Error);
        let error = PluginError::Register {
            plugin: "db".into(),
            source: Box::new(Connecting(std::io::Error::other("refused"))),
        };
        assert_eq!(
            format!("{error:?}"),
            "plugin `db` failed to register: connecting\n  caused by: refused"
        );
    }
}
