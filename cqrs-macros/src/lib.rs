//! Derive macros for [`cqrs-core`]'s message traits: `#[derive(Command)]`, `#[derive(Query)]`
//! and `#[derive(Event)]`.
//!
//! Use them through `cqrs-core`, which re-exports each beside the trait of the same name (its
//! `derive` feature, on by default); this crate is not meant as a dependency of its own.
//!
//! All three read one attribute, `#[cqrs(..)]`: `name` (the wire name, required), `output`
//! (commands and queries), `version` (events) and `crate`. It is not `#[command(..)]` because
//! clap's derives take that one, and a type may well derive both.
//!
//! Each derive implements `Message` too, so a type takes one of them. Hand-written impls can
//! make one type two kinds of message, or give it a wire name these derives refuse, such as
//! the name of events already stored under one.
//!
//! A generic type gets one wire name for all its instantiations, so a bus takes only one of
//! them. Its impls carry the bounds the traits ask for as `where` clauses (`Send + 'static`;
//! an event's also `Sync` and serde's traits), so its parameters need none of their own. A
//! lifetime parameter is refused: a message owns its data.
//!
//! [`cqrs-core`]: https://docs.rs/cqrs-core

#![deny(missing_docs)]

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::quote;
use syn::{DeriveInput, Ident, LitInt, LitStr, Path, Type, parse_macro_input};

/// Implements `Message` and `Command` for a type.
///
/// `name` is the command's stable wire name (`Message::NAME`): it names the command in logs,
/// metrics and errors, so keep it when the Rust type is renamed or moved. `output` is what its
/// handler returns (`Command::Output`); leave it out for `()`.
///
/// ```
/// use cqrs_core::{Command, Message};
///
/// #[derive(Command)]
/// #[cqrs(name = "tickets.open_ticket", output = u64)]
/// struct OpenTicket {
///     title: String,
/// }
///
/// #[derive(Command)]
/// #[cqrs(name = "tickets.close_ticket")] // the output is ()
/// struct CloseTicket {
///     id: u64,
/// }
///
/// assert_eq!(<OpenTicket as Message>::NAME, "tickets.open_ticket");
/// let _: <CloseTicket as Command>::Output = ();
/// ```
///
/// A wire name is 1 to 64 ASCII letters, digits, `.`, `_` and `-`, so it reads the same
/// in a metrics label, a log field, a URL or a key of another tool; anything else does not
/// compile:
///
/// ```compile_fail
/// #[derive(cqrs_core::Command)]
/// #[cqrs(name = "open ticket")]
/// struct OpenTicket;
/// ```
///
/// The attribute takes `crate = "path"` too, for a `cqrs-core` renamed in `Cargo.toml` or
/// re-exported by another crate: the generated impls then name the traits through that path.
/// The path must name the whole crate (`pub use cqrs_core as cqrs;`), not a module that
/// re-exports some of its items: the impls of a generic event also reach serde through it.
#[proc_macro_derive(Command, attributes(cqrs))]
pub fn derive_command(input: TokenStream) -> TokenStream {
    derive(Kind::Command, input)
}

/// Implements `Message` and `Query` for a type.
///
/// `name` is the query's stable wire name (`Message::NAME`); `output` is what its handler
/// returns (`Query::Output`), and a query must name it.
///
/// ```
/// use cqrs_core::{Message, Query};
///
/// #[derive(Query)]
/// #[cqrs(name = "tickets.get_ticket", output = Option<String>)]
/// struct GetTicket {
///     id: u64,
/// }
///
/// assert_eq!(<GetTicket as Message>::NAME, "tickets.get_ticket");
/// let _: <GetTicket as Query>::Output = Some("a title".to_owned());
/// ```
///
/// ```compile_fail
/// #[derive(cqrs_core::Query)]
/// #[cqrs(name = "tickets.get_ticket")] // no output
/// struct GetTicket;
/// ```
///
/// `crate = "path"` works as for [`Command`](derive@Command).
#[proc_macro_derive(Query, attributes(cqrs))]
pub fn derive_query(input: TokenStream) -> TokenStream {
    derive(Kind::Query, input)
}

