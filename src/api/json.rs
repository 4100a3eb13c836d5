//! [`Json`], the extractor of every API request body: `Content-Type: application/json`
//! (else 415), at most `HTTP_BODY_LIMIT` bytes (else 413), and a JSON document whose every
//! struct is a JSON object (else 400).
//!
//! Why not `web::Json`:
//! - Actix accepts any `*/json` subtype and any `+json` suffix (`text/json`,
//!   `application/problem+json`); the contract accepts `application/json` only.
//! - serde's derived `Deserialize` for a struct also accepts a JSON array, mapping its
//!   elements onto the fields in order: `["x", 5]` would create an account and `[1, 2, 3]`
//!   move money. The contract calls that a wrong JSON type.
//!
//! The second is fixed in the deserializer, not in each request type: the body is parsed
//! through `ObjectsOnly`, a transparent wrapper around serde_json's deserializer that
//! refuses a sequence wherever a struct was asked for, at every depth (nested structs,
//! `Vec` items, `Option`s, enum variants). A request type added tomorrow is covered by
//! using this extractor, with nothing to remember in the type itself. (Checking the shape on
//! a `serde_json::Value` first would need each type's shape spelt out a second time, and
//! `Value` silently keeps the last of two duplicate keys.) Serde features that buffer their
//! input before the struct sees it bypass the wrapper: `#[serde(flatten)]`, internally
//! tagged and untagged enums; no request type uses them.
//!
//! The wrapper also records which array element was being read when parsing failed: an
//! error inside an element of an array (a batch item) is answered with that element's
//! `index`, like any other failing batch item.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::error::PayloadError;
use actix_web::{mime, web, FromRequest, HttpMessage, HttpRequest};
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess,
    Unexpected, VariantAccess, Visitor,
};

use crate::error::ApiError;

/// The largest body [`Json`] reads (`HTTP_BODY_LIMIT`), as app data. [`configure`]
/// registers it with the matching `web::PayloadConfig`, which does the reading.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// Registers the body limit for [`Json`].
pub fn configure(cfg: &mut web::ServiceConfig, limit: usize) {
    cfg.app_data(web::PayloadConfig::new(limit))
        .app_data(BodyLimit(limit));
}

/// A request body, parsed as described in the module documentation.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T> Json<T> {
    /// The parsed body.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Json<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: DeserializeOwned + 'static> FromRequest for Json<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        // Checked before the body is read: a wrong media type costs no buffering.
        if let Err(error) = check_content_type(req) {
            return Box::pin(std::future::ready(Err(error)));
        }
        let limit = req.app_data::<BodyLimit>().map_or(0, |l| l.0);
        let bytes = web::Bytes::from_request(req, payload);
        Box::pin(async move {
            let bytes = bytes.await.map_err(|e| payload_error(&e, limit))?;
            parse(&bytes).map(Json)
        })
    }
}

/// `application/json`, with parameters allowed, but a `charset` only if it is UTF-8 (the
/// body is read as UTF-8 whatever the header says).
fn check_content_type(req: &HttpRequest) -> Result<(), ApiError> {
    let refuse = || {
        ApiError::UnsupportedMediaType(
            "the body must be sent with Content-Type: application/json".to_owned(),
        )
    };
    let Ok(Some(mime)) = req.mime_type() else {
        return Err(refuse());
    };
    let utf8 = mime
        .get_param(mime::CHARSET)
        .is_none_or(|charset| charset == mime::UTF_8);
    if mime.type_() == mime::APPLICATION
        && mime.subtype() == mime::JSON
        && mime.suffix().is_none()
        && utf8
    {
        Ok(())
    } else {
        Err(refuse())
    }
}

fn payload_error(error: &actix_web::Error, limit: usize) -> ApiError {
    match error.as_error::<PayloadError>() {
        Some(PayloadError::Overflow) => ApiError::PayloadTooLarge(limit),
        _ => ApiError::BadRequest(format!("unreadable body: {error}")),
    }
}

/// Parses `bytes` as one JSON document into `T`, structs from objects only.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let track = Track::default();
    let mut json = serde_json::Deserializer::from_slice(bytes);
    let parsed = T::deserialize(ObjectsOnly {
        inner: &mut json,
        track: &track,
    })
    .and_then(|value| json.end().map(|()| value));
    parsed.map_err(|error| {
        let error = ApiError::BadRequest(format!("invalid JSON body: {error}"));
        match track
            .failed_at
            .into_inner()
            .and_then(|path| path.first().copied())
        {
            Some(index) => ApiError::AtIndex {
                index,
                error: Box::new(error),
            },
            None => error,
        }
    })
}

