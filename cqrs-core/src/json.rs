//! Serializing to JSON without losing what JSON cannot hold.
//!
//! `serde_json` writes a NaN or an infinite float as `null` and reports no error, so an event
//! holding one would be stored as `null` and fail to decode on every later read: the stream
//! it went to could no longer be loaded. [`to_value`] refuses such a float instead, before
//! anything is stored.

use serde::Serialize;
use serde::ser::{self, Serializer};
use std::fmt;

/// `value` as JSON, or an error naming the field that holds a NaN or an infinite float.
pub(crate) fn to_value<T: Serialize + ?Sized>(
    value: &T,
) -> Result<serde_json::Value, serde_json::Error> {
    Finite { value, field: None }.serialize(serde_json::value::Serializer)
}

/// A value serialized through [`Checked`]; `field` is the innermost struct field it sits in.
struct Finite<'a, T: ?Sized> {
    value: &'a T,
    field: Option<&'static str>,
}

impl<T: Serialize + ?Sized> Serialize for Finite<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(Checked {
            inner: serializer,
            field: self.field,
        })
    }
}

/// A serializer that hands everything to `inner` and refuses non-finite floats.
struct Checked<S> {
    inner: S,
    field: Option<&'static str>,
}

impl<S> Checked<S> {
    fn wrap<'a, T: ?Sized>(&self, value: &'a T) -> Finite<'a, T> {
        Finite {
            value,
            field: self.field,
        }
    }
}

fn not_finite<E: ser::Error>(value: impl fmt::Display, field: Option<&'static str>) -> E {
    let at = field.map_or_else(String::new, |f| format!(" in field `{f}`"));
    E::custom(format_args!(
        "a float{at} is {value}, which JSON cannot hold (serde_json would write null, and the \
         value could not be read back); keep such values out of events, or store them as text"
    ))
}

macro_rules! forward {
    ($($method:ident($ty:ty);)+) => {
        $(
            fn $method(self, v: $ty) -> Result<S::Ok, S::Error> {
                self.inner.$method(v)
            }
        )+
    };
}

impl<S: Serializer> Serializer for Checked<S> {
    type Ok = S::Ok;
    type Error = S::Error;
    type SerializeSeq = Checked<S::SerializeSeq>;
    type SerializeTuple = Checked<S::SerializeTuple>;
    type SerializeTupleStruct = Checked<S::SerializeTupleStruct>;
    type SerializeTupleVariant = Checked<S::SerializeTupleVariant>;
    type SerializeMap = Checked<S::SerializeMap>;
    type SerializeStruct = Checked<S::SerializeStruct>;
    type SerializeStructVariant = Checked<S::SerializeStructVariant>;