/// Implements `Message` and `Event` for a type.
///
/// `name` is the event's stable wire name (`Message::NAME`): it is stored with every event, so
/// it must never change. `version` is the payload's schema version (`Event::VERSION`), 1 when
/// left out; raise it when the shape changes and register an upcaster for the older versions.
/// An event is serialized, so derive serde's traits as well. The name also joins the build's
/// list of event types (`EventTypes::in_this_build`), which
/// `UnknownEventPolicy::AwaitNewerBuild` tells a newer build's events by.
///
/// ```
/// use cqrs_core::{Event, Message};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, Serialize, Deserialize, Event)]
/// #[cqrs(name = "tickets.ticket_opened", version = 2)]
/// struct TicketOpened {
///     id: u64,
///     title: String,
/// }
///
/// assert_eq!(<TicketOpened as Message>::NAME, "tickets.ticket_opened");
/// assert_eq!(<TicketOpened as Event>::VERSION, 2);
/// ```
///
/// Versions start at 1:
///
/// ```compile_fail
/// # use serde::{Deserialize, Serialize};
/// #[derive(Serialize, Deserialize, cqrs_core::Event)]
/// #[cqrs(name = "tickets.ticket_opened", version = 0)]
/// struct TicketOpened;
/// ```
///
/// `crate = "path"` works as for [`Command`](derive@Command).
#[proc_macro_derive(Event, attributes(cqrs))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    derive(Kind::Event, input)
}

/// The impls of `kind` for the type `input` declares, or the errors that say why not.
fn derive(kind: Kind, input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand(kind, &input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Command,
    Query,
    Event,
}

impl Kind {
    /// The derive's name, as written in `#[derive(..)]`.
    fn derive(self) -> &'static str {
        match self {
            Kind::Command => "Command",
            Kind::Query => "Query",
            Kind::Event => "Event",
        }
    }

    /// The keys its attribute takes, as an error message lists them.
    fn keys(self) -> &'static str {
        match self {
            Kind::Command | Kind::Query => "`name`, `output` and `crate`",
            Kind::Event => "`name`, `version` and `crate`",
        }
    }
}

/// What the helper attributes said.
#[derive(Default)]
struct Args {
    name: Option<LitStr>,
    output: Option<Type>,
    version: Option<LitInt>,
    krate: Option<Path>,
}

/// The longest wire name the derives take (as the labels of `cqrs-core`'s
/// `cqrs_events_unknown_total` do).
const MAX_NAME_LEN: usize = 64;