/// Where the parse is: the indices of the array elements being read, outermost first, and
/// that path as it was when the first error happened.
#[derive(Default)]
struct Track {
    path: RefCell<Vec<usize>>,
    failed_at: RefCell<Option<Vec<usize>>>,
}

impl Track {
    /// Called as an error leaves an element: the innermost element sees it first.
    fn fail_here(&self) {
        let mut failed_at = self.failed_at.borrow_mut();
        if failed_at.is_none() {
            *failed_at = Some(self.path.borrow().clone());
        }
    }
}

/// A deserializer that hands every visitor it is given a wrapped one (see [`Strict`]), so
/// the refusal reaches every value of the document.
struct ObjectsOnly<'t, D> {
    inner: D,
    track: &'t Track,
}

impl<'t, D> ObjectsOnly<'t, D> {
    fn visitor<V>(&self, inner: V, struct_only: bool) -> Strict<'t, V> {
        Strict {
            inner,
            track: self.track,
            struct_only,
        }
    }
}

macro_rules! forward_deserialize {
    ($($method:ident ($($arg:ident: $ty:ty),*)),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
                let visitor = self.visitor(visitor, false);
                self.inner.$method($($arg,)* visitor)
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectsOnly<'_, D> {
    type Error = D::Error;

    forward_deserialize! {
        deserialize_any(), deserialize_bool(), deserialize_i8(), deserialize_i16(),
        deserialize_i32(), deserialize_i64(), deserialize_i128(), deserialize_u8(),
        deserialize_u16(), deserialize_u32(), deserialize_u64(), deserialize_u128(),
        deserialize_f32(), deserialize_f64(), deserialize_char(), deserialize_str(),
        deserialize_string(), deserialize_bytes(), deserialize_byte_buf(),
        deserialize_option(), deserialize_unit(), deserialize_seq(), deserialize_map(),
        deserialize_identifier(), deserialize_ignored_any(),
        deserialize_unit_struct(name: &'static str),
        deserialize_newtype_struct(name: &'static str),
        deserialize_tuple(len: usize),
        deserialize_tuple_struct(name: &'static str, len: usize),
        deserialize_enum(name: &'static str, variants: &'static [&'static str]),
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let visitor = self.visitor(visitor, true);
        self.inner.deserialize_struct(name, fields, visitor)
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

/// A visitor that passes everything on to `inner`, wrapping what it hands over (nested
/// deserializers, sequences, maps, enums), and refuses a sequence when `inner` builds a
/// struct.
struct Strict<'t, V> {
    inner: V,
    track: &'t Track,
    struct_only: bool,
}

impl<'t, V> Strict<'t, V> {
    fn wrap<D>(&self, inner: D) -> ObjectsOnly<'t, D> {
        ObjectsOnly {
            inner,
            track: self.track,
        }
    }
}

macro_rules! forward_visit {
    ($($method:ident ($ty:ty)),* $(,)?) => {
        $(
            fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
                self.inner.$method(v)
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Strict<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    forward_visit! {
        visit_bool(bool), visit_i8(i8), visit_i16(i16), visit_i32(i32), visit_i64(i64),
        visit_i128(i128), visit_u8(u8), visit_u16(u16), visit_u32(u32), visit_u64(u64),
        visit_u128(u128), visit_f32(f32), visit_f64(f64), visit_char(char),
        visit_str(&str), visit_borrowed_str(&'de str), visit_string(String),
        visit_bytes(&[u8]), visit_borrowed_bytes(&'de [u8]), visit_byte_buf(Vec<u8>),
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        let d = self.wrap(d);
        self.inner.visit_some(d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        let d = self.wrap(d);
        self.inner.visit_newtype_struct(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        if self.struct_only {
            return Err(de::Error::invalid_type(Unexpected::Seq, &self));
        }
        self.inner.visit_seq(Elements {
            inner: seq,
            track: self.track,
            index: 0,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        let map = Entries {
            inner: map,
            track: self.track,
        };
        self.inner.visit_map(map)
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        let data = Variant {
            inner: data,
            track: self.track,
        };
        self.inner.visit_enum(data)
    }
}

/// A seed whose deserializer is wrapped.
struct Seed<'t, S> {
    inner: S,
    track: &'t Track,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(ObjectsOnly {
            inner: d,
            track: self.track,
        })
    }
}

/// The elements of an array, each wrapped, with their index tracked.
struct Elements<'t, A> {
    inner: A,
    track: &'t Track,
    index: usize,
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Elements<'_, A> {
    type Error = A::Error;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, A::Error> {
        self.track.path.borrow_mut().push(self.index);
        let element = self.inner.next_element_seed(Seed {
            inner: seed,
            track: self.track,
        });
        if element.is_err() {
            self.track.fail_here();
        }
        self.track.path.borrow_mut().pop();
        self.index += 1;
        element
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

/// The entries of an object, keys and values wrapped.
struct Entries<'t, A> {
    inner: A,
    track: &'t Track,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Entries<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.inner.next_key_seed(Seed {
            inner: seed,
            track: self.track,
        })
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.inner.next_value_seed(Seed {
            inner: seed,
            track: self.track,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

/// An enum's variant, its content wrapped; a struct variant is a struct like any other.
struct Variant<'t, A> {
    inner: A,
    track: &'t Track,
}

impl<'de, 't, A: EnumAccess<'de>> EnumAccess<'de> for Variant<'t, A> {
    type Error = A::Error;
    type Variant = Variant<'t, A::Variant>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), A::Error> {
        let track = self.track;
        let (value, variant) = self.inner.variant_seed(Seed { inner: seed, track })?;
        Ok((
            value,
            Variant {
                inner: variant,
                track,
            },
        ))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Variant<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, A::Error> {
        self.inner.newtype_variant_seed(Seed {
            inner: seed,
            track: self.track,
        })
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        let visitor = Strict {
            inner: visitor,
            track: self.track,
            struct_only: false,
        };
        self.inner.tuple_variant(len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let visitor = Strict {
            inner: visitor,
            track: self.track,
            struct_only: true,
        };
        self.inner.struct_variant(fields, visitor)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Item {
        a: i64,
        b: Option<Inner>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Inner {
        c: i64,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Batch {
        items: Vec<Item>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    enum Shape {
        Square { side: i64 },
        Pair(i64, i64),
    }

    fn index_of(error: &ApiError) -> Option<usize> {
        match error {
            ApiError::AtIndex { index, .. } => Some(*index),
            _ => None,
        }
    }

    #[test]
    fn objects_parse_as_usual() {
        let batch: Batch = parse(br#"{"items": [{"a": 1}, {"a": 2, "b": {"c": 3}}]}"#).unwrap();
        assert_eq!(batch.items[1].b, Some(Inner { c: 3 }));
        let pair: Shape = parse(br#"{"Pair": [1, 2]}"#).unwrap();
        assert_eq!(pair, Shape::Pair(1, 2));
        let square: Shape = parse(br#"{"Square": {"side": 2}}"#).unwrap();
        assert_eq!(square, Shape::Square { side: 2 });
    }

    #[test]
    fn arrays_in_place_of_structs_are_refused_at_every_depth() {
        for body in [&br#"[1, null]"#[..], br#"{"a": 1, "b": [3]}"#, br#"[[1]]"#] {
            let error = parse::<Item>(body).unwrap_err();
            assert_eq!(error.code(), "bad_request", "{error}");
        }
        let error = parse::<Batch>(br#"[[{"a": 1}]]"#).unwrap_err();
        assert_eq!((error.code(), index_of(&error)), ("bad_request", None));
        let error = parse::<Shape>(br#"{"Square": [2]}"#).unwrap_err();
        assert_eq!(error.code(), "bad_request", "{error}");
    }

    #[test]
    fn an_error_inside_an_array_names_the_element() {
        let error = parse::<Batch>(br#"{"items": [{"a": 1}, {"a": 1}, [5]]}"#).unwrap_err();
        assert_eq!(index_of(&error), Some(2));
        let error = parse::<Batch>(br#"{"items": [{"a": 1}, {"a": "1"}]}"#).unwrap_err();
        assert_eq!(index_of(&error), Some(1));
        let error = parse::<Batch>(br#"{"items": [{"a": 1}, {"a": 1, "a": 2}]}"#).unwrap_err();
        assert_eq!(index_of(&error), Some(1), "duplicate key in an item");
        let error = parse::<Batch>(br#"{"items": [{"a": 1}], "x": 1}"#).unwrap_err();
        assert_eq!(
            index_of(&error),
            None,
            "an error after the array names no item"
        );
        let error = parse::<Batch>(br#"{"items": [{"a": 1}]} trailing"#).unwrap_err();
        assert_eq!(index_of(&error), None);
    }
}