    forward! {
        serialize_bool(bool);
        serialize_i8(i8);
        serialize_i16(i16);
        serialize_i32(i32);
        serialize_i64(i64);
        serialize_i128(i128);
        serialize_u8(u8);
        serialize_u16(u16);
        serialize_u32(u32);
        serialize_u64(u64);
        serialize_u128(u128);
        serialize_char(char);
        serialize_str(&str);
        serialize_bytes(&[u8]);
        serialize_unit_struct(&'static str);
    }

    fn serialize_f32(self, v: f32) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            self.inner.serialize_f32(v)
        } else {
            Err(not_finite(v, self.field))
        }
    }

    fn serialize_f64(self, v: f64) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            self.inner.serialize_f64(v)
        } else {
            Err(not_finite(v, self.field))
        }
    }

    fn serialize_none(self) -> Result<S::Ok, S::Error> {
        self.inner.serialize_none()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<S::Ok, S::Error> {
        let value = self.wrap(value);
        self.inner.serialize_some(&value)
    }

    fn serialize_unit(self) -> Result<S::Ok, S::Error> {
        self.inner.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
    ) -> Result<S::Ok, S::Error> {
        self.inner.serialize_unit_variant(name, index, variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        let value = self.wrap(value);
        self.inner.serialize_newtype_struct(name, &value)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        let value = self.wrap(value);
        self.inner
            .serialize_newtype_variant(name, index, variant, &value)
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq, S::Error> {
        Ok(Checked {
            inner: self.inner.serialize_seq(len)?,
            field: self.field,
        })
    }

    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, S::Error> {
        Ok(Checked {
            inner: self.inner.serialize_tuple(len)?,
            field: self.field,
        })
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, S::Error> {
        Ok(Checked {
            inner: self.inner.serialize_tuple_struct(name, len)?,
            field: self.field,
        })
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, S::Error> {
        Ok(Checked {
            inner: self
                .inner
                .serialize_tuple_variant(name, index, variant, len)?,
            field: self.field,
        })
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, S::Error> {
        Ok(Checked {
            inner: self.inner.serialize_map(len)?,
            field: self.field,
        })
    }

    fn serialize_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, S::Error> {
        Ok(Checked {
            inner: self.inner.serialize_struct(name, len)?,
            field: self.field,
        })
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, S::Error> {
        Ok(Checked {
            inner: self
                .inner
                .serialize_struct_variant(name, index, variant, len)?,
            field: self.field,
        })
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

/// The compound serializers whose elements carry no name of their own.
macro_rules! elements {
    ($($trait:ident::$method:ident;)+) => {
        $(
            impl<S: ser::$trait> ser::$trait for Checked<S> {
                type Ok = S::Ok;
                type Error = S::Error;

                fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), S::Error> {
                    let value = self.wrap(value);
                    self.inner.$method(&value)
                }

                fn end(self) -> Result<S::Ok, S::Error> {
                    self.inner.end()
                }
            }
        )+
    };
}

elements! {
    SerializeSeq::serialize_element;
    SerializeTuple::serialize_element;
    SerializeTupleStruct::serialize_field;
    SerializeTupleVariant::serialize_field;
}

impl<S: ser::SerializeMap> ser::SerializeMap for Checked<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), S::Error> {
        let key = self.wrap(key);
        self.inner.serialize_key(&key)
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), S::Error> {
        let value = self.wrap(value);
        self.inner.serialize_value(&value)
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.inner.end()
    }
}

/// The compound serializers whose fields are named: a float found in one names it.
macro_rules! fields {
    ($($trait:ident;)+) => {
        $(
            impl<S: ser::$trait> ser::$trait for Checked<S> {
                type Ok = S::Ok;
                type Error = S::Error;

                fn serialize_field<T: Serialize + ?Sized>(
                    &mut self,
                    key: &'static str,
                    value: &T,
                ) -> Result<(), S::Error> {
                    let value = Finite {
                        value,
                        field: Some(key),
                    };
                    self.inner.serialize_field(key, &value)
                }

                fn skip_field(&mut self, key: &'static str) -> Result<(), S::Error> {
                    self.inner.skip_field(key)
                }

                fn end(self) -> Result<S::Ok, S::Error> {
                    self.inner.end()
                }
            }
        )+
    };
}

fields! {
    SerializeStruct;
    SerializeStructVariant;
}

#[cfg(test)]
mod tests {
    use super::to_value;
    use serde::Serialize;
    use serde_json::json;
    use std::collections::BTreeMap;

    #[derive(Serialize)]
    struct Reading {
        sensor: String,
        mean: f64,
        samples: Vec<f32>,
        note: Option<Box<Reading>>,
    }

    #[derive(Serialize)]
    enum Shape {
        Circle { radius: f64 },
        Pair(f64, f64),
        Wrapped(f64),
    }

    fn reading(mean: f64, samples: Vec<f32>) -> Reading {
        Reading {
            sensor: "s1".into(),
            mean,
            samples,
            note: None,
        }
    }

    #[test]
    fn finite_values_serialize_as_serde_json_does() {
        let mut nested = reading(1.5, vec![0.25, -2.0]);
        nested.note = Some(Box::new(reading(0.0, vec![])));
        let mut map = BTreeMap::new();
        map.insert(
            "k",
            vec![Shape::Circle { radius: 2.0 }, Shape::Pair(1.0, 2.0)],
        );
        for value in [
            serde_json::to_value(&nested).unwrap(),
            serde_json::to_value(&map).unwrap(),
            serde_json::to_value(Shape::Wrapped(f64::MAX)).unwrap(),
        ] {
            assert_eq!(to_value(&value).unwrap(), value);
        }
        assert_eq!(to_value(&nested).unwrap()["note"]["sensor"], json!("s1"));
        assert_eq!(to_value(&map).unwrap(), serde_json::to_value(&map).unwrap());
        assert_eq!(
            to_value(&Shape::Wrapped(f64::MIN_POSITIVE)).unwrap(),
            serde_json::to_value(Shape::Wrapped(f64::MIN_POSITIVE)).unwrap()
        );
    }

    #[test]
    fn a_nan_or_an_infinity_anywhere_is_refused_naming_its_field() {
        let refused = |error: serde_json::Error, field: &str, value: &str| {
            let text = error.to_string();
            assert!(text.contains(&format!("field `{field}`")), "{text}");
            assert!(text.contains(value), "{text}");
        };
        refused(
            to_value(&reading(f64::NAN, vec![])).unwrap_err(),
            "mean",
            "NaN",
        );
        refused(
            to_value(&reading(1.0, vec![1.0, f32::INFINITY])).unwrap_err(),
            "samples",
            "inf",
        );
        let mut nested = reading(1.0, vec![]);
        nested.note = Some(Box::new(reading(f64::NEG_INFINITY, vec![])));
        refused(to_value(&nested).unwrap_err(), "mean", "-inf");
        refused(
            to_value(&Shape::Circle { radius: f64::NAN }).unwrap_err(),
            "radius",
            "NaN",
        );
        for refused in [
            to_value(&Shape::Pair(1.0, f64::NAN)),
            to_value(&Shape::Wrapped(f64::INFINITY)),
            to_value(&vec![Some(f64::NAN)]),
            to_value(&BTreeMap::from([("k", (1u8, f32::NAN))])),
            to_value(&f64::NAN),
        ] {
            let text = refused.unwrap_err().to_string();
            assert!(text.contains("JSON cannot hold"), "{text}");
        }
        // What serde_json does alone: the loss this module prevents.
        assert_eq!(serde_json::to_value(f64::NAN).unwrap(), json!(null));
    }
}
