//! A type map for values that middleware hands to handlers (a database transaction, a tenant).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;

/// A map from type to one value of that type, like `http::Extensions`.
///
/// Empty extensions allocate nothing, so the hot path pays only when a layer uses them.
///
/// ```
/// use cqrs_core::Extensions;
///
/// struct Tenant(&'static str);
///
/// let mut ext = Extensions::new();
/// ext.insert(Tenant("acme"));
/// assert_eq!(ext.get::<Tenant>().map(|t| t.0), Some("acme"));
/// ```
#[derive(Default)]
pub struct Extensions {
    // Boxed so empty extensions are one pointer wide: they are moved through every layer.
    #[allow(clippy::box_collection)]
    map: Option<Box<HashMap<TypeId, Box<dyn Any + Send + Sync>>>>,
}

impl Extensions {
    /// Empty extensions.
    pub const fn new() -> Self {
        Self { map: None }
    }

    /// Inserts a value, returning the previous value of that type.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) -> Option<T> {
        self.map
            .get_or_insert_with(Default::default)
            .insert(TypeId::of::<T>(), Box::new(value))
            .and_then(|old| old.downcast::<T>().ok().map(|b| *b))
    }

    /// The value of type `T`.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.map
            .as_ref()?
            .get(&TypeId::of::<T>())?
            .downcast_ref::<T>()
    }

    /// The value of type `T`, mutably.
    pub fn get_mut<T: Any + Send + Sync>(&mut self) -> Option<&mut T> {
        self.map
            .as_mut()?
            .get_mut(&TypeId::of::<T>())?
            .downcast_mut::<T>()
    }

    /// Removes and returns the value of type `T`.
    pub fn remove<T: Any + Send + Sync>(&mut self) -> Option<T> {
        self.map
            .as_mut()?
            .remove(&TypeId::of::<T>())
            .and_then(|old| old.downcast::<T>().ok().map(|b| *b))
    }

    /// Whether no value is stored.
    pub fn is_empty(&self) -> bool {
        self.map.as_ref().is_none_or(|m| m.is_empty())
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extensions")
            .field("len", &self.map.as_ref().map_or(0, |m| m.len()))
            .finish()
    }
}