fn expand(kind: Kind, input: &DeriveInput) -> syn::Result<TokenStream2> {
    if let Some(lifetime) = input.generics.lifetimes().next() {
        return Err(syn::Error::new_spanned(
            lifetime,
            "a message owns its data (the message traits ask for `'static`): hold a `String`, \
             a `Vec` or an `Arc` instead of a reference, and drop this lifetime parameter",
        ));
    }
    if let Some(misplaced) = misplaced_attribute(input) {
        return Err(syn::Error::new_spanned(
            misplaced,
            "`#[cqrs(..)]` goes on the type, not on a field, a variant or a generic parameter \
             (the wire name and version are the whole message's)",
        ));
    }
    let args = parse_args(kind, input)?;
    let Some(name) = args.name else {
        // `#[command(..)]` is the likely slip: it reads well, and clap takes it.
        let slip = input
            .attrs
            .iter()
            .find(|attr| ["command", "query", "event"].iter().any(|n| attr.path().is_ident(n)))
            .map(|attr| {
                format!(
                    " (`#[{}(..)]` is another derive's, clap's for one; this one reads `#[cqrs(..)]`)",
                    attr.path().get_ident().map(ToString::to_string).unwrap_or_default()
                )
            })
            .unwrap_or_default();
        return Err(syn::Error::new_spanned(
            attribute_or_name(input),
            format!(
                "`#[derive({derive})]` needs the message's wire name: add \
                 `#[cqrs(name = \"...\")]`, a name such as \"tickets.open_ticket\" that stays \
                 when the Rust type is renamed (see `Message::NAME`){slip}",
                derive = kind.derive(),
            ),
        ));
    };
    check_name(&name)?;

    let krate = args.krate.unwrap_or_else(|| syn::parse_quote!(::cqrs_core));
    let output = match kind {
        Kind::Command => Some(args.output.unwrap_or_else(|| syn::parse_quote!(()))),
        Kind::Query => Some(args.output.ok_or_else(|| {
            syn::Error::new_spanned(
                attribute_or_name(input),
                "`#[derive(Query)]` needs the type the query's handler returns: add \
                 `output = Type` to `#[cqrs(..)]`",
            )
        })?),
        Kind::Event => None,
    };
    let version = match &args.version {
        Some(version) => {
            let value: u32 = version.base10_parse().map_err(|_| {
                syn::Error::new_spanned(
                    version,
                    "an event's version is a whole number from 1 to 4294967295",
                )
            })?;
            if value == 0 {
                return Err(syn::Error::new_spanned(
                    version,
                    "event versions start at 1 (leave `version` out for 1)",
                ));
            }
            quote! { const VERSION: ::core::primitive::u32 = #value; }
        }
        None => TokenStream2::new(),
    };

    // A generic type gets the bounds the traits ask for as `where` clauses on its impls, so
    // its parameters need none of their own (serde's derives would copy them, and clash).
    let mut generics = input.generics.clone();
    if generics.type_params().next().is_some() {
        let predicates = &mut generics.make_where_clause().predicates;
        predicates.push(syn::parse_quote!(Self: ::core::marker::Send + 'static));
        match &output {
            Some(output) => {
                predicates.push(syn::parse_quote!(#output: ::core::marker::Send + 'static));
            }
            None => predicates.push(syn::parse_quote!(
                Self: ::core::marker::Sync
                    + #krate::__private::serde::Serialize
                    + #krate::__private::serde::de::DeserializeOwned
            )),
        }
    }
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    let kind_impl = match &output {
        Some(output) => {
            let kind_trait = Ident::new(kind.derive(), Span::call_site());
            quote! {
                #[automatically_derived]
                impl #impl_generics #krate::#kind_trait for #ident #ty_generics #where_clause {
                    type Output = #output;
                }
            }
        }
        // And the name, for the build's list of event types (what
        // `UnknownEventPolicy::AwaitNewerBuild` tells a newer build's events by): the literal,
        // so a generic type is listed once.
        None => quote! {
            #[automatically_derived]
            impl #impl_generics #krate::Event for #ident #ty_generics #where_clause {
                #version
            }
            #krate::__private::inventory::submit! {
                #krate::__private::EventTypeOfTheBuild(#name)
            }
        },
    };
    Ok(quote! {
        #[automatically_derived]
        impl #impl_generics #krate::Message for #ident #ty_generics #where_clause {
            const NAME: &'static ::core::primitive::str = #name;
        }
        #kind_impl
    })
}

/// A `#[cqrs(..)]` on a field, an enum variant or a generic parameter, which the derives
/// would otherwise pass over without a word (the helper attribute is allowed anywhere in the
/// item).
fn misplaced_attribute(input: &DeriveInput) -> Option<&syn::Attribute> {
    fn on_fields(fields: &syn::Fields) -> impl Iterator<Item = &syn::Attribute> {
        fields.iter().flat_map(|field| &field.attrs)
    }
    let attrs: Vec<&syn::Attribute> = match &input.data {
        syn::Data::Struct(data) => on_fields(&data.fields).collect(),
        syn::Data::Enum(data) => data
            .variants
            .iter()
            .flat_map(|variant| variant.attrs.iter().chain(on_fields(&variant.fields)))
            .collect(),
        syn::Data::Union(data) => data.fields.named.iter().flat_map(|f| &f.attrs).collect(),
    };
    let on_generics = input.generics.params.iter().flat_map(|param| match param {
        syn::GenericParam::Type(param) => &param.attrs,
        syn::GenericParam::Lifetime(param) => &param.attrs,
        syn::GenericParam::Const(param) => &param.attrs,
    });
    attrs
        .into_iter()
        .chain(on_generics)
        .find(|attr| attr.path().is_ident("cqrs"))
}

/// Where an error about a missing key points: the first `#[cqrs(..)]` attribute, which
/// needs it, or the type's name when it has none.
fn attribute_or_name(input: &DeriveInput) -> TokenStream2 {
    match input.attrs.iter().find(|attr| attr.path().is_ident("cqrs")) {
        Some(attr) => quote::ToTokens::to_token_stream(attr),
        None => quote::ToTokens::to_token_stream(&input.ident),
    }
}

/// Reads every `#[cqrs(..)]` attribute on the type; a key may appear once over all of them.
/// Other attributes are left alone, `#[command(..)]` included (clap's derives take that one).
fn parse_args(kind: Kind, input: &DeriveInput) -> syn::Result<Args> {
    let mut args = Args::default();
    for attr in input
        .attrs
        .iter()
        .filter(|attr| attr.path().is_ident("cqrs"))
    {
        attr.parse_nested_meta(|meta| {
            let key = meta.path.get_ident().map(ToString::to_string);
            let once = |taken: bool| {
                if taken {
                    Err(meta.error(format!(
                        "`{}` is given twice",
                        key.as_deref().unwrap_or_default()
                    )))
                } else {
                    Ok(())
                }
            };
            match key.as_deref() {
                Some("name") => {
                    once(args.name.is_some())?;
                    args.name = Some(meta.value()?.parse()?);
                }
                Some("output") if kind != Kind::Event => {
                    once(args.output.is_some())?;
                    args.output = Some(unquoted(meta.value()?, "output", "a type")?);
                }
                Some("version") if kind == Kind::Event => {
                    once(args.version.is_some())?;
                    args.version = Some(unquoted(meta.value()?, "version", "a number")?);
                }
                Some("crate") => {
                    once(args.krate.is_some())?;
                    let path: LitStr = meta.value()?.parse()?;
                    args.krate = Some(path.parse().map_err(|_| {
                        syn::Error::new_spanned(
                            &path,
                            "`crate` takes the path of cqrs-core as a string, such as \
                             \"::cqrs_core\" or \"my_framework::cqrs\"",
                        )
                    })?);
                }
                _ => {
                    let hint = match (kind, key.as_deref()) {
                        (Kind::Event, Some("output")) => {
                            "; an event has no output (`output` is for commands and queries; \
                             a type takes one of the `Command`, `Query` and `Event` derives)"
                        }
                        (Kind::Command | Kind::Query, Some("version")) => {
                            "; only events have a schema version (a type takes one of the \
                             `Command`, `Query` and `Event` derives)"
                        }
                        _ => "",
                    };
                    return Err(meta.error(format!(
                        "`#[derive({})]` takes {} in `#[cqrs(..)]`{hint}",
                        kind.derive(),
                        kind.keys(),
                    )));
                }
            }
            Ok(())
        })?;
    }
    Ok(args)
}

/// Parses a key's value, and says to drop the quotes from a string where the key takes a type
/// or a number (`version = "2"`, as clap writes it).
fn unquoted<T: syn::parse::Parse>(
    value: syn::parse::ParseStream<'_>,
    key: &str,
    what: &str,
) -> syn::Result<T> {
    if value.peek(LitStr) {
        let quoted: LitStr = value.parse()?;
        return Err(syn::Error::new_spanned(
            &quoted,
            format!(
                "`{key}` takes {what}, not a string: write `{key} = {}`",
                quoted.value()
            ),
        ));
    }
    value.parse()
}

/// Refuses, at compile time, a wire name that would need quoting or escaping somewhere it
/// goes (the rule cqrs-core's label for unknown stored event types follows).
fn check_name(name: &LitStr) -> syn::Result<()> {
    let value = name.value();
    let problem = if value.is_empty() {
        Some("a wire name cannot be empty".to_owned())
    } else if value.len() > MAX_NAME_LEN {
        Some(format!(
            "a wire name is at most {MAX_NAME_LEN} bytes; this one has {}",
            value.len()
        ))
    } else {
        value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            .map(|c| {
                format!(
                    "a wire name takes ASCII letters, digits, `.`, `_` and `-` only, not {c:?} \
                     (a dotted form such as \"tickets.open_ticket\" reads best)"
                )
            })
    };
    match problem {
        Some(problem) => Err(syn::Error::new_spanned(name, problem)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::{Kind, expand};
    use syn::{DeriveInput, parse_quote};

    fn error(kind: Kind, input: DeriveInput) -> String {
        match expand(kind, &input) {
            Ok(tokens) => panic!("expected an error, got {tokens}"),
            Err(error) => error.to_string(),
        }
    }

    fn expanded(kind: Kind, input: DeriveInput) -> String {
        expand(kind, &input)
            .unwrap_or_else(|error| panic!("{error}"))
            .to_string()
    }

    #[test]
    fn a_command_gets_its_name_and_output_and_unit_when_none_is_given() {
        let code = expanded(
            Kind::Command,
            parse_quote! {
                #[cqrs(name = "tickets.open", output = Vec<u8>)]
                struct Open;
            },
        );
        assert!(
            code.contains("impl :: cqrs_core :: Message for Open"),
            "{code}"
        );
        assert!(
            code.contains("const NAME : & 'static :: core :: primitive :: str = \"tickets.open\"")
        );
        assert!(code.contains("impl :: cqrs_core :: Command for Open"));
        assert!(code.contains("type Output = Vec < u8 >"), "{code}");

        let code = expanded(
            Kind::Command,
            parse_quote! {
                #[cqrs(name = "tickets.close")]
                struct Close;
            },
        );
        assert!(code.contains("type Output = ()"), "{code}");
    }

    /// `#[cqrs(..)]` on a field or a variant is refused, not passed over.
    #[test]
    fn an_attribute_on_a_field_or_variant_is_refused() {
        let expected =
            "`#[cqrs(..)]` goes on the type, not on a field, a variant or a generic parameter";
        let on_variant = error(
            Kind::Command,
            parse_quote! {
                #[cqrs(name = "tickets.act")]
                enum Act { #[cqrs(name = "tickets.open")] Open, Close }
            },
        );
        assert!(on_variant.starts_with(expected), "{on_variant}");
        let on_field = error(
            Kind::Event,
            parse_quote! {
                #[cqrs(name = "tickets.opened")]
                struct Opened { #[cqrs(version = 2)] id: u64 }
            },
        );
        assert!(on_field.starts_with(expected), "{on_field}");
        let on_variant_field = error(
            Kind::Query,
            parse_quote! {
                #[cqrs(name = "tickets.get", output = ())]
                enum Get { ById(#[cqrs(name = "x")] u64) }
            },
        );
        assert!(on_variant_field.starts_with(expected), "{on_variant_field}");
        let on_generic = error(
            Kind::Event,
            parse_quote! {
                #[cqrs(name = "tickets.opened")]
                struct Opened<#[cqrs(version = 2)] T> { id: T }
            },
        );
        assert!(on_generic.starts_with(expected), "{on_generic}");
        // Other attributes on fields (serde's) are left alone.
        expanded(
            Kind::Event,
            parse_quote! {
                #[cqrs(name = "tickets.opened")]
                struct Opened { #[serde(default)] id: u64 }
            },
        );
    }

    #[test]
    fn keys_may_be_spread_over_several_attributes_and_generics_are_kept() {
        let code = expanded(
            Kind::Query,
            parse_quote! {
                #[cqrs(name = "items.get")]
                #[cqrs(output = Option<T>)]
                struct Get<T: Send + 'static> where T: Clone { id: T }
            },
        );
        assert!(
            code.contains(
                "impl < T : Send + 'static > :: cqrs_core :: Query for Get < T > where T : Clone"
            ),
            "{code}"
        );
        assert!(code.contains("type Output = Option < T >"), "{code}");
    }

    #[test]
    fn a_generic_type_gets_the_traits_bounds_as_where_clauses() {
        let code = expanded(
            Kind::Command,
            parse_quote! {
                #[cqrs(name = "items.put", output = Vec<T>)]
                struct Put<T> { value: T }
            },
        );
        assert!(
            code.contains(
                "impl < T > :: cqrs_core :: Command for Put < T > where Self : :: core :: \
                 marker :: Send + 'static , Vec < T > : :: core :: marker :: Send + 'static"
            ),
            "{code}"
        );
        let code = expanded(
            Kind::Event,
            parse_quote! {
                #[cqrs(name = "items.put", crate = "fw::cqrs")]
                struct Put<T> { value: T }
            },
        );
        assert!(
            code.contains(
                "Self : :: core :: marker :: Sync + fw :: cqrs :: __private :: serde :: Serialize \
                 + fw :: cqrs :: __private :: serde :: de :: DeserializeOwned"
            ),
            "{code}"
        );
        // Without type parameters, no bounds: rustc's own errors (a missing serde derive,
        // say) stay as they are.
        let code = expanded(
            Kind::Event,
            parse_quote! {
                #[cqrs(name = "items.put")]
                struct Put { value: u8 }
            },
        );
        assert!(!code.contains("where"), "{code}");
    }

    #[test]
    fn a_lifetime_parameter_is_refused_with_what_to_do() {
        let message = error(
            Kind::Command,
            parse_quote! {
                #[cqrs(name = "items.put")]
                struct Put<'a> { value: &'a str }
            },
        );
        assert!(message.contains("a message owns its data"), "{message}");
        assert!(message.contains("hold a `String`"), "{message}");
    }

    #[test]
    fn an_event_gets_its_version_or_the_traits_default() {
        let code = expanded(
            Kind::Event,
            parse_quote! {
                #[cqrs(name = "tickets.opened", version = 3)]
                struct Opened;
            },
        );
        assert!(
            code.contains("impl :: cqrs_core :: Event for Opened"),
            "{code}"
        );
        assert!(
            code.contains("const VERSION : :: core :: primitive :: u32 = 3u32"),
            "{code}"
        );

        let code = expanded(
            Kind::Event,
            parse_quote! {
                #[cqrs(name = "tickets.opened")]
                struct Opened;
            },
        );
        assert!(!code.contains("VERSION"), "{code}");
    }

    #[test]
    fn the_crate_key_names_the_traits_through_the_given_path() {
        let code = expanded(
            Kind::Event,
            parse_quote! {
                #[cqrs(name = "x.y", crate = "my_framework::cqrs")]
                struct Y;
            },
        );
        assert!(
            code.contains("impl my_framework :: cqrs :: Message for Y"),
            "{code}"
        );
        assert!(code.contains("impl my_framework :: cqrs :: Event for Y"));
        assert!(!code.contains("cqrs_core"), "{code}");

        let message = error(
            Kind::Event,
            parse_quote! {
                #[cqrs(name = "x.y", crate = "not a path")]
                struct Y;
            },
        );
        assert!(
            message.contains("`crate` takes the path of cqrs-core"),
            "{message}"
        );
    }

    #[test]
    fn a_missing_name_says_how_to_give_one() {
        let message = error(Kind::Command, parse_quote! { struct Open; });
        assert!(
            message.contains("`#[derive(Command)]` needs the message's wire name"),
            "{message}"
        );
        assert!(message.contains("#[cqrs(name = \"...\")]"), "{message}");

        // Another derive's attribute does not count (clap's `Parser` takes `command`).
        let message = error(
            Kind::Command,
            parse_quote! {
                #[command(name = "tickets.open", version = "1")]
                struct Open;
            },
        );
        assert!(
            message.contains("needs the message's wire name"),
            "{message}"
        );
        assert!(
            message.contains(
                "`#[command(..)]` is another derive's, clap's for one; this one reads `#[cqrs(..)]`"
            ),
            "{message}"
        );
        let message = error(Kind::Command, parse_quote! { struct Open; });
        assert!(!message.contains("another derive's"), "{message}");
    }

    #[test]
    fn a_name_no_metrics_label_would_keep_is_refused() {
        for (name, says) in [
            ("", "cannot be empty"),
            ("open ticket", "not ' '"),
            ("tickets:open", "not ':'"),
            ("tickets.öffnen", "not 'ö'"),
        ] {
            let message = error(
                Kind::Command,
                parse_quote! {
                    #[cqrs(name = #name)]
                    struct Open;
                },
            );
            assert!(message.contains(says), "{name:?}: {message}");
        }
        let long = "n".repeat(super::MAX_NAME_LEN + 1);
        let message = error(
            Kind::Event,
            parse_quote! {
                #[cqrs(name = #long)]
                struct Open;
            },
        );
        assert!(
            message.contains("at most 64 bytes; this one has 65"),
            "{message}"
        );
        let longest = "n".repeat(super::MAX_NAME_LEN);
        expanded(
            Kind::Event,
            parse_quote! {
                #[cqrs(name = #longest)]
                struct Open;
            },
        );
    }

    #[test]
    fn a_query_without_output_is_refused() {
        let message = error(
            Kind::Query,
            parse_quote! {
                #[cqrs(name = "tickets.get")]
                struct Get;
            },
        );
        assert!(message.contains("add `output = Type`"), "{message}");
    }

    #[test]
    fn a_version_of_zero_or_past_u32_is_refused() {
        for (version, says) in [
            (quote::quote!(0), "versions start at 1"),
            (quote::quote!(4294967296), "from 1 to 4294967295"),
            (quote::quote!(-1), "from 1 to 4294967295"),
            (
                quote::quote!("2"),
                "`version` takes a number, not a string: write `version = 2`",
            ),
        ] {
            let message = error(
                Kind::Event,
                parse_quote! {
                    #[cqrs(name = "tickets.opened", version = #version)]
                    struct Opened;
                },
            );
            assert!(message.contains(says), "{version}: {message}");
        }
    }

    #[test]
    fn unknown_misplaced_and_repeated_keys_are_refused() {
        let message = error(
            Kind::Command,
            parse_quote! {
                #[cqrs(name = "a.b", nmae = "c")]
                struct A;
            },
        );
        assert!(
            message.contains(
                "`#[derive(Command)]` takes `name`, `output` and `crate` in `#[cqrs(..)]`"
            ),
            "{message}"
        );
        let message = error(
            Kind::Event,
            parse_quote! {
                #[cqrs(name = "a.b", output = u8)]
                struct A;
            },
        );
        assert!(message.contains("an event has no output"), "{message}");
        let message = error(
            Kind::Query,
            parse_quote! {
                #[cqrs(name = "a.b", output = u8, version = 2)]
                struct A;
            },
        );
        assert!(
            message.contains("only events have a schema version"),
            "{message}"
        );
        // Two derives on one type meet here: each hint says a type takes one.
        assert!(
            message.contains("a type takes one of the `Command`, `Query` and `Event` derives"),
            "{message}"
        );
        let message = error(
            Kind::Query,
            parse_quote! {
                #[cqrs(name = "a.b", output = u8)]
                #[cqrs(name = "a.c")]
                struct A;
            },
        );
        assert!(message.contains("`name` is given twice"), "{message}");
        let message = error(
            Kind::Query,
            parse_quote! {
                #[cqrs(name = "a.b", output = "u64")]
                struct A;
            },
        );
        assert!(
            message.contains("`output` takes a type, not a string: write `output = u64`"),
            "{message}"
        );
        let message = error(
            Kind::Command,
            parse_quote! {
                #[cqrs(name = a.b)]
                struct A;
            },
        );
        assert!(message.contains("expected string literal"), "{message}");
    }
}
